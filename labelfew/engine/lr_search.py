"""`--lr auto`: brief trainings at a few multiples of the lr rule, ranked on held-out labels.

No fixed fine-tuning lr is right everywhere: on 1% of CIFAR-10 (~120 steps) 4× SimCLR's rule
0.05·B/256 wrecked the pretrained features, while on 3,068 real photos (~300 steps) the rule
underfitted (benchmarks/RESULTS.md). So a stratified fifth of the labels is held out, each
candidate is trained briefly on the rest from the same start, and the best held-out top-1 wins
(ties: the lower held-out loss, which moves in finer steps than top-1 on a few dozen images).

The search costs at most SEARCH_BUDGET times the fine-tuning's own training steps: on 20–30
labels four candidates on five folds of 50 steps each were 1,000 steps against its 60. Within
that budget (half of it for the first fold when there are more), further fifths are held out in
turn (a fifth of a few hundred labels is too few to rank lrs 2× apart) only for the candidates
still in the race: after each fold a candidate that diverged, or whose pooled top-1 falls more
than ELIMINATION_SE standard errors behind the leader, is dropped, and the search stops when one
is left. Every finished (candidate, fold) is written to lr_search.json at once, so that a
Ctrl-C and rerun continues the search instead of redoing it.

The stage supplies how one candidate trains (`search`'s `train` callback); this module owns the
candidates, the split, the budget, the choice and the record, so that any stage that fine-tunes a
classifier can search the same way.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
SEARCH_BUDGET = 1.0
"""The search's training steps, all candidates and folds together, against the fine-tuning's own
(`--help` of `--lr` says it): `--lr auto` at most doubles a fine-tuning's training time. A brief
training is never shorter than one epoch, so with fewer than 4 fine-tuning steps in all the four
candidates' single epochs may exceed it."""
ELIMINATION_SE = 2.0
"""A candidate whose pooled held-out top-1 is this many binomial standard errors below the
leader's is dropped: on hymenoptera's first fifth (49 images) ×4 was 8 points behind ×1 and
won over all five (benchmarks/RESULTS.md), so one standard error (6.5 points) would drop winners."""


@dataclass(frozen=True)
class Candidate:
    """One brief training (or, pooled, one lr over all folds): lr, epochs, steps in all, scores (None: diverged)."""

    lr: float
    epochs: int
    steps: int
    val_top1: float | None = None
    val_loss: float | None = None
    final_loss: float | None = None


@dataclass(frozen=True)
class Plan:
    """How long each brief training is and how many steps the whole search may take."""

    epochs: int
    """Epochs of each brief training (one candidate on one fold)."""
    steps_per_epoch: int
    """Steps an epoch on a fold's fitted labels."""
    budget: int
    """Training steps of the whole search: SEARCH_BUDGET × the fine-tuning's steps."""


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
    """A candidate's length before the budget: a quarter of the epochs, and at least 50 steps, but never more than all.

    50 steps is enough for a too-high lr to show (its loss stalls or the features wreck) on a few
    hundred labels; `search_plan` shortens it when four of them exceed the budget.
    """
    return min(epochs, max(math.ceil(epochs / 4), math.ceil(50 / max(steps_per_epoch, 1))))


def search_plan(epochs: int, steps_per_epoch: int, fit_steps_per_epoch: int, folds: int = 1) -> Plan:
    """The brief trainings' length: `search_epochs`, shortened until the four candidates on the
    first fold fit the budget (SEARCH_BUDGET × `epochs` × `steps_per_epoch`, the fine-tuning's
    steps), or half of it when there are further folds, so that the candidates still in the race
    after the first can be scored on at least one more."""
    fit = max(fit_steps_per_epoch, 1)
    budget = math.ceil(SEARCH_BUDGET * epochs * max(steps_per_epoch, 1))
    first_fold = budget if folds == 1 else budget // 2
    affordable = max(1, first_fold // (len(SEARCH_FACTORS) * fit))
    return Plan(min(search_epochs(epochs, fit), affordable), fit, budget)


HELD_OUT_TARGET = 250
"""Held-out labels pooled over folds: a fifth of a few hundred labels cannot rank lrs 2× apart.

On hymenoptera's 245 labels the single fifth (49 images) put the four candidates within one
binomial standard deviation (±6.5 points at 70%) and chose ×1, 11 points below ×4 on the 153 val
photos (benchmarks/RESULTS.md). So while one fifth holds fewer than this, further fifths may be
held out in turn (at most all five, which scores every label once: ±2.9 points at n = 245), as the
budget allows.
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


@dataclass
class Progress:
    """The finished (candidate, fold) trainings of a search, written to lr_search.json as each ends.

    A rerun of the same search (same fingerprint) reads them back and trains only the others, so a
    Ctrl-C loses at most the brief training under way.
    """

    folder: Path
    key: dict[str, Any]
    accelerator: Any
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path, key: dict[str, Any], accelerator: Any, restart: bool) -> Progress:
        """The finished trainings of an identical search in `folder` (none with `restart`)."""
        record_file = folder / SEARCH_FILE
        progress = cls(folder, key, accelerator)
        if restart or not record_file.is_file():
            return progress
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record.get("fingerprint") == _as_read_back(key):
            progress.runs = dict(record.get("runs", {}))
        return progress

    def get(self, factor: int, fold: int) -> Candidate | None:
        """The stored training of `factor` on `fold`, if it finished before."""
        stored = self.runs.get(f"{factor}:{fold}")
        return None if stored is None else Candidate(**stored)

    def put(self, factor: int, fold: int, run: Candidate) -> None:
        """Stores one finished training and writes the partial record (main process)."""
        self.runs[f"{factor}:{fold}"] = asdict(run)
        partial = {"fingerprint": _as_read_back(self.key), "runs": self.runs}
        on_main_process(self.accelerator, lambda: atomic_write_json(self.folder / SEARCH_FILE, partial))


def search(
    rule: float,
    optimizer: str,
    batch: int,
    class_names: Sequence[str],
    folds: Sequence[tuple[LabeledImages, LabeledImages]],
    train: Callable[[float, int, int], Candidate],
    plan: Plan,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Trains rule × each of SEARCH_FACTORS on the first fold, the survivors on further folds while
    the budget lasts; keeps the best pooled top-1 (ties: lower held-out loss, then smaller lr).

    `train(lr, fold, epochs)` fits `folds[fold][0]` for `epochs` and scores `folds[fold][1]`. Every
    process runs this (torchrun): `train` must be collective in the same order everywhere.

    Returns:
        The record for run.json: rule, candidates (each with the folds it ran and whether it was
        dropped), chosen lr, held-out counts, budget and steps, seconds, notes.
    """
    weights = [len(check) for _, check in folds]
    record: dict[str, Any] = {"rule": rule, "optimizer": optimizer, "batch": batch, "candidates": [],
                              "fit_images": len(folds[0][0]), "held_out_images": 0, "folds": 0,
                              "budget_steps": plan.budget, "steps": 0}  # fmt: skip
    unchecked = sorted(set(class_names) - {label for _, check in folds for label in check.labels})
    if unchecked:
        record["note"] = (
            f"{len(unchecked)} class(es) with fewer than 3 labels held none out: {', '.join(unchecked[:5])}"
        )
    if sum(weights) == 0:
        record.update(chosen=rule, note="no class has 3 labels to hold one out: the rule's lr, not searched")
        return record
    started = time.perf_counter()
    results: dict[int, list[Candidate]] = {factor: [] for factor in SEARCH_FACTORS}
    alive = list(SEARCH_FACTORS)
    for fold in range(len(folds)):
        if fold and record["steps"] + len(alive) * plan.epochs * plan.steps_per_epoch > plan.budget:
            break
        for factor in alive:
            run = progress.get(factor, fold) if progress is not None else None
            if run is None:
                run = train(rule * factor, fold, plan.epochs)
                if progress is not None:
                    progress.put(factor, fold, run)
            results[factor].append(run)
            record["steps"] += run.steps
        record["folds"], record["held_out_images"] = fold + 1, sum(weights[: fold + 1])
        alive = _survivors(alive, results, weights)
        if len(alive) < 2:
            break
    pooled = {factor: _pooled(runs, weights[: len(runs)]) for factor, runs in results.items() if runs}
    for factor, run in pooled.items():
        record["candidates"].append({**asdict(run), "factor": factor, "folds": len(results[factor]),
                                     "dropped": factor not in alive})  # fmt: skip
    record["chosen"] = max((pooled[factor] for factor in alive), key=_rank).lr if alive else rule
    record["seconds"] = time.perf_counter() - started
    return record


def _rank(candidate: Candidate) -> tuple[float, float, float]:
    """Higher is better: held-out top-1, then lower held-out loss, then smaller lr."""
    return (candidate.val_top1 or 0.0, -(candidate.val_loss or 0.0), -candidate.lr)


def _survivors(alive: list[int], results: dict[int, list[Candidate]], weights: Sequence[int]) -> list[int]:
    """The candidates still in the race: not diverged, and within ELIMINATION_SE standard errors of
    the leader's pooled top-1 on the held-out labels scored so far."""
    pooled = {factor: _pooled(results[factor], weights[: len(results[factor])]) for factor in alive}
    scored = {factor: run for factor, run in pooled.items() if run.val_top1 is not None}
    if not scored:
        return []
    leader = max(scored.values(), key=_rank)
    top1 = leader.val_top1 or 0.0
    count = sum(weights[: len(results[alive[0]])])
    # A leader at 0% or 100% would make the spread 0; one image's worth of variance keeps it honest.
    spread = ELIMINATION_SE * math.sqrt(max(top1 * (1 - top1), 1 / count) / count)
    return [factor for factor, run in scored.items() if top1 - (run.val_top1 or 0.0) <= spread]


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
    """The record of an identical finished search in `folder` (a resumed run does not redo it)."""
    record_file = folder / SEARCH_FILE
    if restart or not record_file.is_file():
        return None
    record = json.loads(record_file.read_text(encoding="utf-8"))
    if record.get("fingerprint") != _as_read_back(key) or "chosen" not in record:
        return None
    return {**record, "reused": True}


def save(folder: Path, key: dict[str, Any], record: dict[str, Any], accelerator: Any) -> None:
    """Writes the record with its fingerprint (main process; every process calls this)."""
    record["fingerprint"] = _as_read_back(key)
    on_main_process(accelerator, lambda: atomic_write_json(folder / SEARCH_FILE, record))


def _as_read_back(key: dict[str, Any]) -> Any:
    """The key as JSON gives it back (tuples become lists), so that a fresh key compares equal."""
    return json.loads(json.dumps(key, default=str))
