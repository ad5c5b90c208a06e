"""Metrics and the terminal table of an evaluation (report.json is the same rows, written by evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.metrics import confusion_matrix

console = Console()


def metrics_row(
    method: str, scores: np.ndarray, labels: np.ndarray, class_names: list[str], details: dict[str, Any]
) -> dict[str, Any]:
    """Top-1, top-5 (with 5 or more classes), balanced accuracy, per-class accuracy, confusion matrix.

    Balanced accuracy is the mean of the per-class accuracies over the classes present in `labels`.

    Shape: scores (N, num_classes), labels (N,)
    """
    predictions = scores.argmax(axis=1)
    classes = list(range(len(class_names)))
    matrix = confusion_matrix(labels, predictions, labels=classes)
    totals = matrix.sum(axis=1)
    per_class = {
        name: (float(matrix[index, index] / totals[index]) if totals[index] else None)
        for index, name in enumerate(class_names)
    }
    top5 = None
    if len(class_names) >= 5:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        top5 = float((top == labels[:, None]).any(axis=1).mean())
    return {
        "method": method,
        "top1": float((predictions == labels).mean()),
        "top5": top5,
        "balanced_accuracy": float(np.mean([value for value in per_class.values() if value is not None])),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
        "details": details,
    }


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def print_lr_search(record: dict[str, Any], reused: bool) -> None:
    """`finetune --lr auto`: one row per candidate lr (held-out top-1), and the choice."""
    table = Table(
        title=f"lr search ({record['optimizer']}, batch {record['batch']}): {record['fit_images']} labels to fit, "
        f"{record['held_out_images']} held out"
        + _folds(record)
        + (" — from lr_search.json, not rerun" if reused else "")
    )
    for column in ("lr", "× rule", "steps", "held-out top-1", "held-out loss", "final loss"):
        table.add_column(column, justify="right")
    for item in record["candidates"]:
        loss = "diverged" if item["final_loss"] is None else f"{item['final_loss']:.4f}"
        held = item.get("val_loss")
        mark = " ◀" if item["lr"] == record["chosen"] else ""
        table.add_row(f"{item['lr']:.4g}{mark}", f"{item['factor']:g}", str(item["steps"]),
                      _percent(item["val_top1"]), "—" if held is None else f"{held:.4f}", loss)  # fmt: skip
    console.print(table)
    note = f" ({record['note']})" if record.get("note") else ""
    console.print(
        f"lr: {record['chosen']:.4g}, {record['chosen'] / record['rule']:g}× the rule's {record['rule']:.4g}{note}"
    )


def _folds(record: dict[str, Any]) -> str:
    folds = record.get("folds", 1)  # records before the folds had one
    return f" in turn over {folds} fifths (steps: all folds)" if folds > 1 else ""


def _shared_methods(rows: list[dict[str, Any]]) -> set[str]:
    """Method names that more than one row carries (a run with several fine-tunings of one kind)."""
    methods = [row["method"] for row in rows]
    return {method for method in methods if methods.count(method) > 1}


def _note(row: dict[str, Any], shared: set[str]) -> str:
    """The table's notes for one row: k and the bank for kNN, C for the probe, the labels for a model.

    A row of `--init`'s features also names the weights' sha256 (first 12 hex digits), so two
    files of one name are told apart.
    """
    details = row["details"]
    init = f", init sha256 {details['init']['sha256'][:12]}" if details.get("init") else ""
    if row["method"].startswith("kNN"):
        note = f"k={details['k']}, T={details.get('temperature')}, bank {details['bank_images']} labelled"
        if "k_requested" in details:
            note += f" (k capped from {details['k_requested']})"
        return note + init
    if row["method"].startswith("linear probe"):
        return f"C={details['C']}, {details['bank_images']} labelled{init}"
    note = f"{details.get('labelled_images')} labelled"
    if row["method"] in shared and details.get("artifact"):
        note += f", {Path(details['artifact']).parent.name}"  # which of the run's models
    return note


def _imbalanced_line(skew: dict[str, Any]) -> str:
    """The line above the table of an imbalanced test set (`labelfew.data.class_weights.imbalance`)."""
    return (f"imbalanced test set: {skew['largest']} {skew['largest_images']} images, {skew['smallest']} "
            f"{skew['smallest_images']} ({skew['ratio']:.1f}×): balanced accuracy (mean per-class recall) first")  # fmt: skip


def print_report(result: dict[str, Any], path: Path | None = None) -> None:
    """One row per model/method, then the per-class accuracy of every row.

    The title counts the test images scored; the ones that could not be decoded are named below
    it. With `--allow-overlap` and test images that a model saw, a column says how many each row saw.
    """
    test = result["test"]
    if result.get("multi_label"):
        return print_multi_label_report(result, path)
    skew = test.get("imbalance") or {}
    balanced_first = skew.get("headline") == "balanced_accuracy"
    table = Table(
        title=f"labelfew evaluation — {test['images']} test images, {len(result['class_names'])} classes"
    )
    overlap = bool(result.get("overlap"))
    metrics = ("balanced acc.", "top-1", "top-5") if balanced_first else ("top-1", "top-5", "balanced acc.")
    columns = ("method", *metrics) + (("test images seen",) if overlap else ()) + ("notes",)
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "notes") else "right")
    shared = _shared_methods(result["rows"])
    for row in result["rows"]:
        seen = (str(row["details"].get("seen_test_images", "—")),) if overlap else ()
        values = {"top-1": row["top1"], "top-5": row["top5"], "balanced acc.": row["balanced_accuracy"]}
        scores = tuple(_percent(values[name]) for name in metrics)
        table.add_row(row["method"], *scores, *seen, _note(row, shared))
    if test.get("skipped"):
        named = "; ".join(test["skipped_files"][:3]) + ("; …" if test["skipped"] > 3 else "")
        console.print(
            f"[yellow]{test['skipped']} of {test['listed']} test images skipped[/] (cannot be decoded): {named}"
        )
    if balanced_first:
        console.print(_imbalanced_line(skew), highlight=False, soft_wrap=True)
    console.print(table)
    capped = next((row["details"] for row in result["rows"] if "k_cap" in row["details"]), None)
    if capped is not None:
        console.print(
            f"kNN: k capped from {capped['k_requested']} to {capped['k']}: {capped['k_cap']} (a larger k is a majority vote)"
        )
    names = result["class_names"]
    if len(names) <= 20 and result["rows"]:
        per_class = Table(title="per-class accuracy", show_lines=False)
        per_class.add_column("class")
        for row in result["rows"]:
            per_class.add_column(row["method"], justify="right")
        for name in names:
            per_class.add_row(name, *(_percent(row["per_class_accuracy"][name]) for row in result["rows"]))
        console.print(per_class)
    if path is not None:
        console.print(f"report: {path}")


def print_multi_label_report(result: dict[str, Any], path: Path | None = None) -> None:
    """A multi-label evaluation: mAP, macro/micro-F1 at each row's threshold, then per-class AP."""
    test = result["test"]
    table = Table(title=f"labelfew evaluation (multi-label) — {test['images']} test images, "
                        f"{len(result['class_names'])} classes")  # fmt: skip
    for column in ("method", "mAP", "macro-F1", "micro-F1", "threshold", "notes"):
        table.add_column(column, justify="left" if column in ("method", "notes") else "right")
    shared = _shared_methods(result["rows"])
    for row in result["rows"]:
        table.add_row(row["method"], _percent(row["mAP"]), _percent(row["macro_f1"]), _percent(row["micro_f1"]),
                      f"{row['threshold']:g}", _note(row, shared))  # fmt: skip
    console.print(table)
    console.print(
        "thresholds: a fine-tuned model's was chosen on its validation images; kNN and the probe use 0.5"
    )
    names = result["class_names"]
    if len(names) <= 20 and result["rows"]:
        per_class = Table(title="per-class AP")
        per_class.add_column("class")
        for row in result["rows"]:
            per_class.add_column(row["method"], justify="right")
        for name in names:
            per_class.add_row(name, *(_percent(row["per_class_ap"][name]) for row in result["rows"]))
        console.print(per_class)
    if path is not None:
        console.print(f"report: {path}")
