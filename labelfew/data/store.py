"""Images decoded once and kept in memory as uint8: the image source for folders within the budget.

Decoding a JPEG costs far more than making two views of it on a GPU, and a folder of a few
thousand photos or CIFAR-size images fits in memory decoded: 50,000 images at 32 px take 150 MiB,
20,000 photos of 4:3 stored at 256 px take 4.9 GiB. `decode_images` decodes every file once
(threads; Pillow releases the GIL while decoding and resizing) with
`labelfew.data.images.load_resized`, the streaming source's decoder, into one flat uint8 buffer
with each image's extent, and `MemoryBatches` gathers shuffled batches from it into the padded
`labelfew.data.batches.Batch` that the streaming source delivers too.

Stored side (`stored_side`): the training size itself up to 64 px (a 32 px image is kept pixel
for pixel), above that ``round(S / 0.875)``, 256 for 224, the evaluation protocol's resize, so a
full-area crop is still shrunk to ``S`` as from a larger photo and the evaluation view of a
stored image is only a centre crop. Every image is kept whole: its shorter side is shrunk to the
stored side when it is longer (never upsampled), the aspect ratio kept, so the random crops cover
the whole photo as in the paper. The memory budget counts these real bytes.

Images are stored as the decoder gives them (`labelfew.data.pixels`): C channels of 8 bits
(``decoding.channels``), deep images already through the run's window, so the store of a
grayscale folder takes a third of an RGB one and every source holds the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from labelfew.data.batches import Batch, EpochOrder
from labelfew.data.images import BadImage, image_extent, load_resized, printable, stored_extent
from labelfew.errors import UserError
from labelfew.spec import Decoding, eval_resize_side

DEFAULT_MEMORY_BUDGET = 4 * 2**30
"""Bytes of decoded images kept in memory by default (4 GiB: ~16,000 photos of 4:3 at 256 px)."""
DEVICE_MEMORY_FRACTION = 0.25
"""A store goes on the GPU when it takes at most this share of the GPU's free memory."""
ESTIMATE_SAMPLE = 256
"""Files whose headers `estimate_decoded_bytes` reads to estimate a folder's decoded size."""


def stored_side(image_size: int) -> int:
    """The shorter side images are stored at for a training size: ``S`` up to 64 px, else ``round(S / 0.875)``."""
    return eval_resize_side(image_size)


def image_bytes(height: int, width: int, side: int, channels: int = 3) -> int:
    """Bytes of one decoded uint8 image of ``height x width`` with ``channels`` stored at ``side``."""
    stored_height, stored_width = stored_extent(height, width, side)
    return channels * stored_height * stored_width


def estimate_decoded_bytes(
    paths: Sequence[Path], side: int, sample: int = ESTIMATE_SAMPLE, channels: int = 3
) -> int:
    """The decoded bytes of ``paths`` at ``side``, from the headers of an evenly spaced sample.

    Headers give an image's size without decoding it (a few tenths of a millisecond per file),
    so the estimate is exact for folders of at most ``sample`` files. Files that cannot be
    opened count as the sample's mean.
    """
    if not paths:
        return 0
    step = max(1, len(paths) // sample)
    extents = _read_extents([paths[index] for index in range(0, len(paths), step)][:sample])
    sizes = [image_bytes(*extent, side, channels) for extent in extents if extent is not None]
    if not sizes:
        return 0
    return round(sum(sizes) / len(sizes) * len(paths))


def fits_in_memory(
    paths: Sequence[Path], side: int, budget: int = DEFAULT_MEMORY_BUDGET, channels: int = 3
) -> bool:
    """Whether ``paths`` decoded at ``side`` with ``channels`` take at most ``budget`` bytes (from headers)."""
    return estimate_decoded_bytes(paths, side, channels=channels) <= budget


@dataclass
class ImageStore:
    """Decoded images in one flat uint8 buffer, each at its own extent.

    Attributes:
        pixels: Every image's (C, height, width) pixels, one after the other. Shape: (bytes,), uint8.
        offsets: Where each image starts in ``pixels``. Shape: (N,), int64.
        sizes: Each image's ``(height, width)``. Shape: (N, 2), int64.
        paths: The files decoded, in row order.
        skipped: ``"path: reason"`` for every file that could not be decoded.
        channels: C, every image's channel count (`labelfew.spec.Decoding.channels`).
    """

    pixels: Tensor
    offsets: Tensor
    sizes: Tensor
    paths: list[Path]
    skipped: list[str] = field(default_factory=list)
    channels: int = 3

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        """Bytes held by ``pixels``."""
        return self.pixels.numel()

    def to(self, device: torch.device | str) -> ImageStore:
        """The same store with ``pixels`` on ``device`` (where batches are gathered)."""
        return ImageStore(
            self.pixels.to(device), self.offsets, self.sizes, self.paths, self.skipped, self.channels
        )

    def _is_uniform(self) -> bool:
        """Whether every image has the same size and the buffer holds them back to back, nothing else."""
        count = self.channels * int(self.sizes[0, 0]) * int(self.sizes[0, 1])
        return (
            bool((self.sizes == self.sizes[0]).all())
            and self.nbytes == len(self) * count
            and bool((self.offsets == torch.arange(len(self)) * count).all())
        )

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The images of ``rows`` as a padded batch on the store's device, and their sizes.

        Shape: (batch, C, H, W) uint8 with the batch's largest height and width, and (batch, 2).
        """
        sizes = self.sizes[rows]
        height, width = (int(value) for value in sizes.max(dim=0).values)
        channels = self.channels
        if self._is_uniform():  # CIFAR, STL-10: the buffer is one (N, C, H, W) tensor
            images = self.pixels.view(len(self), channels, height, width)
            return images[rows.to(self.pixels.device)], sizes
        images = torch.zeros(len(rows), channels, height, width, dtype=torch.uint8, device=self.pixels.device)
        for row, (start, (image_height, image_width)) in enumerate(
            zip(self.offsets[rows].tolist(), sizes.tolist(), strict=True)
        ):
            count = channels * image_height * image_width
            image = self.pixels[start : start + count].view(channels, image_height, image_width)
            images[row, :, :image_height, :image_width] = image
        return images, sizes


def decode_images(
    paths: Sequence[Path],
    side: int,
    budget: int = DEFAULT_MEMORY_BUDGET,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    decoding: Decoding = Decoding(),
) -> ImageStore:
    """Decodes every file with `labelfew.data.images.load_resized` (see the module docstring).

    The headers are read first, so the buffer is allocated once at its real size and the budget
    is checked before anything is decoded.

    Args:
        paths: Image files.
        side: Stored side in pixels, usually ``stored_side(image_size)``.
        budget: Largest number of bytes the decoded images may take.
        workers: Decoding threads; None uses every core this process may run on.
        on_progress: Called as ``on_progress(done, total)`` after each chunk of files.
        decoding: Channels and window of the decoded images (`labelfew.data.pixels`).

    Returns:
        The decoded images; undecodable files are left out and listed in ``skipped``.

    Raises:
        UserError: No paths, the decoded images would exceed ``budget``, or no file could be
            decoded.
    """
    if not paths:
        raise UserError("No image files to decode; pass a folder that holds images.")
    threads = workers or _available_cores()
    extents = _read_extents(paths, threads)
    sizes = torch.tensor(
        [stored_extent(*extent, side) if extent is not None else (0, 0) for extent in extents],
        dtype=torch.int64,
    )
    counts = decoding.channels * sizes[:, 0] * sizes[:, 1]
    needed = int(counts.sum())
    if needed > budget:
        raise UserError(
            f"{len(paths)} images at {side} px need {needed / 2**30:.1f} GiB decoded, more than the "
            f"memory budget of {budget / 2**30:.1f} GiB; raise --memory-budget or use --augment-on workers."
        )
    offsets = torch.cumsum(counts, 0) - counts
    pixels = torch.empty(needed, dtype=torch.uint8)
    failures = {
        index: f"{printable(paths[index])}: cannot be opened as an image"
        for index, e in enumerate(extents)
        if e is None
    }
    _decode_into(pixels, offsets, sizes, paths, (side, decoding), threads, failures, on_progress)
    if len(failures) == len(paths):
        raise UserError(f"None of the {len(paths)} image files could be decoded, e.g. {failures[0]}")
    kept = torch.tensor([index for index in range(len(paths)) if index not in failures])
    return ImageStore(
        pixels=pixels,
        offsets=offsets[kept],
        sizes=sizes[kept],
        paths=[Path(paths[index]) for index in kept.tolist()],
        skipped=[failures[index] for index in sorted(failures)],
        channels=decoding.channels,
    )


def _decode_into(
    pixels: Tensor,
    offsets: Tensor,
    sizes: Tensor,
    paths: Sequence[Path],
    how: tuple[int, Decoding],
    threads: int,
    failures: dict[int, str],
    on_progress: Callable[[int, int], None] | None,
) -> None:
    """Decodes the files whose header could be read into their slices of ``pixels`` (at ``how``:
    the stored side and the decoding)."""
    chunk, channels = 256, how[1].channels
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(paths), chunk):
            indices = [
                index for index in range(start, min(start + chunk, len(paths))) if index not in failures
            ]
            for index, result in zip(indices, pool.map(_decode, [paths[i] for i in indices], [how] * len(indices)), strict=True):  # fmt: skip
                height, width = sizes[index].tolist()
                if isinstance(result, str):
                    failures[index] = result
                elif result.shape != (height, width, channels):
                    failures[index] = f"{printable(paths[index])}: decoded size differs from its header"
                else:
                    count = channels * height * width
                    start_byte = int(offsets[index])
                    target = pixels[start_byte : start_byte + count].view(channels, height, width)
                    target.copy_(torch.from_numpy(result).permute(2, 0, 1))
            if on_progress is not None:
                on_progress(min(start + chunk, len(paths)), len(paths))


def _decode(path: Path, how: tuple[int, Decoding]) -> np.ndarray | str:
    """`load_resized`'s pixels at ``how`` (side, decoding), or the reason the file failed."""
    try:
        return load_resized(path, how[0], decoding=how[1])
    except BadImage as error:
        return str(error)


def _read_extents(paths: Sequence[Path], threads: int | None = None) -> list[tuple[int, int] | None]:
    with ThreadPoolExecutor(max_workers=threads or _available_cores()) as pool:
        return list(pool.map(image_extent, paths))


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def store_device(nbytes: int, device: torch.device, fraction: float = DEVICE_MEMORY_FRACTION) -> torch.device:
    """Where to keep a store of ``nbytes``: on the CUDA ``device`` when it takes at most ``fraction``
    of its free memory (batches are then gathered without a host copy), else on the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= fraction * free else torch.device("cpu")


class MemoryBatches:
    """Batches of an `ImageStore`, in the order of `labelfew.data.batches.EpochOrder`, on the training device.

    Implements `labelfew.data.batches.EpochBatches`. Each batch carries the seed of its step's
    views (seed, epoch, step, rank), so a run resumed at any step makes the same views as one that
    was never stopped, and the streaming source (`labelfew.data.stream.StreamBatches`) over the
    same files gives the same batches. ``Batch.indices`` are store rows (``store.paths``); ``bad``
    is always empty, since the store holds decodable images only (``store.skipped`` names the rest).

    Args:
        store: The decoded images, on the CPU or the training device.
        order: Which rows each step takes (its ``count`` must be ``len(store)``).
        device: Where batches are delivered.
        labels: Class index of every store row, or None for unlabelled images.

    Raises:
        UserError: The store holds fewer images than one global batch.
    """

    def __init__(
        self, store: ImageStore, order: EpochOrder, device: torch.device | str, labels: Tensor | None = None
    ) -> None:
        global_batch = order.batch_size * order.world_size
        if len(store) < global_batch:
            raise UserError(
                f"--batch-size {global_batch} is larger than the {len(store)} decoded images; use at most {len(store)}."
            )
        self.store, self.order, self.device, self.labels = store, order, torch.device(device), labels

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """Selects epoch ``epoch``; the next iteration starts at step ``first_step``."""
        self.order.set_epoch(epoch, first_step)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[Batch]:
        first_step = self.order.first_step
        for step, rows in enumerate(self.order, start=first_step):
            indices = torch.tensor(rows, dtype=torch.int64)
            images, sizes = self.store.gather(indices)
            labels = None if self.labels is None else self.labels[indices]
            batch = Batch(images, sizes, indices, labels, seed=self.order.view_seed(step))
            yield batch.to(self.device, non_blocking=True)
