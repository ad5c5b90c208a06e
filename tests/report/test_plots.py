"""`evaluate --plots`: the PNG figures and report.html, from a tiny real run on the digits."""

from __future__ import annotations

import base64
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import CopyPerClass
from PIL import Image
from typer.testing import CliRunner

from labelfew.cli import app
from labelfew.config import FinetuneConfig, PretrainConfig
from labelfew.data.labels import read_labels, write_labels
from labelfew.data.subsets import balanced_subset
from labelfew.report.plots import TSNE_MAX_POINTS, project_2d, read_log
from labelfew.stages import finetune, pretrain

runner = CliRunner()
FIGURES = (
    "confusion_matrix.png",
    "per_class_accuracy.png",
    "embedding_map.png",
    "training_curves.png",
    "misclassified.png",
)


@pytest.fixture(scope="module")
def run(
    digits_folder: tuple[Path, Path], copy_per_class: CopyPerClass, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """pretrain (2 steps) → finetune (2 epochs, 5 labels per class), then `evaluate --plots` via the CLI."""
    train, test = digits_folder
    work = tmp_path_factory.mktemp("plots")
    pool = copy_per_class(train, work / "pool", per_class=20)
    tests = copy_per_class(test, work / "test", per_class=10)
    labels = work / "labels.csv"
    write_labels(balanced_subset(read_labels(pool), per_class=5, seed=0), labels)
    folder = work / "runs" / "digits"
    pretrain.run(
        PretrainConfig(
            data=pool, out=folder, arch="test_resnet", epochs=1, batch_size=100, workers=0, quiet=True
        )
    )
    finetune.run(FinetuneConfig(labels=labels, source=folder, epochs=2, batch_size=25, workers=0, quiet=True))
    result = runner.invoke(
        app, ["evaluate", "--test", str(tests), "--from", str(folder), "--plots", "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    return {
        "work": work,
        "run": folder,
        "test": tests,
        "labels": labels,
        "out": folder / "evaluate",
        "output": Path(result.output),
    }


class References(HTMLParser):
    """Collects every src and href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("src"):
            self.sources.append(str(values["src"]))
        if values.get("href"):
            self.links.append(str(values["href"]))


def test_every_figure_is_a_png_beside_report_json(run: dict[str, Path]) -> None:
    out = run["out"]
    assert (out / "report.json").is_file() and (out / "report.html").is_file()
    for name in FIGURES:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 250, name
    assert "report.html" in str(run["output"])


def test_report_html_embeds_and_links_existing_images(run: dict[str, Path]) -> None:
    page = run["out"] / "report.html"
    parser = References()
    parser.feed(page.read_text(encoding="utf-8"))
    linked = [link for link in parser.links if not link.startswith(("http:", "https:", "#"))]
    assert sorted(linked) == sorted(FIGURES)
    for link in linked:
        assert (page.parent / link).is_file(), link
    embedded = [source for source in parser.sources if source.startswith("data:image/png;base64,")]
    assert len(embedded) == len(parser.sources) == len(FIGURES)  # self-contained: no external images
    for link, source in zip(parser.links, parser.sources, strict=True):
        assert base64.b64decode(source.split(",", 1)[1]) == (page.parent / link).read_bytes()


def test_report_html_shows_the_results_table(run: dict[str, Path]) -> None:
    report = json.loads((run["out"] / "report.json").read_text())
    text = (run["out"] / "report.html").read_text(encoding="utf-8")
    for row in report["rows"]:
        assert f"<td>{row['method']}</td>" in text
        assert f"{100 * row['top1']:.1f}%" in text
    assert "t-SNE" in text  # 100 test images: t-SNE, not PCA


def test_report_html_renders_its_figures_in_chromium(run: dict[str, Path], tmp_path: Path) -> None:
    from browser import Chromium

    browser = Chromium(profile=tmp_path / "profile", downloads=tmp_path / "downloads")
    try:
        browser.open(run["out"] / "report.html")
        sizes = browser.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])"
        )
    finally:
        browser.close()
    assert len(sizes) == len(FIGURES)
    assert all(complete and natural > 100 and shown > 0 for complete, natural, shown in sizes), sizes


def test_without_a_finetune_the_report_says_why_mistakes_are_missing(
    run: dict[str, Path], tmp_path: Path
) -> None:
    args = ["evaluate", "--test", str(run["test"]), "--from", str(run["run"] / "pretrain")]
    args += ["--bank", str(run["labels"]), "--out", str(tmp_path), "--plots", "--quiet", "--workers", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "misclassified.png").exists()
    assert (tmp_path / "embedding_map.png").is_file() and (tmp_path / "training_curves.png").is_file()
    assert "No fine-tuned model was evaluated" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_plots_without_matplotlib_is_a_one_line_error(
    run: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(
        app, ["evaluate", "--test", str(run["test"]), "--from", str(run["run"]), "--plots"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --plots needs matplotlib: pip install 'labelfew[plots]'"


def test_map_uses_tsne_up_to_the_limit_and_pca_above() -> None:
    generator = np.random.default_rng(0)
    points, method = project_2d(generator.normal(size=(40, 8)))
    assert method == "t-SNE" and points.shape == (40, 2) and np.isfinite(points).all()
    points, method = project_2d(generator.normal(size=(TSNE_MAX_POINTS + 1, 8)))
    assert method == "PCA" and points.shape == (TSNE_MAX_POINTS + 1, 2)


def test_read_log_keeps_complete_records_only(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"epoch": 1, "step": 1, "loss": 6.2, "lr": 0.1}\n{"step": 2, "loss"\n[1, 2]\n{"step": 3, "loss": 6.0, "lr": 0.2}\n'
    )
    assert [record["step"] for record in read_log(log)] == [1, 3]


def test_report_html_names_files_relative_to_the_run_folder(run: dict[str, Path]) -> None:
    # the page is meant to be mailed: it printed the sender's absolute paths (issue 22, item 13)
    text = (run["out"] / "report.html").read_text(encoding="utf-8")
    assert str(run["work"]) not in text and str(run["work"].resolve()) not in text
    assert "Test set test: " in text
    assert "of pretrain/backbone.safetensors, coloured" in text  # the embedding map's model
    assert "model finetune-labels/model.safetensors." in text  # the mistakes' model


def test_training_curves_follow_what_a_folder_holds_not_its_name(tmp_path: Path) -> None:
    """`finetune --out runs/x/ft-auto` had no curve: the figure's rows matched folder-name prefixes."""
    import labelfew.stages  # noqa: F401  (fills the stage registry)
    from labelfew.artifacts import Artifact
    from labelfew.report.plots import _logs, curves_figure

    folders = {"ft-auto": "finetune", "pretrain": "pretrain"}
    models = []
    for name, stage in folders.items():
        (tmp_path / name).mkdir()
        records = [{"step": step, "loss": 1.0 / (step + 1), "lr": 0.1} for step in range(6)]
        (tmp_path / name / "log.jsonl").write_text("\n".join(json.dumps(record) for record in records))
        models.append(Artifact(tmp_path / name / "model.safetensors", {}, {"stage": stage}))
    figure = curves_figure(_logs(models))
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == ["pretrain loss", "pretrain learning rate", "finetune loss", "finetune learning rate"]
    assert "ft-auto" in [line.get_label() for line in figure.axes[2].get_lines()]
