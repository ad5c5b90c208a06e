"""Small datasets decoded once and kept in memory as uint8, fed in batches to the batched views.

Decoding a JPEG costs far more than making two views of it on a GPU, and a folder of a few
thousand photos or CIFAR-size images fits in memory decoded: 50,000 images at 32 px take 150 MiB,
20,000 images stored at 256 px take 3.7 GiB. `decode_images` decodes every file once (threads;
Pillow releases the GIL while decoding and resizing) into one ``(N, 3, side, side)`` uint8
tensor, and `MemoryBatches` draws shuffled batches from it on the training device, passes them
through a batch transform (usually `labelfew.views.batched.BatchedTwoViews`) and yields them
in the layout of `labelfew.data.images.collate`.

Stored side (`stored_side`): the training size itself up to 64 px (a 32 px image is kept pixel
for pixel), above that ``round(S / 0.875)``, 256 for 224, the evaluation protocol's resize, so a
full-area crop is still shrunk to ``S`` as from a larger photo. Every image is resized so that its
shorter side is the stored side (bicubic, anti-aliased: Pillow's resize) and centre-cropped to a
square, so for non-square photos the random crops are drawn from the central square (the CPU
path draws them from the whole photo). Square datasets (CIFAR, STL-10, digits) are unaffected.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from labelfew.data.images import BadImage, load_rgb
from labelfew.errors import UserError
from labelfew.views.pil import EVAL_CROP_FRACTION

DEFAULT_MEMORY_BUDGET = 4 * 2**30
"""Bytes of decoded images kept in memory by default (4 GiB: ~21,000 images at 256 px)."""
SMALL_IMAGE_MAX_SIDE = 64
"""Training sizes up to this are stored at the training size itself."""
DEVICE_MEMORY_FRACTION = 0.25
"""A store goes on the GPU when it takes at most this share of the GPU's free memory."""


class BatchTransform(Protocol):
    """uint8 images (batch_size, 3, side, side) -> what the training step reads as ``images``.

    ``generator`` is the CPU generator every random draw of the batch must come from.
    """

    def __call__(self, images: Tensor, generator: torch.Generator) -> Any: ...


def stored_side(image_size: int) -> int:
    """Side of the square stored images for a training size: ``S`` up to 64 px, else ``round(S / 0.875)``."""
    if image_size <= SMALL_IMAGE_MAX_SIDE:
        return image_size
    return round(image_size / EVAL_CROP_FRACTION)


def decoded_bytes(image_count: int, side: int) -> int:
    """Bytes of ``image_count`` decoded RGB uint8 images of ``side x side``."""
    return image_count * 3 * side * side


def fits_in_memory(image_count: int, side: int, budget: int = DEFAULT_MEMORY_BUDGET) -> bool:
    """Whether ``image_count`` images stored at ``side`` take at most ``budget`` bytes."""
    return decoded_bytes(image_count, side) <= budget


@dataclass
class DecodedImages:
    """Decoded images and the files that could not be decoded.

    Attributes:
        images: The decoded images, row ``i`` from ``paths[i]``. Shape: (N, 3, side, side), uint8.
        paths: The files decoded, in row order.
        skipped: ``"path: reason"`` for every file that could not be decoded.
    """

    images: Tensor
    paths: list[Path]
    skipped: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes held by ``images``."""
        return self.images.numel() * self.images.element_size()

    def to(self, device: torch.device | str) -> DecodedImages:
        """The same store with ``images`` moved to ``device``."""
        return DecodedImages(self.images.to(device), self.paths, self.skipped)


def decode_images(
    paths: Sequence[Path],
    side: int,
    budget: int = DEFAULT_MEMORY_BUDGET,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DecodedImages:
    """Decodes every file into a square uint8 image of ``side`` pixels (see the module docstring).

    Args:
        paths: Image files, decoded with `labelfew.data.images.load_rgb`.
        side: Stored side in pixels, usually ``stored_side(image_size)``.
        budget: Largest number of bytes the decoded images may take.
        workers: Decoding threads; None uses every core this process may run on.
        on_progress: Called as ``on_progress(done, total)`` after each chunk of files.

    Returns:
        The decoded images; undecodable files are left out and listed in ``skipped``.

    Raises:
        UserError: No paths, the decoded images would exceed ``budget``, or no file could be
            decoded.
    """
    if not paths:
        raise UserError("No image files to decode; pass a folder that holds images.")
    needed = decoded_bytes(len(paths), side)
    if needed > budget:
        raise UserError(
            f"{len(paths)} images at {side} px need {needed / 2**30:.1f} GiB decoded, more than the "
            f"memory budget of {budget / 2**30:.1f} GiB; raise --memory-budget or use --augment-on workers."
        )
    images = torch.empty(len(paths), 3, side, side, dtype=torch.uint8)
    failures: dict[int, str] = {}
    chunk = 256
    with ThreadPoolExecutor(max_workers=workers or _available_cores()) as pool:
        for start in range(0, len(paths), chunk):
            indices = range(start, min(start + chunk, len(paths)))
            for index, result in zip(
                indices,
                pool.map(_decode_square, [paths[i] for i in indices], [side] * len(indices)),
                strict=True,
            ):
                if isinstance(result, str):
                    failures[index] = result
                else:
                    images[index] = torch.from_numpy(result).permute(2, 0, 1)
            if on_progress is not None:
                on_progress(indices.stop, len(paths))
    if len(failures) == len(paths):
        raise UserError(f"None of the {len(paths)} image files could be decoded, e.g. {failures[0]}")
    kept = [index for index in range(len(paths)) if index not in failures]
    if failures:
        images = images[torch.tensor(kept)]
    return DecodedImages(
        images=images,
        paths=[Path(paths[index]) for index in kept],
        skipped=[failures[index] for index in sorted(failures)],
    )


def _decode_square(path: Path, side: int) -> np.ndarray | str:
    """``(side, side, 3)`` uint8 pixels of the file's central square, or the reason it failed."""
    try:
        image = load_rgb(path)
    except BadImage as error:
        return str(error)
    if image.size != (side, side):
        image = ImageOps.fit(image, (side, side), method=Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Host tensor to ``device``; to a GPU through pinned memory, so the host does not wait."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
    """Shuffled batches of an in-memory uint8 store, transformed on the training device.

    Each epoch is a permutation of the store seeded by ``seed + epoch`` (call `set_epoch`), the
    same on every process, and the transform of each batch draws from a generator seeded by
    (seed, epoch, step, rank), so a run resumed at any step makes the same views as one that
    was never stopped; with ``world_size`` processes each global batch of
    ``batch_size * world_size`` images is split so that process ``rank`` takes its own
    ``batch_size`` rows. The last incomplete global batch is dropped (NT-Xent needs equal
    batches on every process).

    Yields dicts as `labelfew.data.images.collate` does: ``images`` (the transform's output, e.g.
    the two views), ``labels`` (-1), ``indices`` (store rows, on the CPU) and ``bad`` (empty: the
    store holds decoded images only).

    Args:
        images: The store. Shape: (N, 3, side, side), uint8, on the CPU or the training device.
        batch_size: Images per process and step.
        transform: Applied to each uint8 batch on ``device``; None yields the uint8 batch.
        device: Where batches are made; None keeps them on the store's device.
        seed: Seeds the shuffling.
        rank: This process's index.
        world_size: Number of processes.

    Raises:
        UserError: The store holds fewer images than one global batch.
    """

    def __init__(
        self,
        images: Tensor,
        batch_size: int,
        transform: BatchTransform | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
            )
        if images.shape[0] < batch_size * world_size:
            raise UserError(
                f"--batch-size {batch_size * world_size} is larger than the {images.shape[0]} decoded images; "
                f"use at most {images.shape[0]}."
            )
        self.images = images
        self.batch_size = batch_size
        self.transform = transform
        self.device = torch.device(device) if device is not None else images.device
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.first_step = 0

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """Selects the permutation of epoch ``epoch`` (as DistributedSampler.set_epoch).

        ``first_step`` > 0 resumes inside the epoch: the next iteration starts at that batch
        without making the views of the batches before it.
        """
        self.epoch = epoch
        self.first_step = first_step

    def __len__(self) -> int:
        return self.images.shape[0] // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.images.shape[0], generator=generator)
        global_batch = self.batch_size * self.world_size
        first_step, self.first_step = self.first_step, 0
        for step in range(first_step, len(self)):
            start = step * global_batch + self.rank * self.batch_size
            indices = order[start : start + self.batch_size]
            yield {
                "images": self._batch(indices, step),
                "labels": torch.full((self.batch_size,), -1, dtype=torch.long),
                "indices": indices,
                "bad": [],
            }

    def _batch(self, indices: Tensor, step: int) -> Any:
        batch = self.images[_to_device(indices, self.images.device)]
        if batch.device != self.device:
            batch = _to_device(batch, self.device)
        if self.transform is None:
            return batch
        generator = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, step, self.rank))
        return self.transform(batch, generator)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed for the views of one (seed, epoch, step, process); nearby tuples are unrelated."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
