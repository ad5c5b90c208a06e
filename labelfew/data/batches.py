"""One typed batch, one protocol for an epoch of batches, and the seeded order both image sources share.

Both image sources (`labelfew.data.store`, decoded once in memory; `labelfew.data.stream`,
DataLoader workers that decode and resize) deliver the same `Batch`: uint8 images padded to the
largest image of the batch, each image's valid extent at the top left, and the seed of the
step's random views. They take their batches from the same `EpochOrder`, so for a seed they
give the same batches in the same order, and the views made from them are the same too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


@dataclass
class Batch:
    """Images of one step, as both image sources deliver them.

    Attributes:
        images: uint8, C channels (`labelfew.spec.Decoding.channels`: 3 for RGB, 1 for gray, N),
            padded with zeros to the batch's largest height and width, each image at the top left.
            Shape: (batch_size, C, H, W).
        sizes: Each image's valid ``(height, width)``. Shape: (batch_size, 2), int64, on the CPU.
        indices: Dataset index of each image. Shape: (batch_size,), int64, on the CPU.
        labels: Class index of each image, or None for unlabelled images. Shape: (batch_size,), int64.
        bad: Dataset indices of files that could not be decoded while making this batch (each
            replaced by the next decodable file), which the trainer records.
        seed: Seed of this step's random views, from `step_seed` (0 for unshuffled batches).
    """

    images: Tensor
    sizes: Tensor
    indices: Tensor
    labels: Tensor | None = None
    bad: list[int] = field(default_factory=list)
    seed: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with ``seed``: every random draw of this step's views comes from it."""
        return torch.Generator().manual_seed(self.seed)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch with ``images`` and ``labels`` on ``device`` (sizes and indices stay on the CPU)."""
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking)
        return replace(self, images=self.images.to(device, non_blocking=non_blocking), labels=labels)

    def pin_memory(self) -> Batch:
        """The batch in pinned host memory (called by a DataLoader with ``pin_memory=True``)."""
        labels = None if self.labels is None else self.labels.pin_memory()
        return replace(self, images=self.images.pin_memory(), labels=labels)


def pad_images(arrays: Sequence[np.ndarray | Tensor], channels: int = 3) -> tuple[Tensor, Tensor]:
    """Stacks images of different sizes into one zero-padded batch, each at the top left.

    Args:
        arrays: uint8 images, each (height, width, C) as numpy arrays (a decoder's layout) or
            (C, height, width) as tensors.
        channels: C when `arrays` is empty (else the images' own).

    Returns:
        ``(images, sizes)``: shapes (batch, C, H, W) uint8 and (batch, 2) int64.
    """
    tensors = [
        torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        if isinstance(array, np.ndarray)
        else array
        for array in arrays
    ]
    sizes = torch.tensor([tuple(tensor.shape[1:]) for tensor in tensors], dtype=torch.int64).reshape(-1, 2)
    height, width = (int(value) for value in sizes.max(dim=0).values) if tensors else (0, 0)
    channels = int(tensors[0].shape[0]) if tensors else channels
    images = torch.zeros(len(tensors), channels, height, width, dtype=torch.uint8)
    for row, tensor in enumerate(tensors):
        images[row, :, : tensor.shape[1], : tensor.shape[2]] = tensor
    return images, sizes


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed for the views of one (seed, epoch, step, process); nearby tuples are unrelated."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochBatches(Protocol):
    """An epoch of batches per iteration, chosen by `set_epoch`; what `labelfew.engine.Trainer` runs on.

    ``set_epoch(epoch, first_step)`` selects the epoch (its order and its view seeds);
    ``first_step`` > 0 resumes inside it, starting at that batch without making the batches
    before it. ``len`` is the number of steps of a whole epoch.
    """

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int, first_step: int = 0) -> None: ...


class EpochOrder:
    """Which dataset indices each step of an epoch takes, on this process; also a DataLoader batch sampler.

    Epoch ``e`` is a permutation of the dataset seeded by ``seed + e`` (or, with ``weights``,
    ``count`` draws with replacement in proportion to them), the same on every process; with
    ``world_size`` processes each global batch of ``batch_size * world_size`` images is split so
    that process ``rank`` takes its own ``batch_size`` rows. So K processes with batch N see the
    same global batches as one process with batch K x N, and a resumed run the same as one that
    never stopped. With ``drop_last`` the last incomplete global batch is dropped (NT-Xent needs
    equal batches on every process, and a BatchNorm in training mode cannot normalise one image);
    without it (``shuffle=False``, evaluation) the last batch is split as evenly as it goes.

    Args:
        count: Images in the dataset.
        batch_size: Images per process and step.
        seed: Seeds the order.
        rank: This process's index.
        world_size: Number of processes.
        shuffle: False keeps the dataset order (evaluation).
        drop_last: Whether to drop the last incomplete global batch.
        weights: Sampling weights per image (class-balanced fine-tuning), or None.
    """

    def __init__(
        self,
        count: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        weights: Sequence[float] | None = None,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
            )
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch = 0
        self.first_step = 0

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """Selects epoch ``epoch``; the next iteration starts at step ``first_step``."""
        self.epoch, self.first_step = epoch, first_step

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return self.count // global_batch
        return -(-self.count // global_batch)

    def order(self) -> Tensor:
        """Dataset indices of the whole epoch, in order, for every process. Shape: (count,)."""
        if not self.shuffle:
            return torch.arange(self.count)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.count, replacement=True, generator=generator)
        return torch.randperm(self.count, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        """This process's indices of each step from ``first_step`` on (consumed: the next epoch is whole)."""
        order = self.order()
        global_batch = self.batch_size * self.world_size
        first_step, self.first_step = self.first_step, 0
        for step in range(first_step, len(self)):
            chunk = order[step * global_batch : (step + 1) * global_batch]
            share = -(-chunk.shape[0] // self.world_size)
            rows = chunk[self.rank * share : (self.rank + 1) * share].tolist()
            if rows:  # a process can have no share of a last, incomplete evaluation batch
                yield rows

    def view_seed(self, step: int) -> int:
        """The seed of the random views of ``step`` of the current epoch on this process."""
        return step_seed(self.seed, self.epoch, step, self.rank) if self.shuffle else 0


@dataclass
class LabelledPairBatch(Batch):
    """An unlabeled batch and the labelled batch trained in the same step (distill's `--alpha`; FixMatch)."""

    labelled: Batch | None = None


class WithLabelled:
    """The unlabeled batches (`EpochBatches`), each carrying a labelled batch when there are labels.

    The labelled order runs on across the unlabeled epochs: global step g takes step g mod L of
    labelled epoch g div L (L labelled steps an epoch), so a resumed run takes the same batches.
    """

    def __init__(self, unlabeled: EpochBatches, labelled: EpochBatches | None) -> None:
        self.unlabeled, self.labelled = unlabeled, labelled
        self._next_step = 0

    def __len__(self) -> int:
        return len(self.unlabeled)

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        self.unlabeled.set_epoch(epoch, first_step)
        self._next_step = epoch * len(self.unlabeled) + first_step

    def __iter__(self) -> Iterator[Batch]:
        labelled: Iterator[Batch] | None = None
        for batch in self.unlabeled:
            values = {item.name: getattr(batch, item.name) for item in fields(Batch)}
            step, self._next_step = self._next_step, self._next_step + 1
            if self.labelled is None:
                yield LabelledPairBatch(**values)
                continue
            per_epoch = len(self.labelled)
            if labelled is None or step % per_epoch == 0:
                self.labelled.set_epoch(step // per_epoch, step % per_epoch)
                labelled = iter(self.labelled)
            yield LabelledPairBatch(**values, labelled=next(labelled))
