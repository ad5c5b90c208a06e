"""Finding, decoding and resizing images.

Every file is decoded by `labelfew.data.pixels` (`load_resized` for the models, `load_rgb` and
`labelfew.data.pixels.display_image` for people), so every mode (palette, CMYK, 16-bit, float,
alpha, animated GIF, multi-channel TIFF, DICOM) is turned into 8-bit pixels the same way, every
photo is turned upright by its EXIF orientation, and every undecodable file raises the same
`BadImage` error that the image sources count and skip. Every command lists a folder through `scan_images` (regular files only, no link
out of the folder unless asked, never a run folder) and shows a file name through `printable`. Both image sources (the in-memory
store and the streaming workers) decode through `load_resized`, so they hold the same pixels.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from PIL import Image
from torch.utils.data import Dataset

from labelfew.data.pixels import MAX_IMAGE_PIXELS as MAX_IMAGE_PIXELS
from labelfew.data.pixels import BadImage as BadImage
from labelfew.data.pixels import check_decoders, decode_array, display_image, header_extent
from labelfew.data.pixels import printable as printable
from labelfew.errors import UserError
from labelfew.spec import Decoding
from labelfew.views.config import resized_extent

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".webp",
        ".bmp",
        ".tif",
        ".tiff",
        ".gif",
        ".pgm",
        ".ppm",
        ".pnm",
        ".dcm",
        ".dicom",
    }
)


@dataclass(frozen=True)
class FoundImages:
    """The image files under a folder, and the entries that look like images but are left out.

    Attributes:
        paths: Regular image files, sorted.
        skipped: ``"path: reason"`` (`printable`) for each FIFO, device, socket, broken link, link
            out of the folder or unlistable folder, so that a stage can count and name them.
    """

    paths: list[Path]
    skipped: list[str] = field(default_factory=list)


def skipped_note(skipped: Sequence[str], shown: int = 3) -> str:
    """``"; skipped N file(s): a, b, c, …"`` naming the first `shown`, or "" when nothing was skipped:
    the clause every stage adds to its closing line (run.json lists them all)."""
    if not skipped:
        return ""
    more = ", …" if len(skipped) > shown else ""
    return f"; skipped {len(skipped)} file(s): {', '.join(skipped[:shown])}{more}"


def scan_images(root: Path, *, follow_links: bool = False, exclude: Sequence[Path] = ()) -> FoundImages:
    """The image files under `root`, recursively, and what was left out (`FoundImages`).

    Only regular files are images: a FIFO named ``x.png`` would block the first read forever, so
    it (and devices, sockets, broken links) is skipped and named, never opened. A link to an image
    file is followed wherever it points (a folder of links is how a subset of a pool is made, and
    one file cannot loop); a link to a folder out of `root` is skipped and named unless
    `follow_links` (``X/up -> ..`` would otherwise train on the sibling folders). A folder is walked once
    however many links reach it, so link loops end. Hidden files and folders (names starting
    with '.') are ignored, and so are the folders in `exclude` and every labelfew stage folder
    (`is_run_folder`): a run's own ``views.png`` must never become a training image.

    Raises:
        UserError: `root` does not exist or is not a folder, or holds DICOM files and pydicom is
            not installed (`labelfew.data.pixels.check_decoders`: before any long work).
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{printable(root)}: no such folder. Pass a folder of images.")
    if not root.is_dir():
        raise UserError(f"{printable(root)}: not a folder. Pass a folder of images (searched recursively).")
    root_real = os.path.realpath(root)
    excluded = {os.path.realpath(folder) for folder in exclude}
    seen = {root_real}
    found: list[Path] = []
    skipped: list[str] = []
    folders = [str(root)]
    while folders:
        folder = folders.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append(f"{printable(folder)}: cannot be listed ({error.strerror})")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            outside = entry.is_symlink() and not _inside(os.path.realpath(entry.path), root_real)
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if outside and not follow_links:
                    skipped.append(
                        f"{printable(entry.path)}: a link out of the folder (--follow-links follows it)"
                    )
                elif real not in seen and real not in excluded and not is_run_folder(Path(entry.path)):
                    seen.add(real)
                    folders.append(entry.path)
                continue
            if Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            reason = _not_an_image_file(entry)
            if reason:
                skipped.append(f"{printable(entry.path)}: {reason}")
            else:
                found.append(Path(entry.path))
    check_decoders(found)
    return FoundImages(sorted(found), sorted(skipped))


def _inside(real: str, root_real: str) -> bool:
    try:
        return os.path.commonpath([real, root_real]) == root_real
    except ValueError:  # another drive on Windows
        return False


def _not_an_image_file(entry: os.DirEntry[str]) -> str:
    """Why an entry with an image extension is not read, or "" for a regular file (or a link to one)."""
    if entry.is_file():  # follows links; False for FIFOs, devices, sockets
        return ""
    if entry.is_symlink() and not os.path.exists(entry.path):
        return "a broken link"
    return "not a regular file (a FIFO, device or socket); never opened"


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` is a labelfew stage folder, whose figures are never input images.

    A finished stage holds a ``run.json`` that names the labelfew version; a stopped one its
    ``log.jsonl`` beside its ``checkpoints`` or pretraining's ``views.png``.
    """
    run_file = folder / "run.json"
    if run_file.is_file():
        try:
            record = json.loads(run_file.read_bytes())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and "labelfew_version" in record:
            return True
    return (folder / "log.jsonl").is_file() and (
        (folder / "checkpoints").is_dir() or (folder / "views.png").is_file()
    )


def find_images(root: Path, *, follow_links: bool = False, exclude: Sequence[Path] = ()) -> list[Path]:
    """The regular image files under `root`, sorted (`scan_images` without what it skipped)."""
    return scan_images(root, follow_links=follow_links, exclude=exclude).paths


def require_images(root: Path, *, follow_links: bool = False, exclude: Sequence[Path] = ()) -> FoundImages:
    """`scan_images(root)`, or a UserError when the folder holds no image file."""
    found = scan_images(root, follow_links=follow_links, exclude=exclude)
    if not found.paths:
        skipped = f" ({len(found.skipped)} skipped, e.g. {found.skipped[0]})" if found.skipped else ""
        raise UserError(
            f"{printable(root)}: no image files (jpg, png, webp, bmp, tif, gif, pgm, dcm) found, searched recursively{skipped}"
        )
    return found


def load_rgb(path: Path) -> Image.Image:
    """Decodes one image file into 8-bit RGB (first frame of animations): `display_image` with
    the default `Decoding` (see `labelfew.data.pixels` for every rule).

    Palette and alpha images are composited on white, so transparent regions do not turn
    black; deep (16-bit, float) images go through their own (0.5%, 99.5%) percentiles; CMYK is
    converted by Pillow; photos are turned upright by their EXIF orientation.

    Raises:
        BadImage: the file is empty, truncated, not an image, a decompression bomb, or
            cannot be read.
    """
    return display_image(path, Decoding())


def load_resized(path: Path, side: int, enlarge: bool = False, decoding: Decoding = Decoding()) -> np.ndarray:
    """The whole image as uint8 pixels decoded by `decoding` (`labelfew.data.pixels.decode_array`),
    its shorter side shrunk to ``side`` if it is longer.

    Never upsampled unless ``enlarge`` (evaluation: the shorter side then becomes ``side`` either
    way), aspect ratio kept, the longer side by torchvision's ``Resize(int)`` rule
    (`labelfew.views.config.resized_extent`), resampled with anti-aliased bicubic on the uint8
    pixels: torchvision's ``Resize(side)`` of a uint8 tensor (PyTorch's vectorised port of Pillow's
    resampling, within 2/255 of Pillow's on 0.4% of a photo's pixels and 3x faster: 0.9 against
    2.9 ms for a 500 x 375 photo on one core, `benchmarks/views_224.py`).

    Returns:
        Shape: (height, width, C), uint8, C = ``decoding.channels``, ``min(height, width) <= side``
        (``== side`` when enlarging).

    Raises:
        BadImage: as `labelfew.data.pixels.decode_array`.
    """
    pixels = decode_array(path, decoding)
    if not pixels.flags.writeable:  # torch.from_numpy warns on a read-only array
        pixels = pixels.copy()
    height, width = pixels.shape[:2]
    if min(width, height) > side or (enlarge and min(width, height) < side):
        new_height, new_width = resized_extent(height, width, side)
        with torch.no_grad():
            image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
            resized = functional.interpolate(
                image, size=(new_height, new_width), mode="bicubic", antialias=True
            )
        pixels = resized[0].permute(1, 2, 0).contiguous().numpy()
    return pixels


def stored_extent(height: int, width: int, side: int) -> tuple[int, int]:
    """``(height, width)`` of an image of ``height x width`` after `load_resized` to ``side``."""
    if min(height, width) > side:
        return resized_extent(height, width, side)
    return height, width


def image_extent(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` from the file's header (no decoding), upright as `load_rgb` decodes it,
    or None if it cannot be opened (`labelfew.data.pixels.header_extent`)."""
    return header_extent(path)


def typical_image_side(paths: Sequence[Path], sample: int = 64, cap: int = 224) -> int:
    """The median shorter side of a sample of the images, capped at `cap`.

    Used as the default training resolution, so a folder of 32 px images trains at 32 px.
    Undecodable files in the sample are ignored.
    """
    step = max(1, len(paths) // sample)
    extents = [header_extent(path) for path in list(paths)[::step][:sample]]
    sides = [min(extent) for extent in extents if extent is not None]
    if not sides:
        raise UserError(
            f"none of the {len(paths)} image files could be opened; check the folder holds images"
        )
    return int(min(cap, round(statistics.median(sides))))


class ImageDataset(Dataset[Any]):
    """Images with optional integer labels, decoded on access and passed through a PIL `transform`.

    Used only by ``labelfew.stages.evaluate`` until it moves to the one inference loop; the
    training stages read images through `labelfew.data.store` and `labelfew.data.stream`.

    A file that cannot be decoded is replaced by the next decodable one and its index is
    reported in the sample's `bad` list. Each item is `(transformed, label, index, bad)` where
    `label` is -1 for unlabeled images.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable[[Image.Image], Any],
        labels: Sequence[int] | None = None,
        max_attempts: int = 16,
    ) -> None:
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None
        self.transform = transform
        self.max_attempts = max_attempts

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int, list[int]]:
        bad: list[int] = []
        for attempt in range(self.max_attempts):
            current = (index + attempt) % len(self.paths)
            try:
                image = load_rgb(self.paths[current])
            except BadImage:
                bad.append(current)
                continue
            label = self.labels[current] if self.labels is not None else -1
            return self.transform(image), label, current, bad
        raise RuntimeError(
            f"{self.max_attempts} consecutive files from {self.paths[index]} could not be decoded"
        )


def collate(batch: list[tuple[Any, int, int, list[int]]]) -> dict[str, Any]:
    """Stacks `ImageDataset` items; views given as tuples are stacked per view."""
    first = batch[0][0]
    if isinstance(first, tuple | list):
        images: Any = tuple(torch.stack([item[0][view] for item in batch]) for view in range(len(first)))
    else:
        images = torch.stack([item[0] for item in batch])
    return {
        "images": images,
        "labels": torch.tensor([item[1] for item in batch], dtype=torch.long),
        "indices": torch.tensor([item[2] for item in batch], dtype=torch.long),
        "bad": [index for item in batch for index in item[3]],
    }
