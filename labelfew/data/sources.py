"""Which image source a stage trains from, and building it: the store when it fits, else the stream.

``device`` (`--augment-on device`): every image decoded once into memory
(`labelfew.data.store`); ``workers``: DataLoader workers decode and resize each batch
(`labelfew.data.stream`), for folders of any size. Both deliver the same uint8 batches in the
same order, and the views are made from them on the training device either way
(`labelfew.views`), so the choice changes the speed, not the training: for a seed both give the
same views. ``auto`` picks ``device`` when the decoded images fit the memory budget.

A streamed source decodes each batch's JPEGs on the CPU in its workers, or (``--decode-on device``)
on the training GPU with nvJPEG while the workers only read the files (`labelfew.data.device_decode`).
Every source decodes with the run's `labelfew.spec.Decoding` (channels and window).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from labelfew.data.batches import EpochBatches, EpochOrder
from labelfew.data.device_decode import DeviceDecodedBatches, RawFiles, decode_place
from labelfew.data.images import printable
from labelfew.data.store import MemoryBatches, decode_images, fits_in_memory, store_device, stored_side
from labelfew.data.stream import DecodedFiles, StreamBatches
from labelfew.errors import UserError
from labelfew.spec import Decoding

AUGMENT_PLACES = ("auto", "device", "workers")
"""``--augment-on`` values: ``device`` is the in-memory store, ``workers`` the streaming source."""


def augment_place(
    requested: str,
    budget_gib: float,
    paths: Sequence[Path],
    image_size: int,
    decode_on: str = "auto",
    decoding: Decoding = Decoding(),
) -> str:
    """The image source, ``device`` (in-memory store) or ``workers`` (streaming), ``auto`` resolved.

    ``auto`` streams when `--decode-on device` is asked for: only a streamed source decodes per batch.

    Raises:
        UserError: An unknown place or a budget that is not positive.
    """
    if requested not in AUGMENT_PLACES:
        raise UserError(f"--augment-on {requested}: use one of {', '.join(AUGMENT_PLACES)}")
    if budget_gib <= 0:
        raise UserError(f"--memory-budget {budget_gib}: give a positive size in GiB (default 4)")
    if requested != "auto":
        return requested
    if decode_on == "device":
        return "workers"
    fits = fits_in_memory(paths, stored_side(image_size), int(budget_gib * 2**30), decoding.channels)
    return "device" if fits else "workers"


def check_decode_on(decode_on: str, augment_on: str, device: torch.device) -> None:
    """Refuses a `--decode-on` that no image can make right, before any image is opened.

    Raises:
        UserError: an unknown value, ``device`` without CUDA (nvJPEG is CUDA only), or ``device``
            with `--augment-on device`, whose store decodes every image once before training.
    """
    decode_place(decode_on, device, streamed=augment_on != "device")
    if decode_on == "device" and augment_on == "device":
        raise UserError(
            "--decode-on device decodes the batches of a streamed source, but --augment-on device decodes "
            "every image once into memory: drop one of the two (or pass --augment-on workers)"
        )


def decode_record(batches: EpochBatches) -> dict[str, int]:
    """run.json's counts of the files decoded on the device and on the CPU, when the device decoded."""
    if not isinstance(batches, DeviceDecodedBatches):
        return {}
    return {"device_decoded": batches.device_decoded, "cpu_fallbacks": batches.cpu_fallbacks}


def training_batches(
    paths: Sequence[Path],
    place: str,
    image_size: int,
    order: EpochOrder,
    accelerator: Any,
    budget_gib: float,
    workers: int = 0,
    labels: Sequence[int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    decode_on: str = "cpu",
    decoding: Decoding = Decoding(),
) -> tuple[EpochBatches, list[str]]:
    """This process's training batches from ``place`` (resolved), and the files found undecodable.

    ``device``: the images are decoded once (threads, a progress bar on the main process) and kept
    on the GPU when they take at most a quarter of its free memory, else in host memory; every
    process holds them all and takes its share of each global batch. ``workers``: DataLoader
    workers decode each batch (or, with ``decode_on`` ``device``, only read the files, and the JPEGs
    of each batch are decoded on the accelerator's device); undecodable files are then found during
    training and reported by the trainer.

    Args:
        paths: Image files.
        place: ``device`` or ``workers``.
        image_size: Training size; images are stored at `labelfew.data.store.stored_side`.
        order: The seeded order of the batches (its ``count`` is ``len(paths)``).
        accelerator: The run's Accelerator (its device).
        budget_gib: The memory budget of the store, in GiB.
        workers: Streaming DataLoader workers (0 decodes in the training process).
        labels: Class index of every file, or None.
        on_progress: Progress callback of the decoding (`decode_progress`), or None.
        decode_on: Where a streamed source decodes, ``cpu`` or ``device`` (`check_decode_on`).
        decoding: Channels and window of the decoded images (`labelfew.data.pixels`).
    """
    side = stored_side(image_size)
    if place == "workers" and decode_on == "device":
        raw = RawFiles(paths, side, labels, decoding)
        return DeviceDecodedBatches(raw, order, accelerator.device, workers), []
    if place == "workers":
        files = DecodedFiles(paths, side, labels, decoding=decoding)
        return StreamBatches(files, order, accelerator.device, workers), []
    budget = int(budget_gib * 2**30)
    store = decode_images(paths, side, budget=budget, on_progress=on_progress, decoding=decoding)
    store = store.to(store_device(store.nbytes, accelerator.device))
    kept_labels = None
    if labels is not None:
        row_of = {path: row for row, path in enumerate(paths)}
        kept_labels = torch.tensor([labels[row_of[path]] for path in store.paths], dtype=torch.int64)
    order.count = len(store)
    kept = set(store.paths)
    return MemoryBatches(store, order, accelerator.device, kept_labels), [
        printable(p) for p in paths if p not in kept
    ]


def decode_progress(console: Console) -> Callable[[int, int], None]:
    """A progress callback for `decode_images` that shows a bar on ``console``."""
    progress = Progress(
        TextColumn("[bold]decode"), BarColumn(), TextColumn("{task.completed}/{task.total} images"),
        TimeElapsedColumn(), console=console, transient=True,
    )  # fmt: skip
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("decode", total=total)
        progress.update(task, completed=done)
        if done >= total:
            progress.stop()

    return update
