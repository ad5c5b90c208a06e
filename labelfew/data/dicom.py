"""DICOM files through pydicom (the optional extra ``labelfew[dicom]``), as `labelfew.data.pixels.RawPixels`.

The pixel data times RescaleSlope plus RescaleIntercept (the modality LUT's linear form, in the
units the window is given in); the file's own window (the first WindowCenter/WindowWidth when
several are given, with its VOILUTFunction); MONOCHROME1 marked for inversion after windowing.
Multi-frame files are refused with their frame count; compressed pixel data that pydicom cannot
decode without a plugin is refused naming the plugins. A VOI or modality LUT *sequence* (a table
rather than a window or a slope) is not applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from labelfew.data.pixels import (
    DICOM_INSTALL,
    DICOM_PLUGINS,
    BadImage,
    RawPixels,
    VoiWindow,
    printable,
    refuse_bombs,
)


def _pydicom(path: Path) -> Any:
    try:
        import pydicom
    except ImportError:
        raise BadImage(f"{printable(path)}: a DICOM file needs pydicom: {DICOM_INSTALL}") from None
    return pydicom


def _dataset(path: Path, pixels: bool) -> Any:
    pydicom = _pydicom(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as error:  # pydicom raises InvalidDicomError, OSError, ValueError, ...
        raise BadImage(f"{printable(path)}: not a readable DICOM file ({error})") from error


def dicom_extent(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` from a DICOM header (Rows, Columns), or None."""
    try:
        dataset = _dataset(path, pixels=False)
        return int(dataset.Rows), int(dataset.Columns)
    except (BadImage, AttributeError, TypeError, ValueError):
        return None


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued element, as a float."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[0])


def file_window(dataset: Any) -> VoiWindow | None:
    """The dataset's own window: its first WindowCenter and WindowWidth and VOILUTFunction, or None."""
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    try:
        center, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(dataset.get("VOILUTFunction", "") or "LINEAR").upper()
    return VoiWindow(center, width, function if function in ("LINEAR_EXACT", "SIGMOID") else "LINEAR")


def _pixel_array(dataset: Any, path: Path) -> np.ndarray:
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        return np.asarray(dataset.pixel_array)
    except Exception as error:  # pydicom raises RuntimeError, NotImplementedError, ValueError, ...
        if syntax is not None and syntax.is_compressed:
            raise BadImage(
                f"{printable(path)}: pixel data compressed as {syntax.name}, which pydicom cannot decode "
                f"without a plugin: {DICOM_PLUGINS}"
            ) from error
        raise BadImage(f"{printable(path)}: DICOM pixel data cannot be decoded ({error})") from error


def read_dicom(path: Path) -> RawPixels:
    """One single-frame DICOM file's values (see the module docstring).

    Raises:
        BadImage: pydicom missing, not a DICOM file, no pixel data, several frames, or pixel data
            pydicom cannot decode (naming the plugins when it is compressed).
    """
    dataset = _dataset(path, pixels=True)
    if "PixelData" not in dataset:
        raise BadImage(f"{printable(path)}: a DICOM file without pixel data")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadImage(
            f"{printable(path)}: a multi-frame DICOM ({frames} frames); labelfew reads single-frame "
            "files (save each frame, or slice, as its own file)"
        )
    refuse_bombs(path, int(dataset.get("Rows", 0) or 0) * int(dataset.get("Columns", 0) or 0))
    array = _pixel_array(dataset, path)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if array.ndim == 3:  # RGB (pydicom converts YBR to RGB)
        deep = array.dtype != np.uint8
        return RawPixels(array, deep=deep, rgb=None if deep else array)
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    voi = file_window(dataset)
    plain = array.dtype == np.uint8 and slope == 1 and intercept == 0 and voi is None
    values = array[..., None] if plain else (array.astype(np.float64) * slope + intercept)[..., None]
    return RawPixels(values, deep=not plain, voi=voi, invert=photometric == "MONOCHROME1")
