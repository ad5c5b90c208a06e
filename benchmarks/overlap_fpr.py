"""The leakage guard's false-positive rate: CIFAR-10's train/test pairs that it takes for copies.

Hashes CIFAR-10's 50,000 training and 10,000 test images (../shared/datasets/cifar10_jpg, unpacked
once into the cache folder) with `labelfew.data.image_hashes` and counts the (test, train) pairs
that `copy_pairs` calls copies. Every such pair is two distinct files; CIFAR-10 itself holds some
true near-duplicates across the split (Barz & Denzler 2020, "Do we train on test data?", found
~3% of its test images), so the count is an upper bound of the false positives: look at the
examples it prints. Also counts the DCT-hash candidates alone (before the coarse-picture check).

    python benchmarks/overlap_fpr.py --limit 2000     # 2,000 train and 2,000 test images: ~1 min
    python benchmarks/overlap_fpr.py                  # all 60,000 (hashing ~5 min on one core; cached)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from label_efficiency import ARCHIVE, unpack  # benchmarks/: the one unpacking of the archive

from labelfew.data.image_hashes import COPY_DISTANCE, HashCache, ImageHashes, copy_pairs
from labelfew.data.images import find_images

REPO = Path(__file__).resolve().parent.parent


def balanced(folder: Path, limit: int | None) -> list[Path]:
    """The first limit / 10 images of each class folder (all of them without a limit)."""
    per_class = None if limit is None else max(1, limit // 10)
    return [path for sub in sorted(folder.iterdir()) if sub.is_dir() for path in find_images(sub)[:per_class]]


def candidates(test: ImageHashes, train: ImageHashes) -> int:
    """Pairs within COPY_DISTANCE bits of DCT hash, before the coarse-picture check."""
    total, block = 0, max(1, (1 << 18) // max(1, len(train.paths)))
    for start in range(0, len(test.paths), block):
        total += int(
            (
                np.bitwise_count(test.picture[start : start + block, None] ^ train.picture) <= COPY_DISTANCE
            ).sum()
        )
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--limit", type=int, default=None, help="images per split (class-balanced); all without"
    )
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    parser.add_argument("--examples", type=int, default=10, help="flagged pairs to print")
    parser.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = parser.parse_args()
    root = unpack(ARCHIVE, args.cache)
    train_paths, test_paths = balanced(root / "train", args.limit), balanced(root / "test", args.limit)
    cache = HashCache(args.cache / f"overlap_hashes-{args.limit or 'all'}.npz")
    started = time.perf_counter()
    train, test = cache.hashes(train_paths), cache.hashes(test_paths)
    cache.save()
    hashed = time.perf_counter() - started
    started = time.perf_counter()
    rows, columns = copy_pairs(test, train)
    compared = time.perf_counter() - started
    pairs = len(test_paths) * len(train_paths)
    record = {
        "train_images": len(train_paths), "test_images": len(test_paths), "pairs": pairs,
        "dct_candidates": candidates(test, train), "flagged_pairs": len(rows),
        "flagged_test_images": len(set(rows.tolist())), "false_positive_rate_upper_bound": len(rows) / pairs,
        "hash_seconds": hashed, "compare_seconds": compared,
    }  # fmt: skip
    print(json.dumps(record, indent=2))
    for row, column in list(zip(rows.tolist(), columns.tolist(), strict=True))[: args.examples]:
        print(f"  {test_paths[row]}  ~  {train_paths[column]}")
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
