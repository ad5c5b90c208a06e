"""`pretrain --queue K`: a momentum copy of the encoder and the last K keys it made, as extra negatives.

SimCLRv2 (Chen et al. 2020, arXiv 2006.10029, section 2) "incorporates the memory mechanism from
MoCo": a memory network, whose weights are a moving average of the trained ones, and whose outputs
are buffered as negative examples (MoCo: He et al. 2019, arXiv 1911.05722; MoCo v2: arXiv
2003.04297; facebookresearch/moco, ``moco/builder.py``). Its authors did not release that part; they
describe it as "the contrasting examples are from momentum encoder from current and past batches,
which is consistent with MoCo" (google-research/simclr issue 115). So every candidate of the loss
is a key: each online view's positive is its partner view's key, its negatives the keys of the
batch's other views and of the queue (`labelfew.losses.nt_xent_loss`, ``keys=``).

The choices, and why:

- **Keys on both sides of the fraction.** A first version kept SimCLR's online positives and
  in-batch negatives and added the queue as negatives only. The trained encoder could then lower
  the loss by moving away from where its lagging copy was, instead of learning features: on the
  CPU recipe at equal time, kNN fell from 53.3% to 42.0% (K 4,096) and 36.1% (K 16,384), and the
  pretraining loss rose again at the end of the schedule, when the copy caught up
  (benchmarks/RESULTS.md, issue 27). With keys as every candidate, the anchor cannot tell its
  positive from a negative by which encoder made it.
- **Momentum.** After every optimizer step each parameter of the copy becomes ``m·key + (1 −
  m)·online`` with MoCo v1/v2's ``m = 0.999``, constant from the first step (the copy starts equal to
  the online weights, as MoCo initialises it; no warmup, unlike `ModelEMA`'s), or with
  ``--key-momentum-ramp`` raised to 1 along a half cosine, ``m_k = 1 − (1 − m)(cos(πk/T) + 1)/2``
  after k of T steps (BYOL, arXiv 2006.07733, section 3.2; MoCo v3). Buffers (BatchNorm's running
  statistics) are copied, as `ModelEMA` does; the keys never read them (next point).
- **BatchNorm.** The copy runs once over the same 2N views as the online encoder, in train mode, so
  its BatchNorm normalises them with this batch's statistics: the global batch's where the online
  model has SyncBatchNorm (the copy is made after the conversion, so it has it too). MoCo needs
  shuffle-BN because its positive is the only key of the query's sub-batch among the candidates
  (its negatives are all queued): the positive shares the query's batch statistics and no negative
  does, so BN alone picks it out. Here the positive is one of the 2N − 1 keys of the same pass,
  all normalised with the same statistics (SimCLR's argument, with sync-BN across GPUs, arXiv
  2002.05709, section 2.3): batch statistics can at most tell "this batch" from "the queue", which
  makes queued negatives easier, never the positive.
- **Processes.** The keys of every process are gathered, view by view in rank order, before they
  are queued: after a step the queue is the same on every process, and the same as one process's
  on the global batch. K counts keys of the global batch, 2 per image (both views).
- **Any K.** The i-th key ever queued is written to row ``i mod K``, so K need not be a multiple
  of the 2B keys of a step (MoCo asserts ``K % B == 0`` to write whole batches); a step with more
  keys than K keeps its last K. Until K keys have been made, only the filled rows are negatives (warm-up).
- **Checkpoint.** The copy, the queue and its pointer are saved as the trainer's moving average
  (``ema.safetensors``: the copy's tensors plus ``_queue.keys``, ``_queue.pointer``,
  ``_queue.filled``), so a killed run resumes bit for bit. The artifact is the online encoder.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as functional
from torch import Tensor, nn

from labelfew.engine.ema import ModelEMA
from labelfew.losses import gather_with_grad

KEYS, POINTER, FILLED = "_queue.keys", "_queue.pointer", "_queue.filled"
"""The queue's tensors among the momentum encoder's in a checkpoint."""


class KeyQueue(ModelEMA):
    """The momentum (key) encoder and a first-in first-out queue of its normalised projections.

    Args:
        model: the unwrapped online encoder + projection head, after any SyncBatchNorm conversion;
            copied (train mode, no gradients).
        size: K, the keys kept (of the global batch, two per image).
        dim: the projection's width.
        momentum: m in [0, 1).
        ramp_steps: raise m to 1 along a half cosine over this many steps; None: constant m.
        autocast: the precision context of the online forward (``accelerator.autocast``), so that the
            extra forward pass costs what the online one does.

    Attributes:
        keys: the queue, normalised, float32 (float64 for a float64 model). Shape: (size, dim).
        pointer: the row the next key is written to.
        filled: the rows written so far, at most ``size`` (rows ``[0, filled)``).
    """

    def __init__(
        self, model: nn.Module, size: int, dim: int, momentum: float, ramp_steps: int | None = None,
        autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:  # fmt: skip
        if size < 1:
            raise ValueError(f"a key queue needs at least 1 row, got {size}")
        self.ramp_steps = ramp_steps
        super().__init__(model, decay=momentum)
        self.module.train()  # keys normalised with the batch's statistics (module docstring)
        self.autocast = autocast
        parameter = next(model.parameters())
        dtype = torch.float64 if parameter.dtype == torch.float64 else torch.float32
        self.keys = torch.zeros(size, dim, dtype=dtype, device=parameter.device)
        self.pointer = 0
        self.filled = 0

    def current_decay(self) -> float:
        """The momentum of the next update: m, or m raised towards 1 along the half cosine."""
        if self.ramp_steps is None:
            return self.decay
        progress = min(self.updates / max(self.ramp_steps, 1), 1.0)
        return 1 - (1 - self.decay) * (math.cos(math.pi * progress) + 1) / 2

    def negatives(self) -> Tensor:
        """The filled rows of the queue, for `nt_xent_loss`'s ``queue``. Shape: (filled, dim)."""
        return self.keys[: self.filled]

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """The momentum encoder's keys of both views of the global batch, normalised.

        Args:
            images: this process's views, first views then second views, as the online model gets
                them. Shape: (2 * local_batch_size, channels, height, width).

        Returns:
            The first views' keys of every process in rank order, then the second views'.
            Shape: (2 * global_batch_size, dim).
        """
        with self.autocast():
            projections = self.module(images)
        keys = functional.normalize(projections.to(self.keys.dtype), dim=1)
        first, second = keys.chunk(2)
        return torch.cat([gather_with_grad(first), gather_with_grad(second)])

    def enqueue(self, keys: Tensor) -> None:
        """Writes ``keys`` (Shape: (count, dim)) after the newest ones, over the oldest: the i-th key
        ever queued lands in row ``i mod K``, so a step of more than K keys leaves its last K.

        Out of place: the loss of this step may still hold the previous queue for its backward pass.
        """
        size, count = self.keys.shape[0], keys.shape[0]
        kept = keys[-size:].to(self.keys.dtype)
        first = self.pointer + count - kept.shape[0]  # the rows of the keys dropped are skipped
        rows = (first + torch.arange(kept.shape[0], device=self.keys.device)) % size
        self.keys = self.keys.index_copy(0, rows, kept)
        self.pointer = (self.pointer + count) % size
        self.filled = min(self.filled + count, size)

    def state_dict(self) -> dict[str, Tensor]:
        """The momentum encoder's tensors and the queue's (`KEYS`, `POINTER`, `FILLED`)."""
        return {
            **self.module.state_dict(),
            KEYS: self.keys,
            POINTER: torch.tensor(self.pointer),
            FILLED: torch.tensor(self.filled),
        }

    def load_state_dict(self, tensors: dict[str, Tensor], updates: int) -> None:
        """Restores what `state_dict` wrote after ``updates`` updates.

        Raises:
            ValueError: a queue of another shape (the fingerprint catches another --queue first).
        """
        tensors = dict(tensors)
        keys = tensors.pop(KEYS)
        if keys.shape != self.keys.shape:
            raise ValueError(f"a queue of shape {tuple(keys.shape)}, this run's is {tuple(self.keys.shape)}")
        self.keys = keys.to(device=self.keys.device, dtype=self.keys.dtype)
        self.pointer, self.filled = int(tensors.pop(POINTER)), int(tensors.pop(FILLED))
        super().load_state_dict(tensors, updates)
