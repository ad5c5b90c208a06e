"""Test images that a model saw in training: found by path, by content hash and by perceptual hash.

A test image inside the kNN bank is its own nearest neighbour, one among the fine-tuning labels was
trained on, and one in the pretraining folder or an `--unlabeled` folder shaped the features or
the pseudo-labels: every score looks better than it is (DESIGN.md traps 8 and 15). On features
with no class signal, kNN scores chance (11% on 9 classes) with separate sets and 100% when the
test images are in the bank. Copies are rarely byte-identical (re-encoded, resized), so besides
the resolved path and the bytes' sha256, a picture's perceptual hash is compared
(`labelfew.data.image_hashes`).

What a model saw is read from its run.json and its parents' (pretrain's folder, the labels,
FixMatch's and distill's `--unlabeled` folder, distill's `--labels`), never assumed from folder
names. Transductive use (test images among the unlabeled) can be legitimate; it is never silent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelfew.data.image_hashes import HashCache, ImageHashes, content_hashes, near_copies
from labelfew.data.images import find_images
from labelfew.data.labels import read_labels
from labelfew.errors import UserError

__all__ = ["Leaks", "Overlap", "Seen", "content_hashes", "find_leaks", "seen_in_training"]


@dataclass(frozen=True)
class Seen:
    """A set of images a model saw: a folder, a label file, or a list (the kNN bank).

    Attributes:
        name: how messages and report.json name it ("the pretraining folder data/ (pretrain)").
        folder: a folder searched recursively, as a run.json records it.
        label_file: a label CSV or class-per-folder tree.
        listed: the images themselves.
        recorded: content hashes a run.json recorded (the labels, when their file is gone).
        follow_links: the stage's --follow-links (which links out of `folder` it read).
    """

    name: str
    folder: Path | None = None
    label_file: Path | None = None
    listed: tuple[Path, ...] | None = None
    recorded: tuple[str, ...] = ()
    follow_links: bool = False

    @property
    def key(self) -> str:
        """One key per set, so that a folder that five models saw is hashed and counted once."""
        where = self.folder or self.label_file
        return f"{'folder' if self.folder else 'labels'}:{Path(where).resolve()}" if where else self.name

    def paths(self) -> list[Path] | None:
        """The images of the set as they are now, or None when its folder or label file is gone."""
        if self.listed is not None:
            return list(self.listed)
        if self.folder is not None:
            return find_images(self.folder, follow_links=self.follow_links) if self.folder.is_dir() else None
        if self.label_file is not None and self.label_file.exists():
            try:
                return list(read_labels(self.label_file).paths)
            except UserError:
                return None
        return None


def _read(run_file: Path) -> dict[str, Any]:
    try:
        record = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _sets_of(record: Mapping[str, Any], where: str) -> list[Seen]:
    """The image sets one run.json names (not its parents')."""
    config = record.get("config") or {}
    labels = record.get("labels") or {}
    data = record.get("data") or {}
    links = bool(config.get("follow_links", False))
    found = []
    if record.get("stage") == "pretrain" and config.get("data"):
        name = f"the pretraining folder {config['data']} ({where})"
        found.append(Seen(name, folder=Path(config["data"]), follow_links=links))
    if labels.get("path") or labels.get("content_sha256"):
        label_file = Path(labels["path"]) if labels.get("path") else None
        recorded = tuple(labels.get("content_sha256") or ())
        found.append(Seen(f"the fine-tuning labels of {where}", label_file=label_file, recorded=recorded))
    unlabeled = data.get("unlabeled") or config.get("unlabeled")
    if unlabeled:
        found.append(
            Seen(f"the --unlabeled folder {unlabeled} of {where}", folder=Path(unlabeled), follow_links=links)
        )
    distill_labels = (record.get("distill_labels") or {}).get("path")
    if distill_labels:
        found.append(Seen(f"the --labels of {where}", label_file=Path(distill_labels)))
    return found


def seen_in_training(artifact: Path) -> list[Seen]:
    """Every image set a model saw: its own run.json's and those of its parents (teacher, pretrain).

    `artifact` is the model file; its run.json lies beside it. A parent whose file is gone adds
    nothing (its sets cannot be known).
    """
    found: list[Seen] = []
    queue, visited = [Path(artifact)], set()
    while queue:
        path = queue.pop(0)
        run_file = path.parent / "run.json"
        if run_file.resolve() in visited or not run_file.is_file():
            continue
        visited.add(run_file.resolve())
        record = _read(run_file)
        found += _sets_of(record, path.parent.name)
        parents = [record.get("parent"), (record.get("student") or {}).get("pretrain")]
        queue += [
            Path(parent["path"]) for parent in parents if isinstance(parent, dict) and parent.get("path")
        ]
    return found


@dataclass(frozen=True)
class Overlap:
    """Test images found in one set a model saw: how many, the first of them, and which."""

    other: str
    count: int
    example: str | None
    indices: frozenset[int] = frozenset()

    def message(self) -> str:
        """One line for the error or the report."""
        return f"{self.count} test image(s) are also in {self.other}, e.g. {self.example}"

    def to_json(self) -> dict[str, Any]:
        """What report.json keeps."""
        return {"with": self.other, "images": self.count, "example": self.example}


def find_overlap(test: ImageHashes, paths: Sequence[Path], other: ImageHashes | None, recorded: Iterable[str],
                 name: str) -> Overlap:  # fmt: skip
    """Test images whose resolved path, content hash or picture (a re-encoded or resized copy) is in a set.

    `other` holds the hashes of `paths` (None when only `recorded` content hashes are known).
    """
    resolved = {path.resolve() for path in paths}
    digests = (set(other.sha) if other is not None else set()) | set(recorded)
    digests.discard("")
    pairs = zip(test.paths, test.sha, strict=True)
    found = np.array([path.resolve() in resolved or digest in digests for path, digest in pairs], dtype=bool)
    if other is not None and len(test.paths):
        found |= near_copies(test, other)
    indices = np.flatnonzero(found).tolist()
    return Overlap(name, len(indices), str(test.paths[indices[0]]) if indices else None, frozenset(indices))


@dataclass
class Leaks:
    """The overlap of the test images with everything the models saw.

    Attributes:
        overlaps: one entry per set that holds test images (sets without any are left out).
        seen: per model key, how many distinct test images that model saw.
        unchecked: one line per set that could not be checked (its folder or label file is gone).
    """

    overlaps: list[Overlap] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    unchecked: list[str] = field(default_factory=list)


def find_leaks(
    test_paths: Sequence[Path],
    seen_by: Mapping[str, Sequence[Seen]],
    cache: HashCache,
    say: Callable[[str], None] | None = None,
) -> Leaks:
    """Which test images each model saw, through any of its sets (each set hashed once, through `cache`).

    Args:
        test_paths: the test images.
        seen_by: per model (any key, e.g. its artifact path), the sets it saw.
        cache: the run's hash cache; saved afterwards.
        say: told, in one line, before a set of more than SAY_ABOVE new images is hashed.
    """

    def announce(name: str) -> Callable[[int], None]:
        def count(new: int) -> None:
            if say is not None and new > SAY_ABOVE:
                say(
                    f"hashing {new} images of {name} for the leakage guard (once: they are cached in {cache.file})"
                )

        return count

    test = cache.hashes(test_paths, announce("the test set"))
    leaks = Leaks()
    by_key: dict[str, Overlap] = {}
    for sets in seen_by.values():
        for seen in sets:
            if seen.key in by_key:
                continue
            paths = seen.paths()
            if paths is None and not seen.recorded:
                leaks.unchecked.append(f"cannot check {seen.name} for test images: it no longer exists")
                by_key[seen.key] = Overlap(seen.name, 0, None)
                continue
            other = cache.hashes(paths, announce(seen.name)) if paths else None
            by_key[seen.key] = find_overlap(test, paths or [], other, seen.recorded, seen.name)
    cache.save()
    leaks.overlaps = [item for item in by_key.values() if item.count]
    for model, sets in seen_by.items():
        leaks.seen[model] = len(frozenset().union(*(by_key[seen.key].indices for seen in sets)))
    return leaks


HASH_CACHE = "image_hashes.npz"
"""The guard's hashes of every image it compared, in evaluate's folder, so that a second evaluation
of a run with a large pretraining folder reads them instead of decoding every image."""

SAY_ABOVE = 2000
"""New images (not in the cache) above which hashing them is announced: about 10 s of decoding."""

BANK = "the kNN bank"
"""`Leaks.seen`'s key for what the bank alone gives (kNN on random-init features)."""


def guard(test_paths: Sequence[Path], bank: Sequence[Path] | None, backbone: Path | None,
          classifiers: Sequence[Path], allow: bool, cache_file: Path | None,
          say: Callable[[str], None] | None = None) -> Leaks:  # fmt: skip
    """Test images that any model saw (DESIGN.md traps 8 and 15), refused unless `allow`.

    What each model saw is read from its run.json and its parents': the pretraining folder, the
    fine-tuning labels (or the hashes run.json recorded), FixMatch's and distill's `--unlabeled`
    folders, distill's `--labels`; the backbone's kNN and probe see the bank too. `Leaks.seen` is
    keyed by artifact path (as str) and BANK.

    Raises:
        UserError: any overlap, unless `allow` (then the caller reports it, in a column of its table).
    """
    bank_sets = [Seen(BANK, listed=tuple(bank))] if bank is not None else []
    seen_by: dict[str, list[Seen]] = {BANK: bank_sets}
    if backbone is not None:
        seen_by[str(backbone)] = seen_in_training(backbone) + bank_sets
    for path in classifiers:
        seen_by[str(path)] = seen_in_training(path)
    leaks = find_leaks(test_paths, seen_by, HashCache(cache_file), say)
    if leaks.overlaps and not allow:
        raise UserError(
            f"{'; '.join(item.message() for item in leaks.overlaps)}: scores on images a model has seen are not "
            "test scores; keep test images out of what the models train on, or pass --allow-overlap to report "
            "them in a column (transductive use)"
        )
    return leaks
