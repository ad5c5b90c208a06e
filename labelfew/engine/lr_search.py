"""`--lr auto`: brief trainings at a few multiples of the lr rule, ranked on held-out labels.

No fixed fine-tuning lr is right everywhere: on 1% of CIFAR-10 (~120 steps) 4× SimCLR's rule
0.05·B/256 wrecked the pretrained features, while on 3,068 real photos (~300 steps) the rule
underfitted (benchmarks/RESULTS.md). So a stratified fifth of the labels is held out (several
fifths in turn when one is small), each candidate is trained briefly on the rest from the same
start, and the best held-out top-1, pooled over the folds, wins (ties: the smaller lr). The stage supplies how one candidate trains (`search`'s `train`
callback); this module owns the candidates, the split, the choice and the record, so that any
stage that fine-tunes a classifier can search the same way.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labelfew.data.labels import LabeledImages
from labelfew.data.subsets import stratified_folds
from labelfew.engine.accelerator import on_main_process
from labelfew.errors import UserError
from labelfew.fileio import atomic_write_json

SEARCH_FACTORS = (1, 2, 4, 8)
"""`--lr auto` tries the rule's lr times these: 4× the SGD rule was measured best on real photos
with ~300 steps, and below scratch on 1% CIFAR-10 (benchmarks/RESULTS.md)."""
SEARCH_FILE = "lr_search.json"


@dataclass(frozen=True)
class Candidate:
    """One brief training (or, pooled, one lr over all folds): lr, epochs, steps in all, scores (None: diverged)."""

    lr: float
    epochs: int
    steps: int
    val_top1: float | None = None
    val_loss: float | None = None
    final_loss: float | None = None


def explicit_lr(value: float | str) -> float | None:
    """`--lr` as a number, or None for `auto`."""
    if value == "auto":
        return None
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"--lr {value}: use auto or a positive number, e.g. 0.05") from None
    if not number > 0:
        raise UserError(f"--lr {value}: use auto or a positive number, e.g. 0.05")
    return number


def search_epochs(epochs: int, steps_per_epoch: int) -> int:
    """A candidate's length: a quarter of the epochs, and at least 50 steps, but never more than all.

    50 steps is enough for a too-high lr to show (its loss stalls or the features wreck) on a few
    hundred labels; a quarter of the schedule keeps the four candidates below the final run's cost
    on large label sets (4 × 1/4 × 4/5 of the images = 0.8 of it).
    """
    return min(epochs, max(math.ceil(epochs / 4), math.ceil(50 / max(steps_per_epoch, 1))))


HELD_OUT_TARGET = 250
"""Held-out labels pooled over folds: a fifth of a few hundred labels cannot rank lrs 2× apart.

On hymenoptera's 245 labels the single fifth (49 images) put the four candidates within one
binomial standard deviation (±6.5 points at 70%) and chose ×1, 11 points below ×4 on the 153 val
photos (benchmarks/RESULTS.md). So while one fifth holds fewer than this, further fifths are held
out in turn (at most all five, which scores every label once: ±2.9 points at n = 245), at one
more brief training per candidate each.
"""


def search_folds(labeled: LabeledImages, seed: int) -> list[tuple[LabeledImages, LabeledImages]]:
    """(fit, held out) pairs: disjoint stratified fifths held out in turn, the others fitted.

    One fifth when it holds at least HELD_OUT_TARGET labels, otherwise as many fifths as reach
    it (at most 5; empty fifths are skipped). A class with fewer than 3 labels is never held out.
    Seeded as `balanced_subset`.
    """
    fifths = stratified_folds(labeled, folds=5, seed=seed + 2)
    held_out = [fifth for fifth in fifths if len(fifth)]  # 3 or 4 labels a class leave some fifths empty
    if not held_out:
        return [(labeled, fifths[0])]  # nothing to hold out: `search` then keeps the rule's lr
    count = min(len(held_out), max(1, math.ceil(HELD_OUT_TARGET / len(held_out[0]))))
    pairs = []
    for held in held_out[:count]:
        held_paths = set(held.paths)
        kept = [
            (path, label)
            for path, label in zip(labeled.paths, labeled.labels, strict=True)
            if path not in held_paths
        ]
        fit = LabeledImages(tuple(path for path, _ in kept), tuple(label for _, label in kept), labeled.root)
        pairs.append((fit, held))
    return pairs


def search(
    rule: float,
    optimizer: str,
    batch: int,
    class_names: Sequence[str],
    folds: Sequence[tuple[LabeledImages, LabeledImages]],
    train: Callable[[float, int], Candidate],
) -> dict[str, Any]:
    """Trains a candidate at rule × each of SEARCH_FACTORS on every fold; keeps the best pooled top-1.

    `train(lr, fold)` fits `folds[fold][0]` and scores `folds[fold][1]`. Every process runs this
    (torchrun): `train` must be collective in the same order everywhere.

    Returns:
        The record for run.json: rule, candidates, chosen lr, held-out counts, seconds, notes.
    """
    held_out = sum(len(check) for _, check in folds)
    record: dict[str, Any] = {"rule": rule, "optimizer": optimizer, "batch": batch, "candidates": [],
                              "fit_images": len(folds[0][0]), "held_out_images": held_out,
                              "folds": len(folds)}  # fmt: skip
    unchecked = sorted(set(class_names) - {label for _, check in folds for label in check.labels})
    if unchecked:
        record["note"] = (
            f"{len(unchecked)} class(es) with fewer than 3 labels held none out: {', '.join(unchecked[:5])}"
        )
    if held_out == 0:
        record.update(chosen=rule, note="no class has 3 labels to hold one out: the rule's lr, not searched")
        return record
    started = time.perf_counter()
    for factor in SEARCH_FACTORS:
        runs = [train(rule * factor, fold) for fold in range(len(folds))]
        weights = [len(check) for _, check in folds]
        record["candidates"].append({**asdict(_pooled(runs, weights)), "factor": factor})
    ranked = [item for item in record["candidates"] if item["val_top1"] is not None]
    # max keeps the first of equal values, and the candidates are in increasing lr.
    record["chosen"] = max(ranked, key=lambda item: item["val_top1"])["lr"] if ranked else rule
    record["seconds"] = time.perf_counter() - started
    return record


def _pooled(runs: Sequence[Candidate], weights: Sequence[int]) -> Candidate:
    """One candidate's folds as one: held-out scores weighted by fold size (diverged if any fold did)."""
    first = runs[0]
    if any(run.val_top1 is None or run.val_loss is None or run.final_loss is None for run in runs):
        return Candidate(first.lr, first.epochs, sum(run.steps for run in runs))
    total = sum(weights)

    def mean(values: Sequence[float]) -> float:
        return sum(value * weight for value, weight in zip(values, weights, strict=True)) / total

    return Candidate(
        first.lr,
        first.epochs,
        sum(run.steps for run in runs),
        val_top1=mean([run.val_top1 for run in runs]),  # type: ignore[misc]
        val_loss=mean([run.val_loss for run in runs]),  # type: ignore[misc]
        final_loss=sum(run.final_loss for run in runs) / len(runs),  # type: ignore[misc]
    )


def reuse(folder: Path, key: dict[str, Any], restart: bool) -> dict[str, Any] | None:
    """The record of an identical search already run in `folder` (a resumed run does not redo it)."""
    record_file = folder / SEARCH_FILE
    if restart or not record_file.is_file():
        return None
    record = json.loads(record_file.read_text(encoding="utf-8"))
    if record.get("fingerprint") != _as_read_back(key):
        return None
    return {**record, "reused": True}


def save(folder: Path, key: dict[str, Any], record: dict[str, Any], accelerator: Any) -> None:
    """Writes the record with its fingerprint (main process; every process calls this)."""
    record["fingerprint"] = _as_read_back(key)
    on_main_process(accelerator, lambda: atomic_write_json(folder / SEARCH_FILE, record))


def _as_read_back(key: dict[str, Any]) -> Any:
    """The key as JSON gives it back (tuples become lists), so that a fresh key compares equal."""
    return json.loads(json.dumps(key, default=str))
