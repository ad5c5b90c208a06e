"""Test images that are also training images, found by resolved path and by content hash.

A test image inside the kNN bank is its own nearest neighbour, and one among the fine-tuning
labels was trained on: either way every score looks better than it is (DESIGN.md trap 8). On
features with no class signal, kNN scores chance (11% on 9 classes) with separate sets and 100%
when the test images are in the bank. The content hash also catches a copy under another name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from labelfew.fileio import sha256_file

HASH_CHARACTERS = 16
"""Hex characters kept of each sha256: 64 bits, so a chance collision in a million-image set has
a probability of about 3e-8, and a fine-tuning run.json stores ~19 bytes per labelled image."""


def content_hashes(paths: Iterable[Path]) -> list[str]:
    """The truncated sha256 of each file's bytes; "" for a file that cannot be read (it matches nothing)."""
    hashes = []
    for path in paths:
        try:
            hashes.append(sha256_file(path)[:HASH_CHARACTERS])
        except OSError:
            hashes.append("")
    return hashes


@dataclass(frozen=True)
class ImageSet:
    """Resolved paths and content hashes of a set of images (either may be empty when unknown)."""

    paths: frozenset[Path]
    hashes: frozenset[str]

    @classmethod
    def of(cls, paths: Sequence[Path], hashes: Sequence[str] | None = None) -> ImageSet:
        """`hashes` are computed from the files when not given (e.g. read from a run.json)."""
        hashes = content_hashes(paths) if hashes is None else hashes
        return cls(frozenset(path.resolve() for path in paths), frozenset(hashes) - {""})


@dataclass(frozen=True)
class Overlap:
    """Test images found in another set: how many, and the first of them."""

    other: str
    count: int
    example: str | None

    def message(self) -> str:
        """One line for the error or the report."""
        return f"{self.count} test image(s) are also in {self.other}, e.g. {self.example}"


def find_overlap(
    test_paths: Sequence[Path], test_hashes: Sequence[str], other: ImageSet, name: str
) -> Overlap:
    """Test images whose resolved path or content hash is in `other`.

    Shape: test_paths and test_hashes are parallel (one hash per test image).
    """
    found = [
        path
        for path, digest in zip(test_paths, test_hashes, strict=True)
        if path.resolve() in other.paths or (digest and digest in other.hashes)
    ]
    return Overlap(name, len(found), str(found[0]) if found else None)
