"""Finding and decoding images.

Every stage reads images through `load_rgb`, so every mode (palette, CMYK, 16-bit, alpha,
animated GIF) is turned into 8-bit RGB the same way, and every undecodable file raises the
same `BadImage` error that the datasets count and skip.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from labelfew.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

# Pillow refuses images above ~179 MPixel (2 x MAX_IMAGE_PIXELS) as decompression bombs; keep
# that limit and turn its warning zone into an error so that one huge file cannot exhaust memory.
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """A file that exists but cannot be decoded as an image."""


def find_images(root: Path) -> list[Path]:
    """Lists the image files under `root`, recursively, sorted by path.

    Symbolic links to folders are followed once (a link that loops back is not followed again);
    hidden files and folders (names starting with '.') are skipped.

    Raises:
        UserError: `root` does not exist or is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such folder. Pass a folder of images.")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder. Pass a folder of images (searched recursively).")
    found: list[Path] = []
    seen_folders: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_folders:
            subfolders[:] = []
            continue
        seen_folders.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            found.append(Path(folder) / name)
    return sorted(found)


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
                return _to_rgb(image)
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        EOFError,
    ) as error:
        raise BadImage(f"{path}: {error}") from error


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
    """Images with optional integer labels, decoded on access and passed through `transform`.

    A file that cannot be decoded is replaced by the next decodable one (so batch shapes stay
    fixed, which the cross-process loss needs) and its index is reported in the sample's
    `bad` list; the training loop counts and names those files.

    Each item is `(transformed, label, index, bad)` where `label` is -1 for unlabeled images
    and `bad` is a list of dataset indices that failed to decode on the way.

    With `seed` set, the random transform of image i in epoch e draws from its own stream,
    seeded by (seed, e, i): the views do not depend on the number of loader workers or
    processes, nor on where a resumed run restarted — a killed and resumed run sees exactly
    the views of an uninterrupted one. The epoch lives in shared memory, so `set_epoch` reaches
    persistent loader workers too.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable[[Image.Image], Any],
        labels: Sequence[int] | None = None,
        max_attempts: int = 16,
        seed: int | None = None,
    ) -> None:
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None
        self.transform = transform
        self.max_attempts = max_attempts
        self.seed = seed
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose random views `__getitem__` draws (see the class docstring)."""
        self._epoch.fill_(epoch)

    def _transform(self, image: Image.Image, index: int) -> Any:
        if self.seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, int(self._epoch.item()), index))
            return self.transform(image)

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
            return self._transform(image, current), label, current, bad
        raise RuntimeError(
            f"{self.max_attempts} consecutive files from {self.paths[index]} could not be decoded"
        )


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one (seed, epoch, image) triple; nearby triples give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
