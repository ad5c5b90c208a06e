"""`labelfew predict`: the fine-tuned model's class, confidence (softmax probability) and top-k
classes for every image of a folder, written as a CSV whose `path,label` columns are those of a
label CSV. A file that cannot be decoded gets a row with its error and never stops a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from labelfew.artifacts import Artifact
from labelfew.config import PredictConfig
from labelfew.data.images import require_images
from labelfew.errors import UserError
from labelfew.models import load_model
from labelfew.registry import resolve_model
from labelfew.use.files import console, relative_path, report_bad, report_skipped, shown, write_csv
from labelfew.use.inference import Outputs, run_model


def predict(config: PredictConfig) -> Path:
    """Classifies every image under `config.images`; writes and returns the predictions CSV.

    Columns: `path` (relative to the CSV's folder), `label` (top-1 class), `confidence` (its softmax
    probability), `label_2`, `confidence_2`, … up to `top_k`, and `error` (empty unless the file
    could not be decoded, in which case the class columns are empty).
    """
    if config.top_k < 1:
        raise UserError(f"--top-k {config.top_k}: use at least 1")
    artifact = resolve_model(config.source, ("classifier",))
    spec = artifact.spec
    if spec.class_names is None:
        raise UserError(f"{artifact.path}: a {artifact.stage} artifact; predict needs a fine-tuned model")
    found = require_images(config.images, follow_links=config.follow_links)
    paths = found.paths
    class_names = list(spec.class_names)
    outputs = run_model(
        load_model(artifact), paths, spec, config.batch_size, config.workers, "predict", config.quiet
    )
    if not outputs.kept:
        raise UserError(f"{config.images}: none of the {len(paths)} image files could be decoded")
    if spec.multi_label:
        return _predict_multi_label(config, artifact, paths, outputs, found.skipped)
    k = min(config.top_k, len(class_names))
    top_probability, top_index = torch.softmax(outputs.values, dim=1).topk(k, dim=1)
    header = ["path", "label", "confidence"]
    for rank in range(2, k + 1):
        header += [f"label_{rank}", f"confidence_{rank}"]
    row_of = {file_index: row for row, file_index in enumerate(outputs.kept)}
    folder = config.out.absolute().parent
    rows: list[list[Any]] = []
    for file_index, path in enumerate(paths):
        if file_index in outputs.errors:
            rows.append([relative_path(path, folder), *[""] * (2 * k), outputs.errors[file_index]])
            continue
        row = row_of[file_index]
        cells: list[Any] = []
        for rank in range(k):
            cells += [class_names[int(top_index[row, rank])], f"{float(top_probability[row, rank]):.4f}"]
        rows.append([relative_path(path, folder), *cells, ""])
    write_csv(config.out, [*header, "error"], rows)
    if not config.quiet:
        _print_predictions(config, artifact, class_names, top_index[:, 0], top_probability[:, 0], outputs)
        report_bad(paths, outputs.errors, "listed in the CSV with their error")
        report_skipped(found.skipped)
    return config.out


def _predict_multi_label(config: PredictConfig, artifact: Artifact, paths: list[Path], outputs: Outputs,
                         skipped: Any) -> Path:  # fmt: skip
    """A multi-label model's CSV: `path`, `labels` (every class whose sigmoid score is over the
    model's threshold, joined by ``|``, highest first; empty for none), `scores` (theirs, alike),
    `error`. The `path,labels` columns read back as a multi-label label CSV."""
    spec = artifact.spec
    class_names = list(spec.class_names or ())
    threshold = spec.threshold if spec.threshold is not None else 0.5
    scores = torch.sigmoid(outputs.values)
    row_of = {file_index: row for row, file_index in enumerate(outputs.kept)}
    folder = config.out.absolute().parent
    rows: list[list[Any]] = []
    for file_index, path in enumerate(paths):
        if file_index in outputs.errors:
            rows.append([relative_path(path, folder), "", "", outputs.errors[file_index]])
            continue
        values = scores[row_of[file_index]]
        over = [int(index) for index in values.argsort(descending=True) if values[index] > threshold]
        rows.append([relative_path(path, folder), "|".join(class_names[index] for index in over),
                     "|".join(f"{float(values[index]):.4f}" for index in over), ""])  # fmt: skip
    write_csv(config.out, ["path", "labels", "scores", "error"], rows)
    if not config.quiet:
        present = (scores > threshold).sum(dim=0)
        table = Table(title=f"predictions — {len(outputs.kept)} images, multi-label, threshold {threshold:g}")
        table.add_column("class")
        table.add_column("images over the threshold", justify="right")
        for index, name in enumerate(class_names):
            table.add_row(name, str(int(present[index])))
        console.print(table)
        console.print(f"model {shown(artifact.path)}; wrote {shown(config.out)}")
        report_bad(paths, outputs.errors, "listed in the CSV with their error")
        report_skipped(skipped)
    return config.out


def _print_predictions(
    config: PredictConfig,
    artifact: Artifact,
    class_names: list[str],
    predicted: torch.Tensor,
    confidence: torch.Tensor,
    outputs: Outputs,
) -> None:
    table = Table(title=f"predictions — {len(outputs.kept)} images")
    for column in ("class", "images", "mean confidence"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for index, name in enumerate(class_names):
        chosen = predicted == index
        count = int(chosen.sum())
        mean = f"{float(confidence[chosen].mean()):.2f}" if count else "—"
        table.add_row(name, str(count), mean)
    console.print(table)
    console.print(
        f"model {shown(artifact.path)}; wrote {shown(config.out)} "
        f"({len(outputs.kept) + len(outputs.errors)} rows, top {min(config.top_k, len(class_names))})"
    )
