"""Test-only companions of `labelfew.losses`: the loss as a module, and a cross-process mean.

They were part of the package but nothing there used them; the tests use `global_mean` to check
that the per-process losses average to the single-process loss on the global batch.
"""

from __future__ import annotations

import torch.distributed as torch_distributed
from torch import Tensor, nn

from labelfew.losses import nt_xent_loss


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


class NTXentLoss(nn.Module):
    """`nt_xent_loss` as a module.

    Args:
        temperature: divides the cosine similarities; 0.1 for large batches with LARS, 0.5
            for CIFAR-sized runs (SimCLR appendix B.9, https://arxiv.org/abs/2002.05709).

    Raises:
        ValueError: non-positive temperature.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"NT-Xent temperature must be positive, got {temperature}.")
        self.temperature = temperature

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Per-process loss; see `nt_xent_loss`. Shapes: (local_batch_size, dim) each."""
        return nt_xent_loss(z1, z2, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
