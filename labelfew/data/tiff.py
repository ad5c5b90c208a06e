"""TIFFs that Pillow reads wrongly or not at all, through tifffile (the optional extra ``labelfew[tiff]``).

Pillow reads 8-bit gray, RGB and RGBA/CMYK TIFFs exactly as labelfew always decoded them, so they
stay with it (`labelfew.data.pixels`). tifffile takes the rest: samples deeper than 8 bits
(16-bit, 32-bit, float, in any number), more than 4 samples, and channels stored as pages. The
first series is read; its axes (size-1 axes dropped) must be ``YX`` (one channel), ``YXS``/``YXC``
or ``SYX``/``CYX``/``QYX``/``IYX``: samples, channels, or pages without a named axis are the
image's channels (a microscope's channels saved one page each). Any other layout (a Z stack with
channels, a time series of RGB frames) is a `BadImage` naming its axes. The TIFF Orientation tag
is applied as Pillow applies it (`labelfew.data.pixels.orient_array`). An 8-bit file whose
channels are pages keeps its first page as its RGB (what Pillow, and labelfew before, read), so
the default 3-channel decoding of such a file is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from labelfew.data.pixels import BadImage, RawPixels, orient_array, printable, refuse_bombs

CHANNEL_AXES = "SCQI"
"""tifffile's axis codes read as channels: samples, channels, and unnamed pages (Q, I)."""
_EIGHT_BIT = (np.dtype(np.uint8), np.dtype(bool))


def has_tifffile() -> bool:
    """Whether tifffile can be imported."""
    try:
        import tifffile  # noqa: F401
    except ImportError:
        return False
    return True


def _axes(series: Any) -> str:
    """The series' axes without those of size 1 (Y and X always kept)."""
    sizes = zip(series.axes, series.shape, strict=True)
    return "".join(axis for axis, size in sizes if size > 1 or axis in "YX")


def needs_tifffile(path: Path) -> bool:
    """Whether a TIFF is one Pillow would read wrongly: deeper than 8 bits, more than 4 samples, or
    channels in pages. False without tifffile, and for files tifffile cannot parse (Pillow decides)."""
    if not has_tifffile():
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            axes, dtype = _axes(series), np.dtype(series.dtype)
    except Exception:  # tifffile raises many types on files it cannot parse
        return False
    pillows = axes == "YX" or (axes == "YXS" and series.shape[-1] <= 4)
    return not (dtype in _EIGHT_BIT and pillows)


def read_tiff(path: Path) -> RawPixels:
    """A TIFF's first series as `RawPixels` (see the module docstring).

    Raises:
        BadImage: tifffile cannot read the file, or its axes are not an image with channels.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            sizes = dict(zip(series.axes, series.shape, strict=True))
            refuse_bombs(path, int(sizes.get("Y", 0)) * int(sizes.get("X", 0)))
            data: Any = series.asarray()
            orientation = int(getattr(tiff.pages.first.tags.get("Orientation"), "value", 1) or 1)
    except BadImage:
        raise
    except Exception as error:  # tifffile raises many types on broken files
        raise BadImage(f"{printable(path)}: {error}") from error
    axes = _axes(series)
    data = data.reshape(
        [size for axis, size in zip(series.axes, data.shape, strict=True) if size > 1 or axis in "YX"]
    )
    if axes == "YX":
        data = data[..., None]
    elif len(axes) == 3 and axes[0] in CHANNEL_AXES and axes[1:] == "YX":
        data = np.moveaxis(data, 0, -1)
    elif axes not in ("YXS", "YXC"):
        raise BadImage(
            f"{printable(path)}: a TIFF with axes {axes} {data.shape}; labelfew reads YX with channels"
        )
    data = orient_array(data, orientation if 1 <= orientation <= 8 else 1)
    eight_bit = data.dtype in _EIGHT_BIT
    if eight_bit and data.dtype == bool:
        data = data.astype(np.uint8) * 255
    rgb = np.repeat(data[..., :1], 3, axis=2) if eight_bit and axes[0] in "QI" else None
    return RawPixels(data, deep=not eight_bit, rgb=rgb)


def tiff_extent(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` of a TIFF's first series from tifffile's header (no pixel read), upright."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            sizes = dict(zip(series.axes, series.shape, strict=True))
            orientation = int(getattr(tiff.pages.first.tags.get("Orientation"), "value", 1) or 1)
    except Exception:  # tifffile raises many types on broken files
        return None
    if "Y" not in sizes or "X" not in sizes:
        return None
    height, width = int(sizes["Y"]), int(sizes["X"])
    return (width, height) if 5 <= orientation <= 8 else (height, width)
