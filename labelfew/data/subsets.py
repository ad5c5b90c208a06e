"""Class-balanced, seeded label subsets (the 1% / 10% splits).

Each image gets a rank from sha256(seed, path relative to the label root); a class keeps its
lowest-ranked images. So a subset depends only on the seed and the set of images, not on the
CSV's row order or the machine, and for one seed the 1% subset is contained in the 10% one.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

from labelfew.data import multilabel
from labelfew.data.labels import LabeledImages
from labelfew.errors import UserError


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def balanced_subset(
    labeled: LabeledImages,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    allow_empty: bool = False,
) -> LabeledImages:
    """Keeps `fraction` of each class (rounded) or `per_class` images of each class.

    Args:
        labeled: the full labelled set.
        fraction: in (0, 1]; each class keeps round(fraction × its size) images.
        per_class: a count per class (>= 1); classes with fewer images keep all of them.
        seed: selects which images; the same seed gives the same subset.
        allow_empty: keep going when the fraction rounds a class down to zero images
            (that class is then absent from the subset).

    Raises:
        UserError: invalid fraction/count, or a class left empty without `allow_empty`.
    """
    if (fraction is None) == (per_class is None):
        raise UserError("give exactly one of --fraction or --per-class")
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f"--fraction {fraction} is out of range; use a value in (0, 1], e.g. 0.01 for 1%")
    if per_class is not None and per_class < 1:
        raise UserError(f"--per-class {per_class} is out of range; use at least 1")
    by_class: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for path, label in zip(labeled.paths, labeled.labels, strict=True):
        by_class[label].append((labeled.relative_key(path), path))
    chosen: list[tuple[str, Path, str]] = []
    empty: list[str] = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda item: _rank(seed, item[0]))
        count = per_class if per_class is not None else round(fraction * len(members))  # type: ignore[operator]
        if count == 0:
            empty.append(label)
            continue
        chosen.extend((key, path, label) for key, path in members[:count])
    if empty and not allow_empty:
        raise UserError(
            f"--fraction {fraction} leaves {len(empty)} class(es) empty ({', '.join(empty[:5])}); "
            "use a larger fraction, --per-class, or --allow-empty"
        )
    chosen.sort(key=lambda item: (item[2], item[0]))
    return LabeledImages(
        paths=tuple(path for _, path, _ in chosen),
        labels=tuple(label for _, _, label in chosen),
        root=labeled.root,
    )


def stratified_folds(labeled: LabeledImages, folds: int, seed: int) -> list[LabeledImages]:
    """`folds` disjoint held-out sets, each about 1/folds of every class, seeded as `balanced_subset`.

    A class's images in rank order are cut at round(k × n / folds); so with `folds` = 5 the first
    fold is `balanced_subset(fraction=0.2)`'s fifth, and every label is held out exactly once.
    A class with fewer than 3 labels is never held out (round(n / 5) = 0 for it).
    """
    by_class: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for path, label in zip(labeled.paths, labeled.labels, strict=True):
        by_class[label].append((labeled.relative_key(path), path))
    held: list[list[tuple[str, Path, str]]] = [[] for _ in range(folds)]
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda item: _rank(seed, item[0]))
        if len(members) < 3:
            continue
        cuts = [round(k * len(members) / folds) for k in range(folds + 1)]
        for fold in range(folds):
            held[fold].extend((key, path, label) for key, path in members[cuts[fold] : cuts[fold + 1]])
    return [
        LabeledImages(
            tuple(path for _, path, _ in chosen), tuple(label for _, _, label in chosen), labeled.root
        )
        for chosen in (sorted(fold, key=lambda item: (item[2], item[0])) for fold in held)
    ]


def subset_hash(labeled: LabeledImages) -> str:
    """A sha256 over the (relative path, label) pairs, independent of row order."""
    digest = hashlib.sha256()
    for key, label in sorted(
        (labeled.relative_key(path), label) for path, label in zip(labeled.paths, labeled.labels, strict=True)
    ):
        digest.update(f"{key}\0{label}\n".encode())
    return digest.hexdigest()


def cover_subset(
    labeled: LabeledImages, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> LabeledImages:
    """A multi-label subset that keeps a positive of every class: a greedy cover, then a seeded fill.

    Images are ranked as in `balanced_subset` (sha256 of seed and path). Classes are visited from
    the rarest: each takes its lowest-ranked images until it has `per_class` positives in the
    subset (1 with `fraction`), counting those that other classes already brought in. With
    `fraction` the lowest-ranked remaining images then fill the subset up to round(fraction × N).
    A greedy cover, not iterative stratification (Sechidis et al. 2011): simpler, and at a few
    labels the cover is what matters.

    Raises:
        UserError: neither or both of fraction and per_class.
    """
    if (fraction is None) == (per_class is None):
        raise UserError("give exactly one of --fraction or --per-class")
    ranked = sorted(
        range(len(labeled)), key=lambda index: _rank(seed, labeled.relative_key(labeled.paths[index]))
    )
    sets = [set(multilabel.decode(label)) for label in labeled.labels]
    counts = labeled.counts()
    chosen: dict[int, None] = {}
    for name in sorted(counts, key=lambda name: (counts[name], name)):
        need = (per_class or 1) - sum(name in sets[index] for index in chosen)
        for index in (index for index in ranked if name in sets[index] and index not in chosen):
            if need <= 0:
                break
            chosen[index] = None
            need -= 1
    if fraction is not None:
        for index in ranked:
            if len(chosen) >= round(fraction * len(labeled)):
                break
            chosen.setdefault(index)
    return _pick(labeled, sorted(chosen, key=ranked.index))


def multilabel_holdout(labeled: LabeledImages, fraction: float, seed: int) -> LabeledImages:
    """The held-out part of a multi-label set: the round(fraction × N) lowest-ranked images, less
    any whose absence would leave a class without a positive to train on (the training part keeps
    every class, as `held_out_split` requires)."""
    ranked = sorted(
        range(len(labeled)), key=lambda index: _rank(seed, labeled.relative_key(labeled.paths[index]))
    )
    held = ranked[: round(fraction * len(labeled))]
    left = labeled.counts()
    kept = []
    for index in held:
        names = multilabel.decode(labeled.labels[index])
        if all(left[name] > 1 for name in names):
            kept.append(index)
            for name in names:
                left[name] -= 1
    return _pick(labeled, kept)


def _pick(labeled: LabeledImages, indices: list[int]) -> LabeledImages:
    return LabeledImages(tuple(labeled.paths[i] for i in indices), tuple(labeled.labels[i] for i in indices),
                         labeled.root)  # fmt: skip
