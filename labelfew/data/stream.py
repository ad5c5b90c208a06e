"""The streaming image source: DataLoader workers that only decode and resize, for any size of folder.

Decoding a photo costs about 1.4 ms of one core (696 images/s measured on 400 x 533 photos),
making its two SimCLR views on PIL images about 25 ms; so the workers here only decode and resize
(`labelfew.data.images.load_resized`, the in-memory store's decoder, so both sources hold the
same pixels), and every view is made on the training device from the padded uint8 `Batch`
(`labelfew.views`). The order of the batches is the store's (`labelfew.data.batches.EpochOrder`,
used as the DataLoader's batch sampler), so for a seed the two sources deliver the same batches.

Evaluation reads files the same way, in file order (`FilesInOrder`): a file that cannot be decoded
is left out of its `FileBatch` and reported with its reason, never replaced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from labelfew.data.batches import Batch, EpochOrder, pad_images
from labelfew.data.images import BadImage, load_resized
from labelfew.spec import Decoding

MAX_ATTEMPTS = 16
"""Consecutive undecodable files a worker skips over before it gives up."""

Item = tuple[np.ndarray, int, int, list[int]]
"""(pixels (H, W, C) uint8, dataset index, label or -1, indices of undecodable files skipped)."""


class DecodedFiles(Dataset[Item]):
    """Image files decoded and resized on access, with optional integer labels.

    A file that cannot be decoded is replaced by the next decodable one (so a long run never
    dies on one bad image and batch sizes stay fixed, which the cross-process loss needs) and
    its index is reported in the item's list of bad indices.

    Args:
        paths: Image files.
        side: The shorter side is shrunk to at most this (`labelfew.data.images.load_resized`).
        labels: Class index of every file, or None.
        enlarge: A shorter side below ``side`` is enlarged to it (evaluation; training never enlarges).
        decoding: Channels and window of the decoded images (`labelfew.data.pixels`).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        side: int,
        labels: Sequence[int] | None = None,
        enlarge: bool = False,
        decoding: Decoding = Decoding(),
    ) -> None:
        self.paths, self.side, self.enlarge, self.decoding = list(paths), side, enlarge, decoding
        self.labels = list(labels) if labels is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        bad: list[int] = []
        for attempt in range(MAX_ATTEMPTS):
            current = (index + attempt) % len(self.paths)
            try:
                pixels = load_resized(self.paths[current], self.side, self.enlarge, self.decoding)
            except BadImage:
                bad.append(current)
                continue
            label = self.labels[current] if self.labels is not None else -1
            return pixels, current, label, bad
        raise RuntimeError(f"{MAX_ATTEMPTS} consecutive files from {self.paths[index]} could not be decoded")


def collate(items: list[Item]) -> Batch:
    """Pads the decoded images of one step into a `Batch` (labels None when every label is -1)."""
    images, sizes = pad_images([item[0] for item in items])
    labels = [item[2] for item in items]
    return Batch(
        images=images,
        sizes=sizes,
        indices=torch.tensor([item[1] for item in items], dtype=torch.int64),
        labels=None if all(label < 0 for label in labels) else torch.tensor(labels, dtype=torch.int64),
        bad=[index for item in items for index in item[3]],
    )


class StreamBatches:
    """Batches decoded by DataLoader workers, in the order of an `EpochOrder`, on the training device.

    Implements `labelfew.data.batches.EpochBatches`: the DataLoader adapter of the trainer. Each
    batch carries the seed of its step's views (seed, epoch, step, rank), as the store's do.

    Args:
        files: The dataset the workers decode.
        order: Which dataset indices each step takes (its batch sampler).
        device: Where batches are delivered.
        workers: DataLoader worker processes (0 decodes in this process).
    """

    def __init__(
        self, files: DecodedFiles, order: EpochOrder, device: torch.device | str, workers: int
    ) -> None:
        self.files, self.order, self.device = files, order, torch.device(device)
        extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
        self.loader = DataLoader(
            files,
            batch_sampler=order,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            **extra,
        )

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """Selects epoch ``epoch``; the next iteration starts at step ``first_step``."""
        self.order.set_epoch(epoch, first_step)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[Batch]:
        first_step = self.order.first_step
        for step, batch in enumerate(self.loader, start=first_step):
            batch.seed = self.order.view_seed(step)
            yield batch.to(self.device, non_blocking=True)


@dataclass
class FileBatch(Batch):
    """Consecutive files of a list, as `FilesInOrder` decodes them (`indices` holds the decodable ones).

    Attributes:
        errors: File index -> why that file could not be decoded; its image is left out.
    """

    errors: dict[int, str] = field(default_factory=dict)


InOrderItem = tuple[int, np.ndarray | None, str]
"""(file index, pixels (H, W, C) uint8 or None, why the file could not be decoded or "")."""


class FilesInOrder(Dataset[InOrderItem]):
    """Image files decoded and resized on access, for evaluation: nothing is skipped over or replaced.

    Args:
        paths: Image files.
        side: The shorter side is resized to this, up or down (`labelfew.data.images.load_resized`
            with ``enlarge``): torchvision's ``Resize(side)`` of the PIL image, so the evaluation
            view is only a crop of it.
        decoding: Channels and window of the decoded images (`labelfew.data.pixels`).
    """

    def __init__(self, paths: Sequence[Path], side: int, decoding: Decoding = Decoding()) -> None:
        self.paths, self.side, self.decoding = list(paths), side, decoding

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> InOrderItem:
        try:
            return index, load_resized(self.paths[index], self.side, enlarge=True, decoding=self.decoding), ""
        except BadImage as error:
            return index, None, str(error.__cause__ or error)


def collate_in_order(items: list[InOrderItem], channels: int = 3) -> FileBatch:
    """Pads the decodable images of consecutive files into a `FileBatch` (possibly of no image,
    then of ``channels`` channels: ``functools.partial`` it for a model of C != 3)."""
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    images, sizes = pad_images([pixels for _, pixels in good], channels)
    return FileBatch(
        images=images,
        sizes=sizes,
        indices=torch.tensor([index for index, _ in good], dtype=torch.int64),
        errors={index: error for index, pixels, error in items if pixels is None},
    )
