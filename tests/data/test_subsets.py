"""Class-balanced seeded subsets: balanced, reproducible, nested (1% within 10%), independent of row order."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from labelfew.data.labels import LabeledImages, read_labels, write_labels
from labelfew.data.subsets import balanced_subset, subset_hash
from labelfew.errors import UserError

SIZES = {"ant": 200, "bee": 120, "cat": 300}


def _labeled(root: Path, sizes: dict[str, int] = SIZES) -> LabeledImages:
    """Paths need not exist for subsets; only read_labels checks them."""
    pairs = [
        (root / label / f"{index:04d}.png", label) for label, size in sizes.items() for index in range(size)
    ]
    return LabeledImages(tuple(path for path, _ in pairs), tuple(label for _, label in pairs), root)


def _shuffled(labeled: LabeledImages, seed: int) -> LabeledImages:
    pairs = list(zip(labeled.paths, labeled.labels, strict=True))
    random.Random(seed).shuffle(pairs)
    return LabeledImages(tuple(p for p, _ in pairs), tuple(label for _, label in pairs), labeled.root)


def _pairs(labeled: LabeledImages) -> set[tuple[Path, str]]:
    return set(zip(labeled.paths, labeled.labels, strict=True))


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_fraction_keeps_that_share_of_every_class(tmp_path: Path, fraction: float) -> None:
    full = _labeled(tmp_path)
    chosen = balanced_subset(full, fraction=fraction, seed=3)
    assert chosen.counts() == {label: round(fraction * size) for label, size in SIZES.items()}
    assert _pairs(chosen) <= _pairs(full)
    assert len(set(chosen.paths)) == len(chosen)


def test_per_class_keeps_that_many_or_all(tmp_path: Path) -> None:
    full = _labeled(tmp_path, {"ant": 10, "bee": 3, "cat": 25})
    assert balanced_subset(full, per_class=5, seed=0).counts() == {"ant": 5, "bee": 3, "cat": 5}
    assert balanced_subset(full, per_class=1, seed=0).counts() == {"ant": 1, "bee": 1, "cat": 1}


def test_same_seed_same_subset_other_seed_other_subset(tmp_path: Path) -> None:
    full = _labeled(tmp_path)
    first = balanced_subset(full, fraction=0.1, seed=7)
    assert balanced_subset(full, fraction=0.1, seed=7) == first
    others = [balanced_subset(full, fraction=0.1, seed=seed) for seed in (0, 1, 2)]
    assert all(_pairs(other) != _pairs(first) for other in others)
    assert all(other.counts() == first.counts() for other in others)


def test_subset_does_not_depend_on_row_order(tmp_path: Path) -> None:
    full = _labeled(tmp_path)
    reference = balanced_subset(full, fraction=0.1, seed=5)
    for shuffle_seed in range(3):
        assert balanced_subset(_shuffled(full, shuffle_seed), fraction=0.1, seed=5) == reference


def test_subset_does_not_depend_on_csv_row_order(tmp_path: Path) -> None:
    rows = []
    for label in ("x", "y"):
        for index in range(20):
            path = tmp_path / "img" / label / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (2, 2)).save(path)
            rows.append(f"img/{label}/{index}.png,{label}")
    (tmp_path / "ordered.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    random.Random(0).shuffle(rows)
    (tmp_path / "shuffled.csv").write_text("label_note,path,label\n" + "\n".join(f"n,{row}" for row in rows))
    ordered = balanced_subset(read_labels(tmp_path / "ordered.csv"), fraction=0.25, seed=1)
    shuffled = balanced_subset(read_labels(tmp_path / "shuffled.csv"), fraction=0.25, seed=1)
    assert ordered == shuffled
    assert subset_hash(ordered) == subset_hash(shuffled)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_percent_is_inside_ten_percent_for_a_seed(tmp_path: Path, seed: int) -> None:
    full = _labeled(tmp_path)
    small = balanced_subset(full, fraction=0.01, seed=seed)
    large = balanced_subset(full, fraction=0.1, seed=seed)
    assert len(small) > 0
    assert _pairs(small) <= _pairs(large)
    assert _pairs(balanced_subset(full, per_class=1, seed=seed)) <= _pairs(small)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, 2.0, float("nan")])
def test_fraction_out_of_range_is_refused(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(UserError, match="out of range"):
        balanced_subset(_labeled(tmp_path), fraction=fraction)


@pytest.mark.parametrize("per_class", [0, -3])
def test_per_class_below_one_is_refused(tmp_path: Path, per_class: int) -> None:
    with pytest.raises(UserError, match=r"--per-class .* out of range"):
        balanced_subset(_labeled(tmp_path), per_class=per_class)


def test_exactly_one_of_fraction_and_per_class(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="exactly one"):
        balanced_subset(_labeled(tmp_path))
    with pytest.raises(UserError, match="exactly one"):
        balanced_subset(_labeled(tmp_path), fraction=0.1, per_class=2)


def test_fraction_that_empties_a_class_is_refused_unless_allowed(tmp_path: Path) -> None:
    full = _labeled(tmp_path, {"big": 400, "tiny": 20})
    with pytest.raises(UserError, match=r"leaves 1 class\(es\) empty \(tiny\)"):
        balanced_subset(full, fraction=0.01, seed=0)
    allowed = balanced_subset(full, fraction=0.01, seed=0, allow_empty=True)
    assert allowed.counts() == {"big": 4}


def test_subset_rows_are_grouped_by_class(tmp_path: Path) -> None:
    chosen = balanced_subset(_shuffled(_labeled(tmp_path), 0), fraction=0.05, seed=0)
    assert list(chosen.labels) == sorted(chosen.labels)
    assert chosen.root == tmp_path


def test_subset_hash_depends_on_content_not_order(tmp_path: Path) -> None:
    full = _labeled(tmp_path)
    assert subset_hash(full) == subset_hash(_shuffled(full, 4))
    relabelled = LabeledImages(full.paths, ("bee", *full.labels[1:]), full.root)
    assert subset_hash(relabelled) != subset_hash(full)


def test_written_subset_reads_back_identically(tmp_path: Path) -> None:
    paths = []
    for label, size in {"ant": 30, "bee": 40}.items():
        for index in range(size):
            paths.append((tmp_path / "data" / label / f"{index}.png", label))
            paths[-1][0].parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (2, 2)).save(paths[-1][0])
    full = read_labels(tmp_path / "data")
    chosen = balanced_subset(full, fraction=0.1, seed=2)
    out = tmp_path / "splits" / "10pct.csv"
    write_labels(chosen, out)
    assert all(line.startswith("../data/") for line in out.read_text().splitlines()[1:])
    again = read_labels(out)
    assert again.paths == chosen.paths and again.labels == chosen.labels
    assert Counter(again.labels) == {"ant": 3, "bee": 4}
    assert _pairs(again) == _pairs(chosen)
