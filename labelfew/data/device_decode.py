"""JPEG decoding on the training device, for folders streamed from disk (`--decode-on device`).

The streaming source's workers decode on the CPU at ~224 photos/s each (`labelfew.data.stream`),
which a GPU step at 224 px outruns. Here the workers only read each file's bytes and its header
(format, progressive flag, EXIF orientation: no pixel is decoded), and the training process decodes
the JPEGs of a whole batch in one call of ``torchvision.io.decode_jpeg(list, device="cuda")``
(batched nvJPEG), applies the EXIF orientation and resizes on the device with the same anti-aliased
bicubic as `labelfew.data.images.load_resized`. Files the device decoder cannot take (not a JPEG, a
progressive or CMYK JPEG, a file it refuses) are decoded on the CPU by the one decoder, one by one,
and counted in `DeviceDecodedBatches.cpu_fallbacks`, so the batches hold the same images either way.
nvJPEG decodes to RGB only: a run whose `Decoding` has other than 3 channels decodes every file on
the CPU (JPEGs are 8-bit, so no window is involved). The EXIF orientation is applied on the device
as `labelfew.data.pixels.orient_array` applies it on the CPU (Pillow's ``exif_transpose``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from labelfew.config.training import DECODE_PLACES
from labelfew.data.batches import Batch, EpochOrder
from labelfew.data.images import BadImage, load_resized
from labelfew.data.pixels import EXIF_ORIENTATION
from labelfew.errors import UserError
from labelfew.spec import Decoding
from labelfew.views.config import resized_extent

MAX_ATTEMPTS = 16
"""Consecutive unreadable files a worker skips over before it gives up (as the streaming source)."""


def decode_place(requested: str, device: torch.device, streamed: bool, channels: int = 3) -> str:
    """``cpu`` or ``device``: where the streamed JPEGs of a run are decoded, ``auto`` resolved (the
    device only for RGB: nvJPEG decodes 3-channel JPEGs, so a run of `channels` 1 or N decodes on the CPU).

    Raises:
        UserError: an unknown value, or ``device`` on a machine without CUDA (nvJPEG is CUDA only),
            or ``device`` for a model of other than 3 channels.
    """
    if requested not in DECODE_PLACES:
        raise UserError(f"--decode-on {requested}: use one of {', '.join(DECODE_PLACES)}")
    if requested == "device" and device.type != "cuda":
        raise UserError(
            f"--decode-on device decodes JPEGs with nvJPEG on a CUDA GPU; this run is on {device.type}: "
            "leave --decode-on at auto (or cpu)"
        )
    if requested == "device" and channels != 3:
        raise UserError(
            f"--decode-on device decodes RGB JPEGs with nvJPEG; this run's images have {channels} "
            "channel(s): leave --decode-on at auto (or cpu)"
        )
    if requested == "auto":
        return "device" if device.type == "cuda" and streamed and channels == 3 else "cpu"
    return requested


@dataclass
class RawImage:
    """One file as a worker hands it over: JPEG bytes to decode on the device, or pixels decoded here.

    Attributes:
        index: Dataset index of the file.
        label: Class index, or -1.
        jpeg: The file's bytes (uint8, 1-D) when the device decoder can take it, else None.
        pixels: (height, width, C) uint8 from `load_resized` when it cannot, else None.
        orientation: The EXIF orientation tag (1-8; 1 is upright) of a JPEG.
        bad: Dataset indices of undecodable files skipped on the way to this one.
    """

    index: int
    label: int
    jpeg: Tensor | None = None
    pixels: np.ndarray | None = None
    orientation: int = 1
    bad: list[int] = field(default_factory=list)


def device_decodable(data: bytes) -> tuple[bool, int]:
    """Whether nvJPEG can take these bytes (a baseline RGB or grey JPEG), and their EXIF orientation.

    Reads the header only. Raises `BadImage` when the bytes are not an image Pillow can open.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            baseline = (
                image.format == "JPEG" and not image.info.get("progressive") and image.mode in ("RGB", "L")
            )
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1)) if baseline else 1
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise BadImage(str(error)) from error
    return baseline, orientation if 1 <= orientation <= 8 else 1


class RawFiles(Dataset[RawImage]):
    """Image files read (not decoded) on access, for `DeviceDecodedBatches`; non-JPEGs decoded here.

    A file that cannot be opened is replaced by the next one and reported in ``bad``, as the
    streaming source's `labelfew.data.stream.DecodedFiles` does.

    Args:
        paths: Image files.
        side: The shorter side is shrunk to at most this (on the device for JPEGs).
        labels: Class index of every file, or None.
        decoding: Channels and window of the images; nvJPEG takes JPEGs only when it has 3 channels.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        side: int,
        labels: Sequence[int] | None = None,
        decoding: Decoding = Decoding(),
    ) -> None:
        self.paths, self.side, self.decoding = list(paths), side, decoding
        self.labels = list(labels) if labels is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> RawImage:
        label = self.labels[index] if self.labels is not None else -1
        try:
            data = self.paths[index].read_bytes()
        except OSError as error:
            raise BadImage(f"{self.paths[index]}: {error}") from error
        try:
            baseline, orientation = device_decodable(data) if self.decoding.channels == 3 else (False, 1)
        except BadImage:  # not a file Pillow opens (a DICOM, a TIFF for tifffile): the CPU decoder decides
            baseline, orientation = False, 1
        if not baseline:
            pixels = load_resized(self.paths[index], self.side, decoding=self.decoding)
            return RawImage(index, label, pixels=pixels)
        jpeg = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return RawImage(index, label, jpeg=jpeg, orientation=orientation)

    def __getitem__(self, index: int) -> RawImage:
        bad: list[int] = []
        for attempt in range(MAX_ATTEMPTS):
            current = (index + attempt) % len(self.paths)
            try:
                item = self._read(current)
            except BadImage:
                bad.append(current)
                continue
            item.bad = bad
            return item
        raise RuntimeError(f"{MAX_ATTEMPTS} consecutive files from {self.paths[index]} could not be read")


def orient(image: Tensor, orientation: int) -> Tensor:
    """``image`` (C, H, W) turned upright by its EXIF orientation, as Pillow's ``exif_transpose``."""
    if orientation in (2, 4, 5, 7):  # the mirrored ones: flip left-right first
        image = image.flip(-1)
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)  # counter-clockwise quarter turns
    return torch.rot90(image, turns, dims=(-2, -1)) if turns else image


def shrink(image: Tensor, side: int) -> Tensor:
    """``image`` (C, H, W) uint8 with its shorter side shrunk to ``side``: `load_resized`'s resize."""
    height, width = image.shape[-2:]
    if min(height, width) <= side:
        return image
    size = resized_extent(int(height), int(width), side)
    return functional.interpolate(image.unsqueeze(0), size=size, mode="bicubic", antialias=True)[0]


def decode_jpegs(jpegs: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """Decodes JPEG bytes on ``device`` in one batched call; per file where the batch fails.

    nvJPEG returns nothing when one file of a batch fails, so a failed batch is retried file by
    file, and a file that fails alone comes back as None (the caller decodes it on the CPU).
    """
    if not jpegs:
        return []
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated (for TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return _decode(jpegs, device, decode_jpeg, ImageReadMode.RGB)


def _decode(jpegs: list[Tensor], device: torch.device, decode_jpeg: Any, mode: Any) -> list[Tensor | None]:
    try:
        return list(decode_jpeg(jpegs, mode=mode, device=device))
    except RuntimeError:
        decoded: list[Tensor | None] = []
        for jpeg in jpegs:
            try:
                decoded.append(decode_jpeg(jpeg, mode=mode, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def pad_on_device(images: list[Tensor], device: torch.device, channels: int = 3) -> tuple[Tensor, Tensor]:
    """`labelfew.data.batches.pad_images` for (C, h, w) tensors already on ``device``."""
    sizes = torch.tensor([tuple(image.shape[1:]) for image in images], dtype=torch.int64).reshape(-1, 2)
    height, width = (int(value) for value in sizes.max(dim=0).values) if images else (0, 0)
    channels = int(images[0].shape[0]) if images else channels
    batch = torch.zeros(len(images), channels, height, width, dtype=torch.uint8, device=device)
    for row, image in enumerate(images):
        batch[row, :, : image.shape[1], : image.shape[2]] = image
    return batch, sizes


class DeviceDecodedBatches:
    """The streaming source with JPEGs decoded on the training device; an `EpochBatches`.

    The same batches, in the same `EpochOrder`, as `labelfew.data.stream.StreamBatches` (the
    pixels within the decoders' rounding), so a run can switch between the two.

    Args:
        files: The files the workers read.
        order: Which dataset indices each step takes (its batch sampler).
        device: Where the JPEGs are decoded and the batches delivered.
        workers: DataLoader worker processes (0 reads in this process).

    Attributes:
        cpu_fallbacks: Files decoded on the CPU so far (not a baseline JPEG, or refused by the
            device decoder).
        device_decoded: Files decoded on the device so far.
    """

    def __init__(self, files: RawFiles, order: EpochOrder, device: torch.device | str, workers: int) -> None:
        self.files, self.order, self.device = files, order, torch.device(device)
        self.cpu_fallbacks = self.device_decoded = 0
        extra = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
        self.loader: DataLoader[RawImage] = DataLoader(
            files,
            batch_sampler=order,
            num_workers=workers,
            collate_fn=list,
            **extra,  # type: ignore[arg-type]
        )

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """Selects epoch ``epoch``; the next iteration starts at step ``first_step``."""
        self.order.set_epoch(epoch, first_step)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[Batch]:
        first_step = self.order.first_step
        for step, items in enumerate(self.loader, start=first_step):
            batch = self.decode(items)
            batch.seed = self.order.view_seed(step)
            yield batch

    def decode(self, items: list[RawImage]) -> Batch:
        """One batch from the workers' items: JPEGs decoded, turned upright and shrunk on the device.

        A file that neither decoder can read (a JPEG whose header opens but whose data is
        truncated) is replaced by another image of the batch and reported in ``bad``, so that
        batch sizes stay fixed, as the CPU stream replaces it by the next decodable file.
        """
        jpeg_rows = [row for row, item in enumerate(items) if item.jpeg is not None]
        decoded = decode_jpegs([items[row].jpeg for row in jpeg_rows], self.device)  # type: ignore[misc]
        on_device = dict(zip(jpeg_rows, decoded, strict=True))
        images: list[Tensor | None] = [
            self._image(item, on_device.get(row)) for row, item in enumerate(items)
        ]
        bad = [index for item in items for index in item.bad]
        readable = [row for row, image in enumerate(images) if image is not None]
        if not readable:
            raise RuntimeError(
                f"no file of a batch could be decoded, from {self.files.paths[items[0].index]}"
            )
        indices = [item.index for item in items]
        for row, image in enumerate(images):
            if image is None:
                bad.append(items[row].index)
                images[row], indices[row] = images[readable[0]], indices[readable[0]]
        padded, sizes = pad_on_device([image for image in images if image is not None], self.device)
        labels = [items[indices.index(index)].label for index in indices]
        return Batch(
            images=padded,
            sizes=sizes,
            indices=torch.tensor(indices, dtype=torch.int64),
            labels=None if all(label < 0 for label in labels) else torch.tensor(labels, device=self.device),
            bad=bad,
        )

    def _image(self, item: RawImage, decoded: Tensor | None) -> Tensor | None:
        """``item``'s image on the device (C, h, w): decoded there, or on the CPU when it is not a
        baseline JPEG or the device decoder refused it; None when it cannot be decoded at all."""
        if decoded is not None:
            self.device_decoded += 1
            return shrink(orient(decoded, item.orientation), self.files.side)
        pixels = item.pixels
        if pixels is None:
            try:
                pixels = load_resized(
                    self.files.paths[item.index], self.files.side, decoding=self.files.decoding
                )
            except BadImage:
                return None
        self.cpu_fallbacks += 1
        return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).to(self.device)
