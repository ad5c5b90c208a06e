"""The terminal tables: what a reader needs to tell the rows apart."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from labelfew.report import tables


def _row(method: str, artifact: str, top1: float) -> dict[str, Any]:
    return {"method": method, "top1": top1, "top5": None, "balanced_accuracy": top1,
            "per_class_accuracy": {"a": top1}, "details": {"labelled_images": 245, "artifact": artifact}}  # fmt: skip


def test_models_of_one_kind_are_told_apart_by_their_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(record=True, width=200)
    monkeypatch.setattr(tables, "console", console)
    rows = [_row("fine-tuned", "/r/finetune-ssl-auto/model.safetensors", 0.75),
            _row("fine-tuned", "/r/finetune-ssl-rule/model.safetensors", 0.65),
            _row("fine-tuned (scratch)", "/r/finetune-scratch/model.safetensors", 0.6)]  # fmt: skip
    tables.print_report({"test": {"images": 153}, "class_names": ["a"], "rows": rows})
    text = console.export_text()
    assert "245 labelled, finetune-ssl-auto" in text and "245 labelled, finetune-ssl-rule" in text
    assert "finetune-scratch" not in text  # the only one of its kind: no folder needed


@pytest.mark.parametrize("headline", ["balanced_accuracy", "top1"])
def test_an_imbalanced_test_set_leads_with_balanced_accuracy(
    monkeypatch: pytest.MonkeyPatch, headline: str
) -> None:
    console = Console(record=True, width=200)
    monkeypatch.setattr(tables, "console", console)
    row = {**_row("kNN", "", 0.9), "balanced_accuracy": 0.55, "details": {"k": 20, "bank_images": 30}}
    skew = {"largest": "ok", "largest_images": 140, "smallest": "dent", "smallest_images": 13, "ratio": 140 / 13,
            "headline": headline}  # fmt: skip
    tables.print_report({"test": {"images": 153, "imbalance": skew}, "class_names": ["a"], "rows": [row]})
    text = console.export_text()
    header = next(line for line in text.splitlines() if "top-1" in line)
    values = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("kNN"))
    if headline == "balanced_accuracy":
        assert header.index("balanced acc.") < header.index("top-1") and values.index("55.0%") < values.index(
            "90.0%"
        )
        assert (
            "imbalanced test set: ok 140 images, dent 13 (10.8×): balanced accuracy (mean per-class recall) first"
            in text
        )
    else:
        assert header.index("top-1") < header.index("balanced acc.") and "imbalanced" not in text
