"""`evaluate --plots`: PNG figures and one self-contained report.html beside report.json.

Figures (drawn by matplotlib's Agg renderer into `Figure` objects, so no display and no pyplot
global state are involved):

    confusion_matrix.png    the main model's confusion matrix (rows: true class)
    per_class_accuracy.png  per-class accuracy of every evaluated method
    embedding_map.png       2-D map of the test images' backbone features, coloured by true class
    training_curves.png     loss and learning rate per step, from the run's log.jsonl files
    misclassified.png       the fine-tuned model's most confident mistakes, true and predicted class

report.html (`labelfew.report.html`) embeds every figure as base64 and links each to its PNG
file beside it. matplotlib is an optional dependency (the `plots` extra): training and
evaluation run on headless servers and clusters that never draw.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from labelfew import engine
from labelfew.artifacts import Artifact
from labelfew.data.images import BadImage, display_image
from labelfew.data.labels import LabeledImages
from labelfew.errors import UserError
from labelfew.fileio import atomic_write, atomic_write_text
from labelfew.models import features_model, load_model
from labelfew.registry import stages
from labelfew.report.html import Shown, page_path, render_html
from labelfew.report.label_page import channels_note
from labelfew.use.inference import run_model

TSNE_MAX_POINTS = 5000  # t-SNE above this takes minutes on a CPU; PCA is used instead
MAX_MISTAKES_SHOWN = 12
DPI = 110


def require_matplotlib() -> None:
    """Raises UserError when matplotlib is missing (checked before a long evaluation starts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install 'labelfew[plots]'") from None


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, path: Path) -> None:
    """Writes a figure as PNG, atomically."""
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=DPI))


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Any:
    """Counts in each cell; colour is the fraction of the true class (row), so rare classes show too."""
    count = len(class_names)
    side = min(14.0, 3.5 + 0.45 * count)
    figure = _figure(side + 1.5, side)
    axes = figure.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    shown = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shown, ax=axes, label="fraction of the true class", shrink=0.8)
    if count <= 25:
        for row in range(count):
            for column in range(count):
                colour = "white" if fractions[row, column] > 0.6 else "black"
                axes.text(
                    column, row, str(matrix[row, column]), ha="center", va="center", color=colour, fontsize=8
                )
    if count <= 50:
        axes.set_xticks(range(count), [_short(name) for name in class_names], rotation=90)
        axes.set_yticks(range(count), [_short(name) for name in class_names])
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    return figure


def per_class_figure(rows: Sequence[dict[str, Any]], class_names: Sequence[str]) -> Any:
    """Grouped bars (one group per class) up to 25 classes; above that each method's sorted curve."""
    count = len(class_names)
    figure = _figure(min(16.0, 5.0 + 0.35 * count * max(1, len(rows)) / 2), 4.5)
    axes = figure.subplots()
    if count <= 25:
        width = 0.8 / max(1, len(rows))
        for number, row in enumerate(rows):
            values = [row["per_class_accuracy"].get(name) for name in class_names]
            heights = [np.nan if value is None else value for value in values]
            axes.bar(
                np.arange(count) + (number - (len(rows) - 1) / 2) * width, heights, width, label=row["method"]
            )
        long_names = count > 8 and max(len(name) for name in class_names) > 3
        axes.set_xticks(
            range(count), [_short(name) for name in class_names], rotation=45 if long_names else 0
        )
        axes.set_xlabel("class")
    else:
        for row in rows:
            values = sorted((v for v in row["per_class_accuracy"].values() if v is not None), reverse=True)
            axes.plot(range(1, len(values) + 1), values, label=row["method"])
        axes.set_xlabel("classes, sorted by accuracy")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("accuracy")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
    axes.set_title("per-class accuracy on the test set")
    return figure


def project_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """t-SNE (up to TSNE_MAX_POINTS points) or PCA of L2-normalised features.

    Shape: features (N, D) -> (N, 2)
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    if 10 <= len(features) <= TSNE_MAX_POINTS:
        perplexity = min(30.0, (len(features) - 1) / 3)
        tsne = TSNE(
            n_components=2, init="pca", learning_rate="auto", perplexity=perplexity, random_state=seed
        )
        return tsne.fit_transform(features), "t-SNE"
    return PCA(n_components=2, random_state=seed).fit_transform(features), "PCA"


def embedding_figure(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], method: str) -> Any:
    """Scatter of 2-D points coloured by class; a legend up to 20 classes."""
    figure = _figure(7.5, 6.0)
    axes = figure.subplots()
    from matplotlib import colormaps

    count = len(class_names)
    cmap = colormaps["tab10" if count <= 10 else "tab20" if count <= 20 else "nipy_spectral"]
    for index, name in enumerate(class_names):
        chosen = labels == index
        if chosen.any():
            colour = cmap(index) if count <= 20 else cmap(index / max(1, count - 1))
            axes.scatter(
                points[chosen, 0], points[chosen, 1], s=8, color=colour, label=_short(name), alpha=0.8
            )
    if len(class_names) <= 20:
        axes.legend(fontsize=8, markerscale=2, loc="best", title="true class")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(f"test images, backbone features ({method}, {len(points)} points)")
    return figure


def read_log(path: Path) -> list[dict[str, float]]:
    """The records of a log.jsonl file (`step`, `loss`, `lr`); unreadable lines are skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and {"step", "loss", "lr"} <= set(record):
            records.append(record)
    return records


@dataclass(frozen=True)
class Curve:
    """One model's training log: its folder's name (the legend), its stage (the row), its records."""

    name: str
    stage: str
    records: list[dict[str, float]]


def curves_figure(curves: Sequence[Curve]) -> Any:
    """Loss (raw and moving average) and learning rate per step; one row per stage, in the registry's order.

    The stage is the model's own (its artifact's), not guessed from its folder's name, so a model
    written to `--out runs/x/ft-auto` has its curve in the finetune row.
    """
    from matplotlib.ticker import MaxNLocator

    kinds = [info.name for info in stages() if any(curve.stage == info.name for curve in curves)]
    figure = _figure(11.0, 3.4 * len(kinds))
    grid = figure.subplots(len(kinds), 2, squeeze=False)
    for (loss_axes, lr_axes), kind in zip(grid, kinds, strict=True):
        for curve in curves:
            if curve.stage != kind:
                continue
            name, records = curve.name, curve.records
            steps = np.array([record["step"] for record in records])
            losses = np.array([record["loss"] for record in records])
            line = loss_axes.plot(steps, losses, alpha=0.3, linewidth=0.8)[0]
            window = max(1, len(losses) // 40)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            loss_axes.plot(steps[window - 1 :], smooth, color=line.get_color(), label=name)
            lr_axes.plot(steps, [record["lr"] for record in records], color=line.get_color(), label=name)
        loss_axes.set_title(f"{kind} loss")
        lr_axes.set_title(f"{kind} learning rate")
        for axes in (loss_axes, lr_axes):
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_xlabel("step")
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
    return figure


def misclassified_figure(items: Sequence[tuple[Image.Image, str, str, float]]) -> Any:
    """A grid of (image, true class, predicted class, confidence)."""
    columns = min(4, len(items))
    rows = (len(items) + columns - 1) // columns
    figure = _figure(2.6 * columns, 2.9 * rows)
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, (image, true, predicted, confidence) in zip(grid.flat, items, strict=False):
        gray = {"cmap": "gray", "vmin": 0, "vmax": 255} if image.mode == "L" else {}  # else a colour map
        axes.imshow(image, interpolation="nearest" if max(image.size) < 128 else "antialiased", **gray)
        axes.set_title(f"true: {_short(true)}\npredicted: {_short(predicted)} ({confidence:.2f})", fontsize=9)
    return figure


def _short(name: str, length: int = 18) -> str:
    return name if len(name) <= length else name[: length - 1] + "…"


def _main_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row the confusion matrix shows: a fine-tuned model (from the self-supervised start
    first; never the scratch baseline), else a linear probe, else the first row."""
    for method in ("fine-tuned", "linear probe"):
        named = [row for row in rows if row["method"].startswith(method) and "scratch" not in row["method"]]
        exact = [row for row in named if row["method"] == method]
        if exact or named:
            return (exact or named)[0]
    return rows[0]


def _mistakes(
    artifact: Artifact,
    test: LabeledImages,
    labels: np.ndarray,
    class_names: list[str],
    options: dict[str, Any],
) -> list[tuple[Image.Image, str, str, float]]:
    """The fine-tuned model's most confident mistakes on the test set, pictured as the model decodes
    them (`labelfew.data.pixels.display_image`)."""
    paths = list(test.paths)
    outputs = run_model(load_model(artifact), paths, artifact.spec, description="plots: classify", **options)
    probabilities = torch.softmax(outputs.values, dim=1)
    confidence, predicted = probabilities.max(dim=1)
    truth = torch.as_tensor(labels[outputs.kept])
    wrong = torch.nonzero(predicted != truth).flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)][:MAX_MISTAKES_SHOWN]
    items = []
    for row in wrong.tolist():
        try:
            image = display_image(paths[outputs.kept[row]], artifact.spec.decoding)
        except BadImage:
            continue
        image.thumbnail((256, 256))
        items.append(
            (image, class_names[int(truth[row])], class_names[int(predicted[row])], float(confidence[row]))
        )
    return items


def write_report(
    result: dict[str, Any],
    out: Path,
    pretrain: Artifact | None,
    finetunes: Sequence[Artifact],
    run_folder: Path,
    test: LabeledImages,
    batch_size: int = 256,
    workers: int | None = None,
    quiet: bool = False,
) -> Path:
    """Draws every figure the evaluation allows into `out` and writes `out/report.html`."""
    require_matplotlib()
    class_names: list[str] = result["class_names"]
    options: dict[str, Any] = {"batch_size": batch_size, "workers": workers, "quiet": quiet}
    main = _main_row(result["rows"])
    figures: list[tuple[Any, Shown]] = [
        (
            confusion_figure(
                np.array(main["confusion_matrix"]), class_names, f"confusion matrix — {main['method']}"
            ),
            Shown(
                "confusion_matrix.png",
                f"Confusion matrix ({main['method']})",
                "Rows: true class; counts in cells.",
            ),
        ),
        (
            per_class_figure(result["rows"], class_names),
            Shown("per_class_accuracy.png", "Per-class accuracy", "Every evaluated method on each class."),
        ),
    ]
    notes: list[str] = []
    labels = np.array(test.label_indices(class_names))
    source = pretrain or (finetunes[0] if finetunes else None)
    if source is not None and len(test) >= 3:
        figures.append(_embedding_panel(source, test, labels, class_names, options, run_folder))
    logs = _logs([model for model in (pretrain, *finetunes) if model is not None])
    if logs:
        caption = "Per-step loss (faint: raw, solid: moving average) and learning rate from log.jsonl."
        figures.append((curves_figure(logs), Shown("training_curves.png", "Training curves", caption)))
    else:
        notes.append(f"No training log (log.jsonl) found in the run folder {run_folder.name}.")
    tuned = [a for a in finetunes if not a.spec.scratch] or list(finetunes)
    mistakes = _mistakes(tuned[0], test, labels, class_names, options) if tuned else []
    if mistakes:
        model = page_path(tuned[0].path, run_folder)
        caption = f"Up to {MAX_MISTAKES_SHOWN} wrong predictions with the highest confidence; model {model}."
        caption += (" " + channels_note(tuned[0].spec.decoding)).rstrip()
        figures.append(
            (misclassified_figure(mistakes), Shown("misclassified.png", "Most confident mistakes", caption))
        )
    elif tuned:
        notes.append("The fine-tuned model classified every test image correctly.")
    else:
        notes.append("No fine-tuned model was evaluated, so there are no misclassified examples to show.")
    for figure, shown in figures:
        save_png(figure, out / shown.file)
    page = out / "report.html"
    atomic_write_text(page, render_html(result, out, [shown for _, shown in figures], notes))
    if not quiet:
        engine.console.print(f"plots: {page} ({', '.join(shown.file for _, shown in figures)})")
    return page


def _embedding_panel(
    source: Artifact,
    test: LabeledImages,
    labels: np.ndarray,
    class_names: list[str],
    options: dict[str, Any],
    run_folder: Path,
) -> tuple[Any, Shown]:
    features = run_model(
        features_model(load_model(source)),
        list(test.paths),
        source.spec,
        description="plots: embed",
        **options,
    )
    points, method = project_2d(features.values.numpy())
    caption = (
        f"Backbone features (L2-normalised) of {page_path(source.path, run_folder)}, coloured by true class."
    )
    return (
        embedding_figure(points, labels[features.kept], class_names, method),
        Shown("embedding_map.png", f"Test images in 2-D ({method})", caption),
    )


def _logs(models: Sequence[Artifact]) -> list[Curve]:
    """The training curve of each model whose folder holds a log.jsonl with records."""
    curves: dict[Path, Curve] = {}
    for model in models:
        path = model.path.parent / "log.jsonl"
        if path not in curves and path.is_file() and (records := read_log(path)):
            curves[path] = Curve(model.path.parent.name, model.stage, records)
    return list(curves.values())
