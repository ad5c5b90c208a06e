"""`--lr auto`'s search: its budget, the elimination, the tie-break and the progress a rerun reads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from labelfew.data.labels import LabeledImages
from labelfew.engine import lr_search

ACCELERATOR = SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None)


def _folds(tmp_path: Path, count: int = 20) -> list[tuple[LabeledImages, LabeledImages]]:
    half = count // 2
    labeled = LabeledImages(
        tuple(tmp_path / f"{i}.png" for i in range(count)), ("a",) * half + ("b",) * half, tmp_path
    )
    return lr_search.search_folds(labeled, seed=0)


def _trainer(
    scores: dict[int, list[float | None]], losses: dict[int, float] | None = None, calls: list | None = None
):
    """A fake `train`: scores[factor][fold] as held-out top-1 (None: diverged), 3 steps an epoch."""

    def train(lr: float, fold: int, epochs: int) -> lr_search.Candidate:
        factor = round(lr / 0.01)
        if calls is not None:
            calls.append((factor, fold))
        top1 = scores[factor][fold]
        if top1 is None:
            return lr_search.Candidate(lr, epochs, 3 * epochs)
        loss = (losses or {}).get(factor, 1 - top1)
        return lr_search.Candidate(lr, epochs, 3 * epochs, val_top1=top1, val_loss=loss, final_loss=0.1)

    return train


def test_the_plan_keeps_the_search_within_the_fine_tunings_own_steps() -> None:
    # 24 labels at batch 24, 5 folds: 60 one-step epochs. The old search: 4 × 5 folds × 50 steps = 1,000.
    plan = lr_search.search_plan(60, steps_per_epoch=1, fit_steps_per_epoch=1, folds=5)
    assert plan.budget == 60 * lr_search.SEARCH_BUDGET and plan.epochs == 7  # the first fold: half the budget
    # hymenoptera (245 labels at batch 64, 5 folds, 60 epochs): 28 steps a candidate (RESULTS.md measured 30).
    assert lr_search.search_plan(60, steps_per_epoch=4, fit_steps_per_epoch=4, folds=5).epochs == 7
    # One fold (≥ 1,250 labels) keeps the quarter of the epochs: 3,068 photos at batch 64.
    assert lr_search.search_plan(60, steps_per_epoch=48, fit_steps_per_epoch=39).epochs == 15
    assert (
        lr_search.search_plan(1, steps_per_epoch=1, fit_steps_per_epoch=1).epochs == 1
    )  # never below one epoch


def test_the_search_never_spends_more_than_its_budget(tmp_path: Path) -> None:
    folds = _folds(tmp_path)
    assert len(folds) == 5
    scores: dict[int, list[float | None]] = {
        factor: [0.5] * 5 for factor in lr_search.SEARCH_FACTORS
    }  # all tied
    calls: list = []
    for budget in (12, 24, 60, 1000):
        calls.clear()
        plan = lr_search.Plan(epochs=1, steps_per_epoch=3, budget=budget)
        record = lr_search.search(0.01, "sgd", 8, ["a", "b"], folds, _trainer(scores, calls=calls), plan)
        assert record["steps"] == 3 * len(calls) <= max(budget, 12)  # the first fold always runs: 4 × 3 steps
        assert record["folds"] == min(5, budget // 12) and record["budget_steps"] == budget
        assert record["held_out_images"] == 4 * record["folds"]


def test_a_candidate_far_behind_or_diverged_is_dropped_and_one_left_stops_the_search(tmp_path: Path) -> None:
    folds = _folds(tmp_path, count=40)  # 8 held out a fold: 2 standard errors at 90% = 0.21
    scores: dict[int, list[float | None]] = {1: [0.9] * 5, 2: [0.7] * 5, 4: [0.5] * 5, 8: [None] * 5}
    calls: list = []
    plan = lr_search.Plan(epochs=1, steps_per_epoch=3, budget=1000)
    record = lr_search.search(0.01, "sgd", 8, ["a", "b"], folds, _trainer(scores, calls=calls), plan)
    dropped = {item["factor"]: (item["dropped"], item["folds"]) for item in record["candidates"]}
    # After fold 1: ×4 (0.5 behind) and ×8 (diverged) are out, ×2 (0.2) not; after fold 2 (16 images: 0.15) it is.
    assert dropped == {1: (False, 2), 2: (True, 2), 4: (True, 1), 8: (True, 1)}
    assert calls == [(1, 0), (2, 0), (4, 0), (8, 0), (1, 1), (2, 1)]
    assert record["chosen"] == pytest.approx(0.01) and record["folds"] == 2


def test_ties_on_top1_go_to_the_lower_held_out_loss_then_the_smaller_lr(tmp_path: Path) -> None:
    folds = _folds(tmp_path)
    scores: dict[int, list[float | None]] = {factor: [0.5] * 5 for factor in lr_search.SEARCH_FACTORS}
    plan = lr_search.Plan(epochs=1, steps_per_epoch=3, budget=12)
    losses = {1: 0.7, 2: 0.6, 4: 0.6, 8: 0.5}
    record = lr_search.search(0.01, "sgd", 8, ["a", "b"], folds, _trainer(scores, losses), plan)
    assert record["chosen"] == pytest.approx(
        0.08
    )  # hymenoptera's ties went to ×1 while the loss preferred ×8
    losses = {1: 0.7, 2: 0.6, 4: 0.6, 8: 0.7}
    record = lr_search.search(0.01, "sgd", 8, ["a", "b"], folds, _trainer(scores, losses), plan)
    assert record["chosen"] == pytest.approx(0.02)  # ×2 and ×4 tie on both: the smaller lr


def test_the_folds_are_pooled_by_their_size(tmp_path: Path) -> None:
    labeled = LabeledImages(
        tuple(tmp_path / f"{i}.png" for i in range(23)), ("a",) * 12 + ("b",) * 11, tmp_path
    )
    folds = lr_search.search_folds(labeled, seed=0)
    sizes = [len(check) for _, check in folds]
    assert len(set(sizes)) > 1  # folds of different sizes, so a plain mean would differ
    scores: dict[int, list[float | None]] = {
        factor: [1.0, 0.0, 1.0, 0.0, 1.0] for factor in lr_search.SEARCH_FACTORS
    }
    plan = lr_search.Plan(epochs=1, steps_per_epoch=3, budget=1000)
    record = lr_search.search(0.01, "sgd", 8, ["a", "b"], folds, _trainer(scores), plan)
    expected = sum(size for size, score in zip(sizes, scores[1], strict=True) if score) / sum(sizes)
    assert (
        record["candidates"][0]["val_top1"] == pytest.approx(expected)
        and record["candidates"][0]["steps"] == 15
    )


def test_an_interrupted_search_continues_from_its_finished_trainings(tmp_path: Path) -> None:
    folds = _folds(tmp_path)
    scores: dict[int, list[float | None]] = {factor: [0.5] * 5 for factor in lr_search.SEARCH_FACTORS}
    plan = lr_search.Plan(epochs=1, steps_per_epoch=3, budget=24)
    key = {"labels": "x", "batch": 8}
    calls: list = []
    fake = _trainer(scores, calls=calls)

    def interrupted(lr: float, fold: int, epochs: int) -> lr_search.Candidate:
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C during the sixth brief training
        return fake(lr, fold, epochs)

    progress = lr_search.Progress.load(tmp_path, key, ACCELERATOR, restart=False)
    with pytest.raises(KeyboardInterrupt):
        lr_search.search(0.01, "sgd", 8, ["a", "b"], folds, interrupted, plan, progress)
    assert len(json.loads((tmp_path / lr_search.SEARCH_FILE).read_text())["runs"]) == 5
    assert lr_search.reuse(tmp_path, key, restart=False) is None  # not finished: no choice to reuse
    calls.clear()
    progress = lr_search.Progress.load(tmp_path, key, ACCELERATOR, restart=False)
    record = lr_search.search(0.01, "sgd", 8, ["a", "b"], folds, fake, plan, progress)
    assert calls == [(2, 1), (4, 1), (8, 1)]  # only what the first run had not finished
    assert record["folds"] == 2 and record["steps"] == 24
    lr_search.save(tmp_path, key, record, ACCELERATOR)
    assert lr_search.reuse(tmp_path, key, restart=False)["chosen"] == record["chosen"]  # type: ignore[index]
    assert lr_search.Progress.load(tmp_path, key, ACCELERATOR, restart=True).runs == {}
    assert lr_search.Progress.load(tmp_path, {**key, "batch": 4}, ACCELERATOR, restart=False).runs == {}
