"""The per-tensor LARS loop: the reference the package's multi-tensor update is tested against.

`labelfew.optim.LARS` updates every tensor of a group with `torch._foreach_*` kernels; this is
the same update written one tensor at a time (You et al. 2017, arXiv 1708.03888; SimCLR's
`lars_optimizer.py`), plainly enough to check by eye.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from labelfew.optim import LARS


class PerTensorLARS(LARS):
    """`LARS` (same groups, checks and state) whose step loops over the tensors one by one."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    _update_parameter(param, self.state[param], group)
        return loss


def _update_parameter(param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One LARS (or, for excluded groups, momentum SGD) update of `param`, in place."""
    grad = param.grad
    assert grad is not None
    scale: Tensor | float = group["lr"]
    if group["lars_adapt"]:
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])
        param_norm = torch.linalg.vector_norm(param)
        grad_norm = torch.linalg.vector_norm(grad)
        trust_ratio = torch.where(
            (param_norm > 0) & (grad_norm > 0),
            group["trust_coefficient"] * param_norm / (grad_norm + group["eps"]),
            torch.ones_like(param_norm),
        )
        scale = trust_ratio * group["lr"]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(param)
    velocity: Tensor = state["momentum_buffer"]
    velocity.mul_(group["momentum"]).add_(grad * scale)
    param.sub_(velocity)
