"""Test images as labs, clinics and factories have them, made from scikit-learn's digits (nothing downloaded).

Plain functions that write files into a folder, for the data layer's tests and the end-to-end
tests: 12/16-bit PNG and TIFF (`write_deep_folder`), DICOM (`write_dicom`, `write_dicom_folder`),
multi-channel TIFF (`write_multichannel_folder`). Every ``*_folder`` function writes
``root/<digit>/<index>.<ext>`` (a class per subfolder, as the stages read labelled folders) and
returns ``root``. Import them as ``from medical_images import ...`` (pytest puts tests/ on the path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def digits(per_class: int, classes: int = 3, side: int = 32, skip: int = 0) -> list[tuple[np.ndarray, int]]:
    """`per_class` digits of each of the first `classes` classes (after the first `skip` of each: a
    test set apart from a training set), as float images in [0, 1] of ``side x side`` (bright ink on
    black; bicubic from scikit-learn's 8 x 8), with their class."""
    from sklearn.datasets import load_digits

    data = load_digits()
    chosen: list[tuple[np.ndarray, int]] = []
    for label in range(classes):
        for pixels in data.images[data.target == label][skip : skip + per_class]:
            image = Image.fromarray((pixels / 16.0).astype(np.float32), "F")
            resized = np.asarray(image.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64)
            chosen.append((resized.clip(0.0, 1.0), label))
    return chosen


def deep_pixels(image: np.ndarray, bits: int = 12, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """A [0, 1] image scaled to ``0 .. 2**bits - 1`` with Gaussian noise (`noise` of the range), uint16."""
    top = 2**bits - 1
    noisy = image + np.random.default_rng(seed).normal(0.0, noise, image.shape)
    return np.rint(noisy.clip(0.0, 1.0) * top).astype(np.uint16)


def write_deep(path: Path, pixels: np.ndarray) -> Path:
    """Writes uint16 gray `pixels` as a 16-bit PNG (Pillow ``I;16``) or TIFF (tifffile), by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, pixels.astype(np.uint16))
    else:
        Image.fromarray(pixels.astype(np.uint16)).save(path)
    return path


def write_deep_folder(
    root: Path,
    per_class: int = 10,
    classes: int = 3,
    side: int = 32,
    bits: int = 12,
    suffix: str = ".png",
    skip: int = 0,
) -> Path:
    """Digits as `bits`-bit gray files with noise (16-bit containers, values up to ``2**bits - 1``)."""
    for index, (image, label) in enumerate(digits(per_class, classes, side, skip)):
        write_deep(root / str(label) / f"{index:04d}{suffix}", deep_pixels(image, bits, seed=index))
    return root


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float | list[float], float | list[float]] | None = None,
    bits_stored: int = 12,
    signed: bool = False,
    syntax: str | None = None,
) -> Path:
    """Writes a DICOM file (Secondary Capture) with pydicom.

    Args:
        path: The file to write.
        pixels: uint16/int16 values (height, width), or (frames, height, width) for a multi-frame file.
        photometric: MONOCHROME1 or MONOCHROME2.
        slope, intercept: RescaleSlope/RescaleIntercept, left out when None.
        window: (WindowCenter, WindowWidth), each a number or a list (multi-valued), or None.
        bits_stored: BitsStored (BitsAllocated is 16).
        signed: PixelRepresentation 1 (int16 values).
        syntax: A compressed transfer syntax UID: the pixel data is then a fake encapsulated frame
            (for the "needs a plugin" error); None writes Explicit VR Little Endian.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    dataset.Modality, dataset.PatientName = "OT", "Test^Digit"
    dataset.Rows, dataset.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        dataset.NumberOfFrames = pixels.shape[0]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, bits_stored, bits_stored - 1
    dataset.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        dataset.RescaleSlope = slope
    if intercept is not None:
        dataset.RescaleIntercept = intercept
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    if syntax is None:
        dataset.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    else:
        dataset.PixelData = encapsulate([b"\xff\xd8\xff\xc3 not really a JPEG \xff\xd9"])
        dataset["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_dicom_folder(
    root: Path, per_class: int = 10, classes: int = 3, side: int = 32, windowed: bool = True, skip: int = 0
) -> Path:
    """Digits as 12-bit CT-like DICOM files (slope 1, intercept -1024; a window of the ink when `windowed`)."""
    for index, (image, label) in enumerate(digits(per_class, classes, side, skip)):
        window = (1024.0, 2048.0) if windowed else None
        write_dicom(root / str(label) / f"{index:04d}.dcm", deep_pixels(image, seed=index),
                    slope=1.0, intercept=-1024.0, window=window)  # fmt: skip
    return root


def multichannel_pixels(image: np.ndarray, channels: int = 4, bits: int = 8) -> np.ndarray:
    """(height, width, `channels`) from a [0, 1] image: the image, its negative, its upside-down copy and
    shifted copies, as uint8 (`bits` 8) or uint16 values up to ``2**bits - 1``."""
    planes = [image, 1.0 - image, image[::-1], np.roll(image, 3, axis=1)]
    planes += [np.roll(image, shift, axis=0) for shift in range(1, channels)]
    stacked = np.stack(planes[:channels], axis=-1)
    return np.rint(stacked * (2**bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)


def write_multichannel_tiff(path: Path, pixels: np.ndarray, planar: bool = False) -> Path:
    """Writes (height, width, C) `pixels` as one TIFF page: samples interleaved, or planar (C, H, W)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    if planar:
        tifffile.imwrite(path, np.moveaxis(pixels, -1, 0), photometric="minisblack", planarconfig="separate")
    else:
        tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig")
    return path


def write_multichannel_folder(
    root: Path,
    channels: int = 4,
    per_class: int = 10,
    classes: int = 3,
    side: int = 32,
    bits: int = 8,
    skip: int = 0,
) -> Path:
    """Digits as `channels`-channel TIFFs (`multichannel_pixels`)."""
    for index, (image, label) in enumerate(digits(per_class, classes, side, skip)):
        pixels = multichannel_pixels(image, channels, bits)
        write_multichannel_tiff(root / str(label) / f"{index:04d}.tif", pixels)
    return root
