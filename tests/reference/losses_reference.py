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


def reference_nt_xent(
    z1: Tensor, z2: Tensor, temperature: float, queue: Tensor | None = None, keys: Tensor | None = None
) -> Tensor:
    """SimCLR eq. 1 (https://arxiv.org/abs/2002.05709), one anchor and one candidate at a time. With
    ``keys`` (both views' momentum keys, first views then second), every candidate is a key: the
    positive is the partner view's key and the other views' keys are negatives, the anchor's own
    view's key left out as the anchor itself is in SimCLR; each row of ``queue`` is one more negative
    in every anchor's denominator (SimCLRv2's memory, as in MoCo)."""
    views = [z / torch.linalg.vector_norm(z) for z in list(z1) + list(z2)]
    candidates = views if keys is None else [key.detach() / torch.linalg.vector_norm(key) for key in keys]
    queued = [key.detach() / torch.linalg.vector_norm(key) for key in (queue if queue is not None else [])]
    batch_size = z1.shape[0]
    total = torch.zeros((), dtype=z1.dtype)
    for anchor in range(2 * batch_size):
        positive = (anchor + batch_size) % (2 * batch_size)
        denominator = torch.zeros((), dtype=z1.dtype)
        for candidate in range(2 * batch_size):
            if candidate != anchor:
                denominator = denominator + torch.exp(
                    torch.dot(views[anchor], candidates[candidate]) / temperature
                )
        for key in queued:
            denominator = denominator + torch.exp(torch.dot(views[anchor], key) / temperature)
        numerator = torch.exp(torch.dot(views[anchor], candidates[positive]) / temperature)
        total = total - torch.log(numerator / denominator)
    return total / (2 * batch_size)


def weighted_smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weights: list[float] | None, smoothing: float
) -> torch.Tensor:
    """Cross-entropy with class weights and label smoothing, one image and one class at a time:
    image i adds ``(1 - ε) · w[y_i] · -log p[i, y_i] + ε / C · Σ_c w[c] · -log p[i, c]``, and the
    sum is divided by ``Σ_i w[y_i]`` (PyTorch's weighted mean)."""
    classes = logits.shape[1]
    w = weights if weights is not None else [1.0] * classes
    total, norm = torch.zeros((), dtype=torch.float64), 0.0
    for row, label in zip(logits.double(), labels.tolist(), strict=True):
        log_p = row - torch.logsumexp(row, dim=0)
        term = (1 - smoothing) * w[label] * -log_p[label]
        for c in range(classes):
            term = term + smoothing / classes * w[c] * -log_p[c]
        total, norm = total + term, norm + w[label]
    return total / norm
