"""What a folder of images is, from a seeded sample: channels, bit depth and window, mean and std.

`survey_images` reads a seeded sample of the files once (`labelfew.data.pixels.read_raw`) and keeps
a seeded sample of each file's pixels, then answers:

- **channels** for ``--channels auto``: 1 when every sampled image is single-channel, else 3. Files
  with more than 3 channels are reported (``multichannel``) so the stage can say ``pass --channels
  N``; a folder whose files disagree on a count above 3 is a `UserError` naming two of them.
- **window**: whether any sampled image is deeper than 8 bits, and then the (0.5%, 99.5%)
  percentiles of the deep images' values (DICOM files that bring their own window are left out
  when those windows are used). Every deep image gives the same number of pixels (``pixels``, drawn
  uniformly with replacement by a seeded generator), so a large image does not outweigh a small one.
- **mean and std** per channel in [0, 1] of the sampled pixels decoded exactly as training decodes
  them (`labelfew.data.pixels.decoded`, which works pixel by pixel, on the sampled pixels).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelfew.data.pixels import PERCENTILES, BadImage, RawPixels, decoded, printable, read_raw
from labelfew.errors import UserError
from labelfew.spec import Decoding

SURVEY_SAMPLE = 256
"""Files a survey reads by default."""
SURVEY_PIXELS = 4096
"""Pixels a survey keeps from each file by default."""
SURVEY_DRAFT = 256
"""JPEGs are surveyed at a power-of-two reduction with sides of at least this (`read_raw`'s
``draft``): their channel count is in the header and their mean/std barely move at 1/8 scale."""


@dataclass(frozen=True)
class ImageSurvey:
    """What `survey_images` found (recorded in run.json with `record`).

    Attributes:
        sampled: Files read.
        channels: The channel count to decode with: the one asked for, else 1 or 3 (auto).
        multichannel: The channel count of the sampled files with more than 3, or None.
        deep: Some sampled file is deeper than 8 bits.
        window: The window to decode with: the one asked for, else the deep files' (0.5%, 99.5%)
            percentiles, or None when nothing is deep.
        file_windows: DICOM files' own windows are used where present.
        mean, std: Per-channel mean and standard deviation in [0, 1] of the decoded sample
            (``channels`` entries; empty when no file could be decoded at ``channels``).
        unreadable: ``"path: reason"`` of the sampled files that could not be read or decoded.
        seed: The seed of the file and pixel samples.
    """

    sampled: int
    channels: int
    multichannel: int | None
    deep: bool
    window: tuple[float, float] | None
    file_windows: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    unreadable: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def decoding(self) -> Decoding:
        """The `Decoding` the survey's statistics were computed with."""
        return Decoding(self.channels, self.window, self.file_windows)

    def describe(self, asked_window: bool) -> str | None:
        """The stage's line about its input, or None for 8-bit RGB with nothing to say.

        Args:
            asked_window: The window was given with `--window` (not the sample's percentiles).
        """
        parts = []
        if self.channels != 3:
            parts.append(f"{self.channels} channel{'s' if self.channels > 1 else ''}")
        if self.deep and self.window is not None:
            low, high = self.window
            origin = "--window" if asked_window else (
                f"the {PERCENTILES[0]:g}/{PERCENTILES[1]:g} percentiles of {self.sampled} sampled files")  # fmt: skip
            parts.append(f"values {low:g} to {high:g} mapped to 0-255 ({origin})")
        elif self.deep:
            parts.append("DICOM files' own windows")
        return "input: " + "; ".join(parts) if parts else None

    def record(self) -> dict[str, Any]:
        """The survey as JSON-ready values for run.json."""
        record = asdict(self)
        record["window"] = None if self.window is None else list(self.window)
        record["mean"], record["std"] = list(self.mean), list(self.std)
        return record


def survey_images(
    paths: Sequence[Path],
    channels: int | None = None,
    window: tuple[float, float] | None = None,
    file_windows: bool = True,
    sample: int = SURVEY_SAMPLE,
    seed: int = 0,
    pixels: int = SURVEY_PIXELS,
) -> ImageSurvey:
    """Surveys a seeded sample of ``paths`` (see the module docstring).

    Args:
        paths: Image files.
        channels: The channel count asked for, or None for auto (1 or 3).
        window: The window asked for (``--window``), or None to take the deep files' percentiles.
        file_windows: Whether DICOM files' own windows are used where present.
        sample: Files to read (all of them when there are fewer).
        seed: Seed of the file sample and of each file's pixel sample.
        pixels: Pixels kept from each file.

    Raises:
        UserError: files with more than 3 channels whose counts differ (naming two of them).
    """
    chosen = random.Random(seed).sample(sorted(paths), min(sample, len(paths)))
    generator = np.random.default_rng(seed)
    kept: list[tuple[Path, RawPixels]] = []
    unreadable: list[str] = []
    for path in chosen:
        try:
            raw = read_raw(path, draft=SURVEY_DRAFT)
        except BadImage as error:
            unreadable.append(str(error))
            continue
        height, width = raw.values.shape[:2]
        kept.append((path, raw.at(generator.integers(0, height * width, size=pixels))))
    multichannel = _multichannel(kept)
    resolved = channels or (1 if kept and all(raw.channels == 1 for _, raw in kept) else 3)
    deep = any(raw.deep for _, raw in kept)
    if window is None and deep:
        window = _percentiles([raw for _, raw in kept if raw.deep and (raw.voi is None or not file_windows)])
    decoding = Decoding(resolved, window, file_windows)
    mean, std = _moments(kept, decoding, unreadable)
    return ImageSurvey(
        len(chosen), resolved, multichannel, deep, window, file_windows, mean, std, unreadable, seed
    )


def _multichannel(kept: list[tuple[Path, RawPixels]]) -> int | None:
    """The count of the files with more than 3 channels; a UserError when files disagree on one."""
    counts: dict[int, Path] = {}
    for path, raw in kept:
        counts.setdefault(raw.channels if raw.channels > 3 else 3, path)
    many = sorted(count for count in counts if count > 3)
    if len(counts) > 1 and many:
        first, second = many[:2] if len(many) > 1 else (3, many[0])
        one, other = counts[first], counts[second]
        raise UserError(
            f"the images have different channel counts: {printable(one)} has {_channels(first)}, "
            f"{printable(other)} has {_channels(second)}; put images of one channel count in a folder"
        )
    return many[0] if many else None


def _channels(count: int) -> str:
    return f"{count} channels" if count > 3 else "1 or 3 channels"


def _percentiles(raws: list[RawPixels]) -> tuple[float, float] | None:
    if not raws:
        return None
    values = np.concatenate([raw.values.astype(np.float64).ravel() for raw in raws])
    low, high = np.percentile(values, PERCENTILES)
    return float(low), float(high)


def _moments(
    kept: list[tuple[Path, RawPixels]], decoding: Decoding, unreadable: list[str]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of the sampled pixels decoded by `decoding`."""
    total = np.zeros(decoding.channels)
    squares = np.zeros(decoding.channels)
    count = 0
    for path, raw in kept:
        try:
            values = decoded(raw, decoding, path).reshape(-1, decoding.channels).astype(np.float64) / 255.0
        except BadImage as error:
            unreadable.append(str(error))
            continue
        total += values.sum(axis=0)
        squares += (values**2).sum(axis=0)
        count += len(values)
    if not count:
        return (), ()
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(float(value) for value in mean), tuple(float(value) for value in std)
