"""Test-only references for `labelfew.losses`: SimCLR's loss as a plain loop, and a cross-process mean.

`tests/test_losses.py` checks `labelfew.losses.nt_xent_loss` against `reference_nt_xent`, and the
distributed tests use `global_mean` to check that the per-process losses average to the
single-process loss on the global batch. Nothing here is tested for its own sake.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_distributed
from torch import Tensor


def _is_distributed() -> bool:
    return (
        torch_distributed.is_available()
        and torch_distributed.is_initialized()
        and torch_distributed.get_world_size() > 1
    )


def global_mean(value: Tensor) -> Tensor:
    """Mean of a tensor over all processes, identical on every rank; for logging only.

    Args:
        value: a per-process value, typically the scalar per-process loss.

    Returns:
        The mean over processes, detached from the graph (also when not distributed, so that
        single- and multi-process code behave alike).
    """
    value = value.detach()
    if not _is_distributed():
        return value
    total = value.clone()
    torch_distributed.all_reduce(total, op=torch_distributed.ReduceOp.SUM)
    return total / torch_distributed.get_world_size()


def reference_nt_xent(z1: Tensor, z2: Tensor, temperature: float, queue: Tensor | None = None) -> Tensor:
    """SimCLR eq. 1 (https://arxiv.org/abs/2002.05709), one anchor and one candidate at a time; with
    ``queue``, each of its rows is one more negative in every anchor's denominator (SimCLRv2's memory)."""
    views = [z / torch.linalg.vector_norm(z) for z in list(z1) + list(z2)]
    keys = [key.detach() / torch.linalg.vector_norm(key) for key in (queue if queue is not None else [])]
    batch_size = z1.shape[0]
    total = torch.zeros((), dtype=z1.dtype)
    for anchor in range(2 * batch_size):
        positive = (anchor + batch_size) % (2 * batch_size)
        denominator = torch.zeros((), dtype=z1.dtype)
        for candidate in range(2 * batch_size):
            if candidate != anchor:
                denominator = denominator + torch.exp(
                    torch.dot(views[anchor], views[candidate]) / temperature
                )
        for key in keys:
            denominator = denominator + torch.exp(torch.dot(views[anchor], key) / temperature)
        numerator = torch.exp(torch.dot(views[anchor], views[positive]) / temperature)
        total = total - torch.log(numerator / denominator)
    return total / (2 * batch_size)
