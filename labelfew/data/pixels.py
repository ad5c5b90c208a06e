"""Decoding any image file into the model's 8-bit pixels: ``(height, width, C)`` uint8 (`Decoding`).

A file is read once into `RawPixels` (`read_raw`): its values before any window, with as many
channels as the file really has, then windowed to 8 bits and converted to ``decoding.channels``
(`decoded`). The rules:

- **8-bit images** (JPEG, PNG, GIF, 8-bit TIFF, ...) give exactly the pixels labelfew always gave
  them: turned upright by their EXIF orientation (the labelling page's browser does the same, so a
  person and the model see one photo), palette and alpha composited on white, CMYK converted by
  Pillow. No window touches them.
- **Deep images** (16-bit and 32-bit integer, float: PNG ``I;16``/``I``/``F``, PGM, TIFF, DICOM) go
  through the window ``(low, high)``: ``low`` -> 0, ``high`` -> 255, linear, clipped, rounded
  (`apply_window`). ``window=None`` takes the image's own (0.5%, 99.5%) percentiles (`own_window`);
  the stages always pass the dataset's window (`labelfew.data.survey`), so every image of a run
  shares one scale.
- **Channels**: 1 keeps gray images as they are and turns colour into luma (Pillow's ``L``:
  ``(299 R + 587 G + 114 B) / 1000``); 3 copies gray into three channels (as always); N takes only
  files with exactly N channels (multi-channel TIFF: Pillow when it can, else ``tifffile``). Any
  other count is a `BadImage` naming it. A TIFF's channels are its samples (an RGBA TIFF has 4)
  or its pages (`labelfew.data.tiff`).
- **DICOM** (``.dcm``/``.dicom``, or the ``DICM`` preamble; needs ``labelfew[dicom]``): the pixel
  data times RescaleSlope plus RescaleIntercept; the file's first WindowCenter/WindowWidth, by
  DICOM's VOI formula (PS3.3 C.11.2.1.2, `VoiWindow`), when ``decoding.file_windows``; MONOCHROME1
  inverted after windowing. Multi-frame files are refused (a `BadImage` naming the frame count):
  a CT or MR series stored as one file is a volume, not a set of independent images. Compressed
  pixel data that pydicom cannot decode without a plugin is a `BadImage` naming the plugins.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from labelfew.errors import UserError
from labelfew.spec import Decoding

# Pillow refuses images above ~179 MPixel (2 x MAX_IMAGE_PIXELS) as decompression bombs; keep
# that limit and turn its warning zone into an error so that one huge file cannot exhaust memory.
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

PERCENTILES = (0.5, 99.5)
"""The percentiles of a deep image's values that map to 0 and 255 when no window is given."""
DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
"""Pillow modes deeper than 8 bits (their values are windowed)."""
GRAY_MODES = frozenset({"1", "L", "LA", "La"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
DICOM_INSTALL = "pip install 'labelfew[dicom]'"
TIFF_INSTALL = "pip install 'labelfew[tiff]'"
DICOM_PLUGINS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or: pip install python-gdcm)"
"""pydicom's pixel-data plugins for JPEG, JPEG-LS and JPEG 2000 transfer syntaxes."""
EXIF_ORIENTATION = 0x0112
"""The EXIF tag that says how a camera held sideways stored its pixels (1 = as stored)."""
_PILLOW_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)  # fmt: skip


class BadImage(Exception):
    """A file that exists but cannot be decoded as an image (or not into the channels asked for)."""


def printable(path: Path | str) -> str:
    """`path` as text that any terminal, CSV or JSON file can hold.

    A file name that is not valid UTF-8 comes from the filesystem with surrogate escapes
    (`os.fsdecode`), which raise UnicodeEncodeError when printed or written as UTF-8; its
    undecodable bytes are shown as ``\\xNN`` instead. Every other name is unchanged.
    """
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class VoiWindow:
    """A DICOM file's own window (VOI LUT function LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    function: str = "LINEAR"

    def apply(self, values: np.ndarray) -> np.ndarray:
        """`values` (rescaled) through the window to 8 bits, as DICOM's formula with output 0-255."""
        x, c, w = values.astype(np.float64), self.center, self.width
        if self.function == "SIGMOID":
            y = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / max(w, 1e-12)))
        elif self.function == "LINEAR_EXACT":
            y = ((x - c) / max(w, 1e-12) + 0.5) * 255.0
        elif w <= 1:  # LINEAR's width is at least 1; width 1 is a threshold
            y = np.where(x > c - 0.5, 255.0, 0.0)
        else:
            y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class RawPixels:
    """One file's values before windowing (`read_raw`).

    Attributes:
        values: Shape (height, width, S), S the file's own channel count: uint8 for 8-bit files,
            any integer or float dtype for deep ones.
        deep: The values are deeper than 8 bits and go through a window.
        rgb: An 8-bit colour file as 8-bit RGB (alpha on white, CMYK converted), or None.
        voi: A DICOM file's own window, or None.
        invert: MONOCHROME1 (DICOM): the windowed values are inverted.
    """

    values: np.ndarray
    deep: bool
    rgb: np.ndarray | None = None
    voi: VoiWindow | None = None
    invert: bool = False

    @property
    def channels(self) -> int:
        """The file's own channel count (1 for gray, 3 for colour, N for a multi-channel TIFF)."""
        return int(self.values.shape[2])

    def at(self, flat_indices: np.ndarray) -> RawPixels:
        """Only the pixels at `flat_indices` (row-major), as a 1-row image (for sampled statistics)."""
        height, width = self.values.shape[:2]
        rows, cols = np.unravel_index(flat_indices, (height, width))
        rgb = None if self.rgb is None else self.rgb[rows, cols][None]
        return RawPixels(self.values[rows, cols][None], self.deep, rgb, self.voi, self.invert)


def refuse_bombs(path: Path, pixels: int) -> None:
    """Pillow's decompression-bomb limit for the decoders that are not Pillow (tifffile, pydicom).

    Raises:
        BadImage: `pixels` is more than ``MAX_IMAGE_PIXELS``.
    """
    if pixels > MAX_IMAGE_PIXELS:
        raise BadImage(f"{printable(path)}: {pixels} pixels, more than the limit of {MAX_IMAGE_PIXELS}")


def apply_window(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``round((v - low) * 255 / (high - low))`` clipped to 0-255, as uint8; ``high <= low``: a threshold at ``low``."""
    low, high = float(window[0]), float(window[1])
    if high <= low:
        return np.where(values > low, 255, 0).astype(np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def own_window(values: np.ndarray, limit: int = 1 << 20) -> tuple[float, float]:
    """An image's (0.5%, 99.5%) percentiles, from every k-th row and column (at most ~`limit` values)."""
    step = max(1, int(np.ceil(np.sqrt(values.shape[0] * values.shape[1] / limit))))
    low, high = np.percentile(values[::step, ::step].astype(np.float64), PERCENTILES)
    return float(low), float(high)


def read_raw(path: Path, draft: int | None = None) -> RawPixels:
    """The file's values before windowing; see the module docstring for the rules.

    ``draft``: a JPEG may be decoded at a power-of-two reduction whose sides stay at least this
    (libjpeg's DCT scaling, Pillow's ``draft``): what a survey of a folder of large photos needs,
    8-64x faster; training never passes it.

    Raises:
        BadImage: the file is empty, truncated, not an image, a decompression bomb, unreadable, a
            multi-frame or plugin-compressed DICOM, or needs a missing optional package.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
        from labelfew.data.dicom import read_dicom

        return read_dicom(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        from labelfew.data.tiff import has_tifffile, needs_tifffile, read_tiff

        if needs_tifffile(path):
            return read_tiff(path)
    try:
        return _read_pillow(path, draft)
    except _PILLOW_ERRORS as error:
        if path.suffix.lower() in TIFF_SUFFIXES and has_tifffile():
            return read_tiff(path)  # e.g. 4 gray samples, which Pillow has no mode for
        if path.suffix.lower() in TIFF_SUFFIXES:
            raise BadImage(
                f"{printable(path)}: {error} (a TIFF Pillow cannot read: {TIFF_INSTALL})"
            ) from error
        raise BadImage(f"{printable(path)}: {error}") from error


def decoded(raw: RawPixels, decoding: Decoding, path: Path | str = "") -> np.ndarray:
    """`raw` windowed to 8 bits and converted to ``decoding.channels``: ``(height, width, C)`` uint8.

    Raises:
        BadImage: the file's channel count cannot become ``decoding.channels``.
    """
    if raw.voi is not None and decoding.file_windows:
        eight = raw.voi.apply(raw.values)
    elif raw.deep:
        eight = apply_window(raw.values, decoding.window or own_window(raw.values))
    else:
        eight = raw.values.astype(np.uint8, copy=False)
    if raw.invert:
        eight = 255 - eight
    return _to_channels(eight, raw.rgb if not raw.deep else None, decoding.channels, path)


def _to_channels(eight: np.ndarray, rgb: np.ndarray | None, channels: int, path: Path | str) -> np.ndarray:
    own = eight.shape[2]
    if channels == 1 and own == 1:
        return eight
    if channels == 1 and (rgb is not None or own == 3):
        return np.asarray(Image.fromarray(rgb if rgb is not None else eight, "RGB").convert("L"))[..., None]
    if channels == 3 and rgb is not None:
        return rgb
    if channels == 3 and own == 1:
        return np.repeat(eight, 3, axis=2)
    if channels == own:
        return eight
    reads = f"--channels {own}" if own > 3 else "--channels 1 or 3"
    raise BadImage(
        f"{printable(path)}: {own} channel(s), but images are decoded to {channels} ({reads} reads it)"
    )


def decode_array(path: Path, decoding: Decoding = Decoding()) -> np.ndarray:
    """The file decoded to ``(height, width, decoding.channels)`` uint8 (`read_raw`, then `decoded`).

    Raises:
        BadImage: as `read_raw` and `decoded`.
    """
    return decoded(read_raw(path), decoding, path)


def display_image(path: Path, decoding: Decoding = Decoding()) -> Image.Image:
    """The image as a person should see it through the model's `decoding`: mode ``L`` for 1 channel,
    ``RGB`` for 3, the first three channels as ``RGB`` for N > 3 (the first channel as ``L`` for 2).

    Raises:
        BadImage: as `decode_array`.
    """
    pixels = decode_array(path, decoding)
    if pixels.shape[2] >= 3:
        return Image.fromarray(np.ascontiguousarray(pixels[..., :3]), "RGB")
    return Image.fromarray(np.ascontiguousarray(pixels[..., 0]), "L")


def header_extent(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` from the file's header, upright as `read_raw` decodes it, or None."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
        from labelfew.data.dicom import dicom_extent

        return dicom_extent(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if _orientation(image) >= 5:  # a quarter turn: the decoder swaps the sides
                width, height = height, width
        return height, width
    except (*_PILLOW_ERRORS, BadImage):
        pass
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    from labelfew.data.tiff import has_tifffile, tiff_extent

    return tiff_extent(path) if has_tifffile() else None


def check_decoders(paths: list[Path]) -> None:
    """Refuses, before any long work, a folder whose DICOM files cannot be read for want of pydicom.

    Raises:
        UserError: a ``.dcm`` file is among `paths` and pydicom is not installed.
    """
    dicoms = [path for path in paths if path.suffix.lower() in DICOM_SUFFIXES]
    if not dicoms:
        return
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise UserError(
            f"{len(dicoms)} DICOM file(s), e.g. {printable(dicoms[0])}, need pydicom: {DICOM_INSTALL}"
        ) from None


def _read_pillow(path: Path, draft: int | None = None) -> RawPixels:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            opened.seek(0)
            if draft is not None and opened.format == "JPEG":
                opened.draft(opened.mode, (draft, draft))
            opened.load()
            kind = opened.format
            image = _upright(opened)
            if image.mode in DEEP_MODES:
                return RawPixels(np.asarray(image)[..., None], deep=True)
            rgb = np.array(_to_rgb(image), dtype=np.uint8)
            if image.mode in GRAY_MODES:
                return RawPixels(np.ascontiguousarray(rgb[..., :1]), deep=False)
            if kind == "TIFF" and image.mode in ("RGBA", "CMYK"):  # a TIFF's channels are its samples
                return RawPixels(np.array(image, dtype=np.uint8), deep=False, rgb=rgb)
            return RawPixels(rgb, deep=False, rgb=rgb)


def _orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 when absent or unreadable (malformed metadata is not fatal)."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # Pillow raises several types on malformed EXIF; the pixels are still good
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(image: Image.Image) -> Image.Image:
    """The image as its EXIF orientation says it was taken (`PIL.ImageOps.exif_transpose`).

    Phone photos are stored sideways with an orientation tag; the labelling page's browser honours
    it, so the model sees the same upright photo the person labelled.
    """
    if _orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def orient_array(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """``pixels`` (height, width, ...) turned upright by an EXIF/TIFF orientation, as ``exif_transpose``."""
    if orientation in (2, 4, 5, 7):  # the mirrored ones: flip left-right first
        pixels = pixels[:, ::-1]
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(pixels, turns, axes=(0, 1)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit image as RGB: palette and alpha composited on white, every other mode by Pillow."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _has_dicom_preamble(path: Path) -> bool:
    """Whether the file starts with DICOM's 128-byte preamble and ``DICM`` (false for any other image)."""
    if path.suffix.lower() not in ("", ".ima", ".img"):
        return False  # a named image format: never read twice
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False
