"""Class imbalance: `--class-weights none|auto|FILE` for fine-tuning's cross-entropy, and the
warning line a stage prints when the classes are far apart in size.

`auto` weighs class c by ``N / (C · n_c)`` (N labelled images, C classes, n_c of class c), as
scikit-learn's ``compute_class_weight("balanced")`` and LightlyTrain's class weights: every class
then carries the same total weight N / C, and the weight per *image* averages 1 (Σ n_c w_c = N),
so an already balanced set gets weights of exactly 1. A FILE is a CSV ``class,weight`` with one
row per class of the labels, each weight positive and finite (its scale does not matter for
PyTorch's weighted mean, which divides by the batch's summed weights).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from labelfew.errors import UserError

IMBALANCE_WARNING = 10.0
"""The largest class's count over the smallest's from which a stage warns (LightlyTrain #964's
users had 1,756 against 111, 16×)."""
BALANCED_HEADLINE = 1.5
"""The largest test class's count over the smallest's from which evaluate's table leads with
balanced accuracy (the mean per-class recall): at 1.5× a model that always answers the largest
class already scores 60% top-1 on two classes, where its balanced accuracy is 50%."""


def auto_weights(counts: Mapping[str, int]) -> dict[str, float]:
    """Inverse class frequency, ``N / (C · n_c)``: sklearn's ``compute_class_weight("balanced")``.

    Raises:
        ValueError: a class with no images (the labels never give one).
    """
    total, classes = sum(counts.values()), len(counts)
    if any(count <= 0 for count in counts.values()):
        raise ValueError("every class needs at least one image")
    return {name: total / (classes * count) for name, count in counts.items()}


def read_class_weights(path: Path, class_names: Sequence[str]) -> dict[str, float]:
    """The weights of a CSV ``class,weight``, one row per class of `class_names`.

    Raises:
        UserError: one line naming the file (and the class): unreadable, no such columns, a class
            the labels do not have, a class of the labels missing or given twice, a weight that is
            not a positive finite number.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"--class-weights {path}: cannot be read as a UTF-8 CSV ({error})") from None
    columns = [(name or "").strip() for name in next(csv.reader(io.StringIO(text)), [])]
    if "class" not in columns or "weight" not in columns:
        raise UserError(
            f"--class-weights {path}: the header must be class,weight (found: {', '.join(columns) or 'nothing'})"
        )
    known, weights = set(class_names), {}
    for line, row in enumerate(rows, start=2):
        row = {(key or "").strip(): (value or "").strip() for key, value in row.items() if key is not None}
        name, value = row.get("class", ""), row.get("weight", "")
        if name not in known:
            raise UserError(f"--class-weights {path}:{line}: class {name!r} is not a class of the labels "
                            f"({', '.join(class_names[:10])})")  # fmt: skip
        if name in weights:
            raise UserError(f"--class-weights {path}:{line}: class {name!r} is given twice")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(
                f"--class-weights {path}:{line}: class {name!r} has weight {value!r}; use a positive finite number"
            )
        weights[name] = weight
    missing = [name for name in class_names if name not in weights]
    if missing:
        raise UserError(f"--class-weights {path}: no weight for class {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + "; give every class a row")  # fmt: skip
    return weights


def class_weights(value: str, class_names: Sequence[str], counts: Mapping[str, int]) -> list[float] | None:
    """`--class-weights` resolved to one weight per class in `class_names` order, or None for `none`.

    `counts`: the images per class that the run trains on (`auto`'s frequencies).

    Raises:
        UserError: a bad FILE (`read_class_weights`), or one that does not exist.
    """
    if value == "none":
        return None
    if value == "auto":
        weights = auto_weights({name: counts.get(name, 0) for name in class_names})
    else:
        path = Path(value)
        if not path.is_file():
            raise UserError(
                f"--class-weights {value}: use none, auto or a CSV file class,weight (no such file)"
            )
        weights = read_class_weights(path, class_names)
    return [weights[name] for name in class_names]


def imbalance_warning(counts: Mapping[str, int], what: str, advice: str) -> str | None:
    """One line when the largest class has at least `IMBALANCE_WARNING` × the smallest's images,
    naming both (`what`: whose classes, e.g. "labels.csv"; `advice`: what to do), else None."""
    present = {name: count for name, count in counts.items() if count > 0}
    if len(present) < 2:
        return None
    largest = max(present, key=lambda name: present[name])
    smallest = min(present, key=lambda name: present[name])
    ratio = present[largest] / present[smallest]
    if ratio < IMBALANCE_WARNING:
        return None
    return (f"{what}: imbalanced classes: {largest!r} has {present[largest]} images, {smallest!r} "
            f"{present[smallest]} ({ratio:.0f}×); {advice}")  # fmt: skip


def imbalance(counts: Mapping[str, int]) -> dict[str, Any]:
    """The largest and smallest class of `counts` (classes with images), their counts and ratio,
    and the headline metric this calls for: `balanced_accuracy` from `BALANCED_HEADLINE` on, else `top1`."""
    present = {name: count for name, count in counts.items() if count > 0}
    if not present:
        return {"ratio": 1.0, "headline": "top1"}
    largest = max(present, key=lambda name: present[name])
    smallest = min(present, key=lambda name: present[name])
    ratio = present[largest] / present[smallest]
    return {"largest": largest, "largest_images": present[largest], "smallest": smallest,
            "smallest_images": present[smallest], "ratio": ratio,
            "headline": "balanced_accuracy" if ratio >= BALANCED_HEADLINE else "top1"}  # fmt: skip
