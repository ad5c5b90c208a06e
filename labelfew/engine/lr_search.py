"""`--lr auto`: brief trainings at a few multiples of the lr rule, ranked on held-out labels.

No fixed fine-tuning lr is right everywhere: on 1% of CIFAR-10 (~120 steps) 4× SimCLR's rule
0.05·B/256 wrecked the pretrained features, while on 3,068 real photos (~300 steps) the rule
underfitted (benchmarks/RESULTS.md). So a stratified fifth of the labels is held out, each
candidate is trained briefly on the rest from the same start, and the best held-out top-1 wins
(ties: the smaller lr). The stage supplies how one candidate trains (`search`'s `train`
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
from labelfew.data.subsets import balanced_subset
from labelfew.engine.accelerator import on_main_process
from labelfew.errors import UserError
from labelfew.fileio import atomic_write_json

SEARCH_FACTORS = (1, 2, 4, 8)
"""`--lr auto` tries the rule's lr times these: 4× the SGD rule was measured best on real photos
with ~300 steps, and below scratch on 1% CIFAR-10 (benchmarks/RESULTS.md)."""
SEARCH_FILE = "lr_search.json"


@dataclass(frozen=True)
class Candidate:
    """One brief training: its lr and length, and its scores (None: it diverged)."""

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


def search_split(labeled: LabeledImages, seed: int) -> tuple[LabeledImages, LabeledImages]:
    """(4/5 to fit, 1/5 to validate), stratified and seeded as `balanced_subset`: each class holds
    out round(n / 5) of its n labels, so a class with fewer than 3 has none held out."""
    held = balanced_subset(labeled, fraction=0.2, seed=seed + 2, allow_empty=True)
    held_paths = set(held.paths)
    kept = [
        (path, label)
        for path, label in zip(labeled.paths, labeled.labels, strict=True)
        if path not in held_paths
    ]
    fit = LabeledImages(tuple(path for path, _ in kept), tuple(label for _, label in kept), labeled.root)
    return fit, held


def search(
    rule: float,
    optimizer: str,
    batch: int,
    class_names: Sequence[str],
    fit: LabeledImages,
    check: LabeledImages,
    train: Callable[[float], Candidate],
) -> dict[str, Any]:
    """Trains a candidate at rule × each of SEARCH_FACTORS and keeps the best held-out top-1.

    Every process runs it (torchrun): `train` must be collective in the same order everywhere.

    Returns:
        The record for run.json: rule, candidates, chosen lr, held-out counts, seconds, notes.
    """
    record: dict[str, Any] = {"rule": rule, "optimizer": optimizer, "batch": batch, "candidates": [],
                              "fit_images": len(fit), "held_out_images": len(check)}  # fmt: skip
    unchecked = sorted(set(class_names) - set(check.labels))
    if unchecked:
        record["note"] = (
            f"{len(unchecked)} class(es) with fewer than 3 labels held none out: {', '.join(unchecked[:5])}"
        )
    if len(check) == 0:
        record.update(chosen=rule, note="no class has 3 labels to hold one out: the rule's lr, not searched")
        return record
    started = time.perf_counter()
    for factor in SEARCH_FACTORS:
        record["candidates"].append({**asdict(train(rule * factor)), "factor": factor})
    ranked = [item for item in record["candidates"] if item["val_top1"] is not None]
    # max keeps the first of equal values, and the candidates are in increasing lr.
    record["chosen"] = max(ranked, key=lambda item: item["val_top1"])["lr"] if ranked else rule
    record["seconds"] = time.perf_counter() - started
    return record


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
