"""NT-Xent, the SimCLR contrastive loss, with negatives gathered from every process.

SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709, eq. 1): for a batch of N images
seen through two random views, each of the 2N projections is an anchor whose positive is the
other view of the same image and whose negatives are the other 2N - 2 projections:

    loss(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

with `sim` the cosine similarity and `t` the temperature. The loss is the mean over all 2N
anchors.

With K processes each holding N images, every process gathers the projections of all K
processes (with gradient, see `gather_with_grad`) so that each anchor sees the 2NK - 2
negatives of the global batch, and computes the mean over its own 2N anchors. The mean of
these per-process losses is the single-process loss on the global batch, and the gradients
that DDP averages are exactly the single-process gradients of that loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_distributed
import torch.nn.functional as functional
from torch import Tensor

__all__ = ["gather_with_grad", "nt_xent_loss"]


def _is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return (
        torch_distributed.is_available()
        and torch_distributed.is_initialized()
        and torch_distributed.get_world_size() > 1
    )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every process its share of the gradient.

    Forward: the (N, D) tensor of each of the K processes, concatenated in rank order.
    Backward: every process holds the gradient of its own loss with respect to all K*N rows;
    summing these over processes (all_reduce) gives the gradient of the sum of the per-process
    losses, and each process keeps the rows of its own tensor. DDP then divides the parameter
    gradients by K, which turns the sum into the gradient of the mean loss.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        world_size = torch_distributed.get_world_size()
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        torch_distributed.all_gather(gathered, tensor)
        ctx.rank = torch_distributed.get_rank()
        ctx.local_size = tensor.shape[0]
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()
        torch_distributed.all_reduce(grad, op=torch_distributed.ReduceOp.SUM)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenates `tensor` from all processes in rank order, keeping the gradient path.

    Every process must pass a tensor of the same shape (use `drop_last=True` for the
    pretraining loader). Plain `torch.distributed.all_gather` returns tensors without gradient,
    which silently trains a different objective (trap 1 in DESIGN.md).

    Args:
        tensor: this process's rows. Shape: (local_batch_size, dim).

    Returns:
        The rows of all processes, this one's at `rank * local_batch_size`.
        Shape: (world_size * local_batch_size, dim). `tensor` itself when torch.distributed
        is not initialised or there is a single process.
    """
    if not _is_distributed():
        return tensor
    gathered: Tensor = _GatherWithGrad.apply(tensor)
    return gathered


def _check_inputs(z1: Tensor, z2: Tensor, temperature: float) -> None:
    """Raises ValueError for a temperature or projections that NT-Xent cannot use."""
    if not temperature > 0:
        raise ValueError(f"NT-Xent temperature must be positive, got {temperature}.")
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] == 0:
        raise ValueError(
            "NT-Xent expects two non-empty projections of the same shape (batch_size, dim), "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Per-process NT-Xent loss (SimCLR eq. 1) against the negatives of the global batch.

    Computed in float32 even under autocast (float64 inputs stay float64): the logits are
    divided by a small temperature and exponentiated, which half precision does badly.

    Args:
        z1: projections of the first view of this process's images, not normalised.
            Shape: (local_batch_size, dim).
        z2: projections of the second view of the same images, in the same order.
            Shape: (local_batch_size, dim).
        temperature: divides the cosine similarities; SimCLR uses 0.1 for large batches
            with LARS and 0.5 for CIFAR-10 (paper, appendix B.9).

    Returns:
        Scalar mean over this process's 2 * local_batch_size anchors. Its mean over processes
        is the loss of the global batch.

    Raises:
        ValueError: non-positive temperature, or projections of different or wrong shapes.
    """
    _check_inputs(z1, z2, temperature)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        if torch.finfo(z1.dtype).bits < 32:
            z1, z2 = z1.float(), z2.float()
        anchors = functional.normalize(torch.cat([z1, z2], dim=0), dim=1)
        local_size = z1.shape[0]
        all_z1 = gather_with_grad(anchors[:local_size])
        all_z2 = gather_with_grad(anchors[local_size:])
        candidates = torch.cat([all_z1, all_z2], dim=0)
        global_size = all_z1.shape[0]
        logits = anchors @ candidates.T / temperature

        rank = torch_distributed.get_rank() if _is_distributed() else 0
        local_rows = torch.arange(local_size, device=z1.device) + rank * local_size
        # Column of each anchor itself, and of its positive (the other view of its image).
        self_columns = torch.cat([local_rows, local_rows + global_size])
        positive_columns = torch.cat([local_rows + global_size, local_rows])
        anchor_index = torch.arange(2 * local_size, device=z1.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[anchor_index, self_columns] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        return functional.cross_entropy(logits, positive_columns)
