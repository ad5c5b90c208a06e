"""Finding, decoding and resizing images.

Every stage reads images through `load_rgb`, so every mode (palette, CMYK, 16-bit, alpha,
animated GIF) is turned into 8-bit RGB the same way, every photo is turned upright by its EXIF
orientation, and every undecodable file raises the same `BadImage` error that the image sources
count and skip. Every command lists a folder through `scan_images` (regular files only, no link
out of the folder unless asked, never a run folder) and shows a file name through `printable`. Both image sources (the in-memory
store and the streaming workers) decode through `load_resized`, so they hold the same pixels.
"""

from __future__ import annotations

import json
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

from labelfew.errors import UserError
from labelfew.views.config import resized_extent

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

# Pillow refuses images above ~179 MPixel (2 x MAX_IMAGE_PIXELS) as decompression bombs; keep
# that limit and turn its warning zone into an error so that one huge file cannot exhaust memory.
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """A file that exists but cannot be decoded as an image."""


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


def printable(path: Path | str) -> str:
    """`path` as text that any terminal, CSV or JSON file can hold.

    A file name that is not valid UTF-8 comes from the filesystem with surrogate escapes
    (`os.fsdecode`), which raise UnicodeEncodeError when printed or written as UTF-8; its
    undecodable bytes are shown as ``\\xNN`` instead. Every other name is unchanged.
    """
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


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
        UserError: `root` does not exist or is not a folder.
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
            f"{printable(root)}: no image files (jpg, png, webp, bmp, tif, gif) found, searched recursively{skipped}"
        )
    return found


def load_rgb(path: Path) -> Image.Image:
    """Decodes one image file into 8-bit RGB (first frame of animations).

    Palette and alpha images are composited on white, so transparent regions do not turn
    black; 16-bit and float images are scaled to 8 bits; CMYK is converted by Pillow.

    Raises:
        BadImage: the file is empty, truncated, not an image, a decompression bomb, or
            cannot be read.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                image.load()
                return _to_rgb(_upright(image))
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        EOFError,
    ) as error:
        raise BadImage(f"{printable(path)}: {error}") from error


EXIF_ORIENTATION = 0x0112
"""The EXIF tag that says how a camera held sideways stored its pixels (1 = as stored)."""


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
    it, so the model must see the same upright photo the person labelled.
    """
    if _orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        # A fixed gain keeps a pixel value the same grey in every image of a folder (Pillow's own
        # convert would clip everything above 255 to white).
        image = image.convert("F").point(lambda value: value * (255.0 / 65535.0)).convert("L")
    elif image.mode in ("I", "F"):
        image = _stretch_to_8_bits(image.convert("F"), unit_range=image.mode == "F")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _stretch_to_8_bits(image: Image.Image, unit_range: bool) -> Image.Image:
    """Mode-F pixels to 8 bits: scaled from [0, 1] when `unit_range` (float images) and they fit,
    kept when already within [0, 255], else stretched from the image's own minimum and maximum."""
    extrema: Any = image.getextrema()
    low, high = float(extrema[0]), float(extrema[1])
    if unit_range and low >= 0.0 and high <= 1.0:
        low, scale = 0.0, 255.0
    elif low >= 0.0 and high <= 255.0:
        low, scale = 0.0, 1.0
    else:
        scale = 255.0 / (high - low) if high > low else 0.0
    return image.point(lambda value: (value - low) * scale).convert("L")


def load_resized(path: Path, side: int, enlarge: bool = False) -> np.ndarray:
    """The whole image as uint8 pixels, its shorter side shrunk to ``side`` if it is longer.

    Never upsampled unless ``enlarge`` (evaluation: the shorter side then becomes ``side`` either
    way), aspect ratio kept, the longer side by torchvision's ``Resize(int)`` rule
    (`labelfew.views.config.resized_extent`), resampled with anti-aliased bicubic on the uint8
    pixels: torchvision's ``Resize(side)`` of a uint8 tensor (PyTorch's vectorised port of Pillow's
    resampling, within 2/255 of Pillow's on 0.4% of a photo's pixels and 3x faster: 0.9 against
    2.9 ms for a 500 x 375 photo on one core, `benchmarks/views_224.py`).

    Returns:
        Shape: (height, width, 3), uint8, ``min(height, width) <= side`` (``== side`` when enlarging).

    Raises:
        BadImage: as `load_rgb`.
    """
    pixels = np.array(
        load_rgb(path), dtype=np.uint8
    )  # a writable copy (torch.from_numpy warns on a read-only one)
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
    or None if it cannot be opened."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if _orientation(image) >= 5:  # a quarter turn: `load_rgb` swaps the sides
                width, height = height, width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
        return None
    return height, width


def typical_image_side(paths: Sequence[Path], sample: int = 64, cap: int = 224) -> int:
    """The median shorter side of a sample of the images, capped at `cap`.

    Used as the default training resolution, so a folder of 32 px images trains at 32 px.
    Undecodable files in the sample are ignored.
    """
    step = max(1, len(paths) // sample)
    sides = []
    for path in list(paths)[::step][:sample]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
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
