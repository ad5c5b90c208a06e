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

With a key queue (`pretrain --queue`, SimCLRv2 section 2: MoCo's memory "whose output will be
buffered as negative examples", arXiv 2006.10029), the queued keys only add negatives: every
denominator above also sums exp(sim(z_i, k) / t) over the K queued keys k (momentum-encoder
projections of earlier steps, `labelfew.engine.key_queue`). Anchors, positives and in-batch
negatives stay SimCLR's online projections; see `nt_xent_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_distributed
import torch.nn.functional as functional
from torch import Tensor

__all__ = ["distillation_loss", "fixmatch_unlabeled_loss", "gather_with_grad", "nt_xent_loss"]


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


def nt_xent_loss(
    z1: Tensor, z2: Tensor, temperature: float, queue: Tensor | None = None, keys: Tensor | None = None
) -> Tensor:
    """Per-process NT-Xent loss (SimCLR eq. 1) against the negatives of the global batch (and a queue).

    Without ``keys``: SimCLR. Each anchor (the online projection of a view, with gradient) is
    contrasted with the other 2N - 1 online views of the global batch; its positive is its
    partner view:

        loss(i, j) = -log( exp(s_ij / t) / sum_{k != i} exp(s_ik / t) )

    With ``keys`` (`pretrain --queue`, SimCLRv2's memory as its authors describe it: "the contrasting
    examples are from momentum encoder from current and past batches, which is consistent with
    MoCo", google-research/simclr issue 115): the same formula, with every candidate a momentum
    key, without gradient: anchor i's positive is the key of its partner view, its negatives the
    keys of the other 2N - 2 views of the global batch (its own view's key is left out, as the
    anchor itself is in SimCLR) and every row of ``queue`` (keys of earlier steps):

        loss(i, j) = -log( exp(sim(z_i, k_j) / t)
                           / (sum_{k != i} exp(sim(z_i, k_k) / t) + sum_q exp(sim(z_i, q) / t)) )

    Positives and negatives then come from one encoder. Online positives against momentum-key
    negatives (the first version of `--queue`) let the trained encoder separate itself from its
    lagging copy instead of learning features: the pretraining loss rose at the end of the
    schedule and kNN fell 11-17 points (benchmarks/RESULTS.md, issue 27).

    Computed in float32 even under autocast (float64 inputs stay float64): the logits are
    divided by a small temperature and exponentiated, which half precision does badly.

    Args:
        z1: projections of the first view of this process's images, not normalised.
            Shape: (local_batch_size, dim).
        z2: projections of the second view of the same images, in the same order.
            Shape: (local_batch_size, dim).
        temperature: divides the cosine similarities; SimCLR uses 0.1 for large batches
            with LARS and 0.5 for CIFAR-10 (paper, appendix B.9).
        queue: extra negatives (only with ``keys``), the same on every process (keys of earlier
            steps, gathered over processes before they were queued); normalised here, never
            differentiated. Shape: (queued_keys, dim); None or 0 rows: no queue.
        keys: the momentum encoder's projections of this step's views, the first views of every
            process in rank order, then the second views (`KeyQueue.encode`); never differentiated.
            Shape: (2 * global_batch_size, dim).

    Returns:
        Scalar mean over this process's 2 * local_batch_size anchors. Its mean over processes
        is the loss of the global batch.

    Raises:
        ValueError: non-positive temperature, or projections, keys or queue of wrong shapes.
    """
    _check_inputs(z1, z2, temperature)
    _check_keys(z1, queue, keys)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        if torch.finfo(z1.dtype).bits < 32:
            z1, z2 = z1.float(), z2.float()
        anchors = functional.normalize(torch.cat([z1, z2], dim=0), dim=1)
        local_size = z1.shape[0]
        if keys is None:
            candidates = torch.cat(
                [gather_with_grad(anchors[:local_size]), gather_with_grad(anchors[local_size:])]
            )
        else:
            candidates = functional.normalize(keys.detach().to(anchors.dtype), dim=1)
        global_size = candidates.shape[0] // 2
        if queue is not None and queue.shape[0] > 0:  # after the batch: the columns below stay
            queued = functional.normalize(queue.detach().to(anchors.dtype), dim=1)
            candidates = torch.cat([candidates, queued], dim=0)
        logits = anchors @ candidates.T / temperature

        rank = torch_distributed.get_rank() if _is_distributed() else 0
        local_rows = torch.arange(local_size, device=z1.device) + rank * local_size
        # Column of each anchor itself (or its own view's key), and of its positive (the other view).
        self_columns = torch.cat([local_rows, local_rows + global_size])
        positive_columns = torch.cat([local_rows + global_size, local_rows])
        anchor_index = torch.arange(2 * local_size, device=z1.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[anchor_index, self_columns] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        return functional.cross_entropy(logits, positive_columns)


def _check_keys(z1: Tensor, queue: Tensor | None, keys: Tensor | None) -> None:
    """Raises ValueError for momentum keys or a queue that NT-Xent cannot use with ``z1``."""
    dim = z1.shape[1]
    if queue is not None and queue.shape[0] > 0 and keys is None:
        raise ValueError("NT-Xent's queue needs this step's momentum keys (keys=): its negatives are keys.")
    if queue is not None and (queue.ndim != 2 or queue.shape[1] != dim):
        raise ValueError(f"NT-Xent's queue must have shape (keys, {dim}), got {tuple(queue.shape)}.")
    world = torch_distributed.get_world_size() if _is_distributed() else 1
    if keys is not None and tuple(keys.shape) != (2 * world * z1.shape[0], dim):
        raise ValueError(
            f"NT-Xent's keys must have shape ({2 * world * z1.shape[0]}, {dim}) (both views of the "
            f"global batch), got {tuple(keys.shape)}."
        )


def _float_logits(logits: Tensor) -> Tensor:
    """Half-precision logits as float32 (softmax at a temperature loses digits in half precision)."""
    return logits.float() if torch.finfo(logits.dtype).bits < 32 else logits


def classification_loss(
    logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, class_weights: Tensor | None = None
) -> Tensor:
    """Fine-tuning's cross-entropy, with label smoothing and `--class-weights` (every method's
    labelled part: supervised, the `--lr auto` candidates, FixMatch's labelled batch).

    PyTorch's ``cross_entropy(weight=w, label_smoothing=ε)``: with ``l = log_softmax(logits)`` and C
    classes, image i contributes ``(1 - ε) · w[y_i] · (-l[i, y_i]) + ε / C · Σ_c w[c] · (-l[i, c])``
    and the sum over the batch is divided by ``Σ_i w[y_i]`` (the weighted mean; plain mean without
    weights).

    Shape: logits (batch_size, num_classes), labels (batch_size,), class_weights (num_classes,).
    """
    weight = None if class_weights is None else class_weights.to(device=logits.device, dtype=torch.float32)
    return functional.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=label_smoothing)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy from the teacher's to the student's softmax, both at ``temperature``.

    SimCLRv2 (Chen et al. 2020, https://arxiv.org/abs/2006.10029, eq. 2):
    ``-sum_y softmax(teacher / t)[y] * log_softmax(student / t)[y]``, averaged over the batch. The
    teacher is detached (it is not trained), and the temperature divides both sides (DESIGN.md trap
    11: on one side only, the student's optimum is no longer the teacher's distribution). There is
    no ``t**2`` factor here, as eq. 2 has none; the distill stage multiplies by it (Hinton et al.,
    arXiv 1503.02531) so that the layers LARS does not adapt take steps of T = 1's size at the
    paper's ``t = 0.1`` (`labelfew.stages.distill.distillation_step`).

    Args:
        student_logits: Shape: (batch_size, num_classes).
        teacher_logits: The teacher's logits on the same views, from a model in eval mode.
            Shape: (batch_size, num_classes).
        temperature: Divides both logits; SimCLRv2 (section 3) uses 0.1 for self-distillation and
            1.0 from a big teacher to a small student.

    Returns:
        Scalar, float32 (or float64 for float64 inputs), even under autocast.

    Raises:
        ValueError: non-positive temperature, or logits of different or wrong shapes.
    """
    if not temperature > 0:
        raise ValueError(f"Distillation temperature must be positive, got {temperature}.")
    if (
        student_logits.ndim != 2
        or student_logits.shape != teacher_logits.shape
        or student_logits.shape[0] == 0
    ):
        raise ValueError(
            "Distillation expects non-empty student and teacher logits of the same shape (batch_size, "
            f"num_classes), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student = _float_logits(student_logits) / temperature
        targets = torch.softmax(_float_logits(teacher_logits.detach()) / temperature, dim=1)
        return -(targets * functional.log_softmax(student, dim=1)).sum(dim=1).mean()


def fixmatch_unlabeled_loss(
    weak_logits: Tensor, strong_logits: Tensor, threshold: float = 0.95
) -> tuple[Tensor, Tensor]:
    """FixMatch's unlabeled loss: cross-entropy of the strong view against the weak view's confident guess.

    FixMatch (Sohn et al. 2020, https://arxiv.org/abs/2001.07685, eq. 4): with ``q = softmax(weak)``
    computed without gradient, the pseudo-label is ``argmax q`` and counts only where
    ``max q >= threshold``; the loss is ``sum over images of mask * CE(strong, pseudo-label)``
    divided by **all** ``mu * B`` unlabeled images, not by the confident ones, so the loss grows as
    the model becomes confident (DESIGN.md trap 10: pseudo-labels from the strong view or with gradient).

    Args:
        weak_logits: Logits of the weak views (flip + crop). Shape: (batch_size, num_classes).
        strong_logits: Logits of the strong views of the same images. Shape: (batch_size, num_classes).
        threshold: Confidence a pseudo-label needs; FixMatch uses 0.95.

    Returns:
        ``(loss, mask_rate)``: the scalar loss and the fraction of images whose pseudo-label counted
        (a detached scalar, to log without a device sync).

    Raises:
        ValueError: threshold outside [0, 1], or logits of different or wrong shapes.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"FixMatch threshold must be in [0, 1], got {threshold}.")
    if weak_logits.ndim != 2 or weak_logits.shape != strong_logits.shape or weak_logits.shape[0] == 0:
        raise ValueError(
            "FixMatch expects non-empty weak and strong logits of the same shape (batch_size, num_classes), "
            f"got {tuple(weak_logits.shape)} and {tuple(strong_logits.shape)}."
        )
    with torch.autocast(device_type=strong_logits.device.type, enabled=False):
        confidence, pseudo_labels = torch.softmax(_float_logits(weak_logits.detach()), dim=1).max(dim=1)
        mask = (confidence >= threshold).to(confidence.dtype)
        losses = functional.cross_entropy(_float_logits(strong_logits), pseudo_labels, reduction="none")
        return (losses * mask).mean(), mask.mean()
