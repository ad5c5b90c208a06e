"""What an image file holds, as two hashes: its bytes' sha256, and a perceptual hash of its picture.

The sha256 finds a byte-identical copy under another name; the perceptual hash finds a copy that
was re-encoded (another JPEG quality, PNG to JPEG) or resized, which the bytes' hash misses
(DESIGN.md trap 15). The perceptual hash is the 64-bit DCT hash of Zauner (2010, "Implementation
and benchmarking of perceptual image hash functions") as the `imagehash` package computes it: the
grayscale picture squeezed to 32 × 32, its 2-D DCT, and one bit per coefficient of the lowest 8 × 8
frequencies (above or below their median). Re-encoding and resizing move few of those bits (0-6
measured on photos); two different photos differ in about half of them (31 ± 4). Low-detail images
(8 × 8 digits drawn at 32 px) can share a hash while differing, so a coarse 8 × 8 picture confirms
every candidate pair (`copy_pairs`).

Both hashes are cached in a run (`HashCache`, keyed by path, size and modification time), so a
second evaluation of a 100,000-image pretraining folder reads the cache instead of decoding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from labelfew.data.images import BadImage
from labelfew.data.pixels import decoded, read_raw
from labelfew.fileio import atomic_write, sha256_file
from labelfew.spec import Decoding

HASH_CHARACTERS = 16
"""Hex characters kept of each sha256: 64 bits, so a chance collision in a million-image set has
a probability of about 3e-8, and a fine-tuning run.json stores ~19 bytes per labelled image."""

THUMBNAIL_SIDE = 32
"""The grayscale thumbnail the DCT is taken of (imagehash's phash: hash_size 8 × highfreq_factor 4)."""

COPY_DISTANCE = 6
"""Hamming distance (of 64 bits) at or below which two pictures are copy candidates: re-encoding
and resizing stay at 0-6 (measured on the hymenoptera photos down to a quarter of their side, JPEG
quality 30); distinct photos are 31 ± 4 apart (398 photos: none below 12)."""

LAYOUT_SIDE = 8
"""The side of the coarse picture that confirms a candidate (the 32 px thumbnail averaged in 4 × 4 blocks)."""

LAYOUT_DIFFERENCE = 0.07
"""A candidate is a copy when the mean absolute difference of the two standardised 8 × 8 pictures is
at most this. Measured: copies (quality 30, half and quarter side) 0.015 median, 0.069 at the 99th
percentile; the closest distinct images (scikit-learn's 8 × 8 digits, whose DCT hashes collide at
≤ 6 bits for a sixth of the test split) 0.077. Without it the demo's digits would be copies."""

CACHE_VERSION = 1
"""Bumped when the hash changes, so that an old cache is recomputed rather than compared."""


def _dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: `matrix @ x` is scipy's dct(x, norm="ortho").

    Shape: (size, size)
    """
    frequency = np.arange(size)[:, None]
    position = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * position + 1) * frequency / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix(THUMBNAIL_SIDE)
_BITS = 1 << np.arange(64, dtype=np.uint64)


def perceptual_hashes(thumbnails: np.ndarray) -> np.ndarray:
    """The 64-bit DCT hash of each grayscale thumbnail.

    Shape: thumbnails (N, 32, 32) -> (N,) uint64
    """
    coefficients = _DCT @ thumbnails.astype(np.float64) @ _DCT.T
    low = coefficients[:, :8, :8].reshape(len(thumbnails), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BITS).sum(axis=1, dtype=np.uint64)


def thumbnail(path: Path) -> np.ndarray | None:
    """The 32 × 32 grayscale thumbnail of an image file (aspect not kept), or None if it cannot be decoded.

    A JPEG is decoded at a reduced scale in the DCT domain (Pillow's draft mode), ~10× faster for
    photos, which is what lets a first pass over a large folder finish in minutes. Any other file
    goes through `labelfew.data.pixels` with its own channels (the first three of a multi-channel
    TIFF) and, when deep, its own window, so a copy is found whatever the run's decoding.

    Shape: -> (32, 32) float32
    """
    side = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    try:
        gray = _jpeg_draft(path)
        if gray is None:
            gray = _gray(path)
        return np.asarray(gray.resize(side, Image.Resampling.BOX), dtype=np.float32)
    except (BadImage, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):  # fmt: skip
        return None


def _jpeg_draft(path: Path) -> Image.Image | None:
    """A JPEG's luma decoded at a reduced scale (Pillow's draft mode), upright; None for other files
    (and for those Pillow cannot open: `labelfew.data.pixels` decides about them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (UnidentifiedImageError, ValueError, SyntaxError, EOFError):
            return None
        with image:
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                image.draft(image.mode, (2 * THUMBNAIL_SIDE, 2 * THUMBNAIL_SIDE))
                return ImageOps.exif_transpose(image).convert("L")  # as load_rgb turns it
    return None


def _gray(path: Path) -> Image.Image:
    """The file's luma (`labelfew.data.pixels`): 8-bit RGB as `load_rgb` decodes it, then Pillow's ``L``."""
    raw = read_raw(path)
    channels = 3 if raw.rgb is not None or raw.channels == 3 else raw.channels
    pixels = decoded(raw, Decoding(channels=channels), path)
    if channels == 1:
        return Image.fromarray(np.ascontiguousarray(pixels[..., 0]), "L")
    return Image.fromarray(np.ascontiguousarray(pixels[..., :3]), "RGB").convert("L")


def layouts(thumbnails: np.ndarray) -> np.ndarray:
    """The coarse 8 × 8 picture of each thumbnail (block means, rounded to 8 bits).

    Shape: thumbnails (N, 32, 32) -> (N, 64) uint8
    """
    block = THUMBNAIL_SIDE // LAYOUT_SIDE
    means = thumbnails.reshape(len(thumbnails), LAYOUT_SIDE, block, LAYOUT_SIDE, block).mean(axis=(2, 4))
    return np.rint(means).clip(0, 255).astype(np.uint8).reshape(len(thumbnails), -1)


@dataclass(frozen=True)
class ImageHashes:
    """Both hashes of a list of files, parallel to `paths`.

    Attributes:
        paths: the files, as given.
        sha: the truncated sha256 of each file's bytes; "" for a file that cannot be read.
        picture: the perceptual hash of each decodable file. Shape: (N,) uint64
        layout: the coarse picture that confirms a perceptual match. Shape: (N, 64) uint8
        decoded: whether `picture` and `layout` hold anything (False for an undecodable file).
            Shape: (N,) bool
    """

    paths: tuple[Path, ...]
    sha: tuple[str, ...]
    picture: np.ndarray
    layout: np.ndarray
    decoded: np.ndarray


def _standardised(layout: np.ndarray) -> np.ndarray:
    values = layout.astype(np.float32)
    values -= values.mean(axis=-1, keepdims=True)
    return values / (values.std(axis=-1, keepdims=True) + 1.0)  # +1: flat pictures stay flat, not noise


def copy_pairs(queries: ImageHashes, reference: ImageHashes) -> tuple[np.ndarray, np.ndarray]:
    """The (query, reference) index pairs that are copies: a re-encoded or resized picture, or the same.

    Candidates are the pairs whose DCT hashes differ in at most COPY_DISTANCE bits, all against all
    (about 3 s for 10,000 × 100,000 hashes); a candidate is a copy when its coarse pictures agree
    too (LAYOUT_DIFFERENCE). Undecodable files are in no pair.

    Shape: -> (P,), (P,) indices into queries and reference
    """
    found_rows, found_columns = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    if len(reference.paths) == 0:
        return found_rows[0], found_columns[0]
    block = max(1, (1 << 18) // len(reference.paths))  # ~2 MB of pairs: in cache, 3 ns a pair
    for start in range(0, len(queries.paths), block):
        close = np.bitwise_count(queries.picture[start : start + block, None] ^ reference.picture[None, :])
        close = close <= COPY_DISTANCE
        close[~queries.decoded[start : start + block]] = False
        close[:, ~reference.decoded] = False
        rows, columns = np.nonzero(close)
        if len(rows) == 0:
            continue
        difference = np.abs(
            _standardised(queries.layout[rows + start]) - _standardised(reference.layout[columns])
        )
        copies = difference.mean(axis=1) <= LAYOUT_DIFFERENCE
        found_rows.append(rows[copies] + start)
        found_columns.append(columns[copies])
    return np.concatenate(found_rows), np.concatenate(found_columns)


def near_copies(queries: ImageHashes, reference: ImageHashes) -> np.ndarray:
    """Which queries have a copy in `reference` (`copy_pairs`).

    Shape: -> (len(queries.paths),) bool
    """
    found = np.zeros(len(queries.paths), dtype=bool)
    found[copy_pairs(queries, reference)[0]] = True
    return found


Entry = tuple[int, int, str, int, bytes, bool]
"""One cached file: size, mtime (ns), sha, perceptual hash, layout bytes, decoded."""

_MISSING: Entry = (0, 0, "", 0, bytes(LAYOUT_SIDE * LAYOUT_SIDE), False)


HASH_THREADS = min(8, os.cpu_count() or 1)
"""Threads that hash files not in the cache (Pillow's decoder and hashlib release the GIL)."""


def _status(key: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, or None when it cannot be read."""
    try:
        status = os.stat(key)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def _hash_file(key: str, status: tuple[int, int] | None) -> Entry:
    """Both hashes of one file (its content hash only when it cannot be decoded)."""
    try:
        sha = sha256_file(Path(key))[:HASH_CHARACTERS]
    except OSError:
        sha = ""
    small = thumbnail(Path(key))
    picture, layout = 0, _MISSING[4]
    if small is not None:
        picture, layout = int(perceptual_hashes(small[None])[0]), layouts(small[None])[0].tobytes()
    size, mtime = status or (0, 0)
    return (size, mtime, sha, picture, layout, small is not None)


class HashCache:
    """Hashes already computed, keyed by resolved path, size and modification time (an `.npz` file).

    A file that changed (size or mtime) is hashed again; an unreadable or older-version cache is
    ignored. `save` writes only when something was added.
    """

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.entries: dict[str, Entry] = {}
        self.added = False
        if file is not None and file.is_file():
            self._load(file)

    def _load(self, file: Path) -> None:
        try:
            with np.load(file, allow_pickle=False) as stored:
                if int(stored["version"]) != CACHE_VERSION:
                    return
                keys = stored["path"].tolist()
                columns = [stored[key].tolist() for key in ("size", "mtime", "sha", "picture")]
                layout, decoded = stored["layout"], stored["decoded"].tolist()
        except (OSError, ValueError, KeyError):
            return
        for index, key in enumerate(keys):
            size, mtime, sha, picture = (column[index] for column in columns)
            self.entries[key] = (size, mtime, sha, picture, layout[index].tobytes(), decoded[index])

    def hashes(self, paths: Sequence[Path], say: Callable[[int], None] | None = None) -> ImageHashes:
        """Both hashes of every file, from the cache where the file is unchanged.

        The others are hashed by HASH_THREADS threads (decoding and sha256 release the GIL); `say`
        is told how many first, so that a first pass over a large folder is not a silent wait.
        """
        keys = [os.path.realpath(path) for path in paths]
        statuses = [_status(key) for key in keys]
        entries = [self._cached(key, status) for key, status in zip(keys, statuses, strict=True)]
        new = [index for index, entry in enumerate(entries) if entry is None and statuses[index] is not None]
        if new and say is not None:
            say(len(new))
        with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
            hashed = pool.map(lambda index: _hash_file(keys[index], statuses[index]), new)
            for index, entry in zip(new, hashed, strict=True):
                entries[index] = self.entries[keys[index]] = entry
                self.added = True
        done = [entry or _MISSING for entry in entries]
        return ImageHashes(
            paths=tuple(paths),
            sha=tuple(entry[2] for entry in done),
            picture=np.array([entry[3] for entry in done], dtype=np.uint64),
            layout=np.frombuffer(b"".join(entry[4] for entry in done), dtype=np.uint8).reshape(len(done), -1),
            decoded=np.array([entry[5] for entry in done], dtype=bool),
        )

    def _cached(self, key: str, status: tuple[int, int] | None) -> Entry | None:
        cached = self.entries.get(key)
        return cached if cached is not None and status is not None and cached[:2] == status else None

    def save(self) -> None:
        """Writes the cache (atomically) when hashes were added; a read-only run folder is not an error."""
        if self.file is None or not self.added:
            return
        keys = sorted(self.entries)
        rows = [self.entries[key] for key in keys]
        arrays = {
            "version": np.array(CACHE_VERSION),
            "path": np.array(keys, dtype=str),
            "size": np.array([row[0] for row in rows], dtype=np.int64),
            "mtime": np.array([row[1] for row in rows], dtype=np.int64),
            "sha": np.array([row[2] for row in rows], dtype=str),
            "picture": np.array([row[3] for row in rows], dtype=np.uint64),
            "layout": np.frombuffer(b"".join(row[4] for row in rows), dtype=np.uint8).reshape(len(rows), -1),
            "decoded": np.array([row[5] for row in rows], dtype=bool),
        }

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as stream:
                np.savez(stream, **arrays)  # type: ignore[arg-type]

        try:
            atomic_write(self.file, write)
        except Exception:
            return
        self.added = False


def content_hashes(paths: Sequence[Path]) -> list[str]:
    """The truncated sha256 of each file's bytes; "" for a file that cannot be read (it matches nothing)."""
    hashes = []
    for path in paths:
        try:
            hashes.append(sha256_file(path)[:HASH_CHARACTERS])
        except OSError:
            hashes.append("")
    return hashes
