"""`labelfew select` on a tiny real run: 200 digit images, a 1-epoch pretraining, a 1-epoch fine-tune."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import Chromium
from conftest import CopyPerClass
from reference.pil_views import eval_transform
from safetensors.torch import save_file
from typer.testing import CliRunner

from labelfew import selection
from labelfew.cli import app
from labelfew.config import FinetuneConfig, PretrainConfig, SelectConfig
from labelfew.data.images import load_rgb, scan_images
from labelfew.data.labels import read_labels, write_labels
from labelfew.data.subsets import balanced_subset
from labelfew.errors import UserError
from labelfew.fileio import sha256_file
from labelfew.models import build_backbone
from labelfew.stages import finetune, pretrain
from labelfew.stages import select as stage

runner = CliRunner()


@pytest.fixture(scope="module")
def work(
    digits_folder: tuple[Path, Path], copy_per_class: CopyPerClass, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A pool of 200 digits (20 per class), its pretraining, 20 labels and a model fine-tuned on them."""
    train, _ = digits_folder
    root = tmp_path_factory.mktemp("select")
    pool = copy_per_class(train, root / "pool", per_class=20)
    run = root / "runs" / "digits"
    pretrain.run(
        PretrainConfig(
            data=pool, out=run, arch="test_resnet", epochs=1, batch_size=100, workers=0, quiet=True
        )
    )
    labels = root / "labels.csv"
    write_labels(balanced_subset(read_labels(pool), per_class=2, seed=0), labels)
    tuned = root / "tuned"
    finetune.run(
        FinetuneConfig(
            labels=labels, source=run, out=tuned / "finetune", epochs=1, batch_size=20, workers=0, quiet=True
        )
    )
    return {"root": root, "pool": pool, "run": run, "labels": labels, "tuned": tuned / "finetune"}


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def select(work: dict[str, Path], name: str, **settings: object) -> list[dict[str, str]]:
    out = work["root"] / name / "to-label.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    defaults: dict[str, object] = {"folder": work["pool"], "budget": 10, "out": out, "source": work["run"]}
    stage.run(SelectConfig(**{**defaults, **settings, "workers": 0, "quiet": True}))  # type: ignore[arg-type]
    return rows_of(out)


def test_writes_budget_rows_with_empty_labels_and_the_page(work: dict[str, Path]) -> None:
    rows = select(work, "typical")
    assert len(rows) == 10 and list(rows[0]) == ["path", "label"]
    assert all(row["label"] == "" for row in rows)
    folder = work["root"] / "typical"
    pool = {path.resolve() for path in work["pool"].rglob("*.png")}
    assert {(folder / row["path"]).resolve() for row in rows} <= pool
    assert len({row["path"] for row in rows}) == 10
    page = (folder / "to-label.html").read_text(encoding="utf-8")
    assert page.count('<img src="data:image/jpeg;base64,') == 10
    assert all(row["path"] in page for row in rows)
    # the classes of 200 digits: typical picks from 10 clusters cover most of them
    assert len({row["path"].split("/")[-2] for row in rows}) >= 6


def test_same_seed_same_choice(work: dict[str, Path]) -> None:
    assert select(work, "seed-a", seed=3) == select(work, "seed-b", seed=3)


@pytest.mark.parametrize("strategy", ["typical", "uncertain"])
def test_labelled_images_are_never_chosen_again(work: dict[str, Path], strategy: str) -> None:
    """The collision is forced: the new labels are this strategy's own first picks, and the budget is
    every image left, so a labelled image chosen again would push an unlabelled one out."""
    source = work["run"] if strategy == "typical" else work["tuned"]
    first = select(work, f"again-{strategy}", source=source, labels=work["labels"], strategy=strategy)
    folder = work["root"] / f"again-{strategy}"
    labels = folder / "labels-round2.csv"
    picked = [[row["path"], row["path"].split("/")[-2]] for row in first]  # labelled by their folder
    with labels.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["path", "label"], *picked])
    labelled = {path.resolve() for path in read_labels(work["labels"]).paths + read_labels(labels).paths}
    assert len(labelled) == 30
    pool = {path.resolve() for path in work["pool"].rglob("*.png")}
    rows = select(work, f"again-{strategy}-2", source=source, labels=(work["labels"], labels), strategy=strategy,
                  budget=len(pool) - len(labelled))  # fmt: skip
    chosen = {(work["root"] / f"again-{strategy}-2" / row["path"]).resolve() for row in rows}
    assert chosen == pool - labelled


def test_mixed_is_the_default_with_a_model_and_labels(work: dict[str, Path]) -> None:
    # 20 labels of 10 classes: mixed picks typical images up to 5 per class (30 more), then uncertain
    out = work["root"] / "mixed" / "to-label.csv"
    out.parent.mkdir()
    config = SelectConfig(
        folder=work["pool"],
        budget=40,
        out=out,
        source=work["tuned"],
        labels=work["labels"],
        workers=0,
        quiet=True,
    )
    stage.run(config)
    page = out.with_suffix(".html").read_text(encoding="utf-8")
    assert page.count("(typical)") == 30 and page.count("(uncertain)") == 10
    assert '<option value="7">' in page  # the model's classes are offered


def test_uncertain_spreads_over_clusters(work: dict[str, Path]) -> None:
    rows = select(work, "uncertain", source=work["tuned"], labels=work["labels"], strategy="uncertain")
    page = (work["root"] / "uncertain" / "to-label.html").read_text(encoding="utf-8")
    assert len(rows) == 10 and page.count("(uncertain)") == 10
    assert page.count("<h2>cluster") == 10  # 30 clusters, one pick in each of 10


def test_uncertain_needs_a_fine_tuned_model(work: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="needs a fine-tuned model"):
        select(work, "no-model", strategy="uncertain")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--budget", "0"], "--budget 0"),
        (["--budget", "201"], "only 200 unlabelled images"),
        (["--budget", "5", "--labels", "OUTSIDE"], "not in the folder"),
        (["--budget", "5", "--from", "EMPTY"], "no completed"),
        (["--budget", "5", "--from", "SCRATCH"], "no pretrained backbone"),
        (["--budget", "5", "--init", "MISSING"], "no such file or folder"),
        (["--budget", "5", "--init-prefix", "backbone."], "only with --init"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    work: dict[str, Path], tmp_path: Path, arguments: list[str], message: str
) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text(f"path,label\n{work['labels'].resolve()},x\n")  # a file, but not in the pool
    empty = tmp_path / "empty-run"
    empty.mkdir()
    replaced = {"OUTSIDE": str(outside), "EMPTY": str(empty), "SCRATCH": str(_scratch_model(work)),
                "MISSING": str(tmp_path / "missing.safetensors")}  # fmt: skip
    arguments = [replaced.get(argument, argument) for argument in arguments]
    result = runner.invoke(
        app,
        [
            "select",
            str(work["pool"]),
            "--out",
            str(tmp_path / "x.csv"),
            "--from",
            str(work["run"]),
            *arguments,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def _scratch_model(work: dict[str, Path]) -> Path:
    """A run with only a --scratch fine-tuned model (no pretrained backbone)."""
    folder = work["root"] / "scratch-run" / "finetune"
    if not (folder / "model.safetensors").is_file():
        finetune.run(
            FinetuneConfig(
                labels=work["labels"], scratch=True, arch="test_resnet", out=folder, epochs=1, batch_size=20,
                workers=0, quiet=True,
            )
        )  # fmt: skip
    return folder / "model.safetensors"


def test_a_csv_with_filled_labels_is_not_overwritten_without_force(work: dict[str, Path]) -> None:
    select(work, "force")  # a rerun over a CSV with empty labels is fine
    rows = select(work, "force")
    out = work["root"] / "force" / "to-label.csv"
    filled = out.read_text(encoding="utf-8").replace(f"{rows[0]['path']},", f"{rows[0]['path']},7", 1)
    out.write_text(filled, encoding="utf-8")
    result = runner.invoke(app, ["select", str(work["pool"]), "--budget", "3", "--out", str(out),
                                 "--from", str(work["run"]), "--workers", "0", "--quiet"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "has 1 label(s) filled in" in result.output and "--force" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert out.read_text(encoding="utf-8") == filled  # the round's work is still there
    assert len(select(work, "force", budget=3, force=True)) == 3


def test_each_round_downloads_a_name_of_its_own(work: dict[str, Path]) -> None:
    folder = work["root"] / "rounds"

    def download() -> str:
        page = (folder / "to-label.html").read_text(encoding="utf-8")
        return str(json.loads(page.split('id="labelfew-data">')[1].split("</script>")[0])["download"])

    select(work, "rounds")
    assert download() == "labels-round1.csv"
    first = folder / "labels-round1.csv"
    first.write_text("".join(f"{line}\n" for line in ["path,label", *_labelled_rows(work, first.parent, 3)]))
    select(work, "rounds", labels=first)
    assert download() == "labels-round2.csv"
    (folder / "labels-round2.csv").write_text("path,label\n")  # e.g. a round 2 saved, then redone
    select(work, "rounds", labels=first)
    assert download() == "labels-round3.csv"


def _labelled_rows(work: dict[str, Path], folder: Path, count: int) -> list[str]:
    """`path,label` rows of the first `count` labels of the work's label file, relative to `folder`."""
    known = read_labels(work["labels"])
    return [
        f"{os.path.relpath(path, folder)},{label}"
        for path, label in list(zip(known.paths, known.labels, strict=True))[:count]
    ]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    chromium = Chromium(profile=tmp_path / "profile", downloads=tmp_path / "downloads")
    yield chromium
    chromium.close()


def _label_in_browser(browser: Chromium, page: Path, downloads: Path) -> Path:
    """Opens the page, types every empty field's true class (its folder: the digit) and downloads;
    returns the download moved beside the page, as the page says to save it."""
    browser.open(page)
    paths = browser.evaluate("Array.from(document.querySelectorAll('input.label')).map(i => i.dataset.path)")
    for index, path in enumerate(paths):
        if browser.evaluate(f"document.querySelectorAll('input.label')[{index}].value") == "":
            browser.evaluate(f"document.querySelectorAll('input.label')[{index}].focus()")
            for key in Path(path).parent.name:
                browser.press(key)
            browser.press("Enter")
    browser.evaluate("document.getElementById('download').click()")
    name = browser.wait_for_download()
    return Path(shutil.move(downloads / name, page.parent / name))


def test_two_labelling_rounds_in_chromium(work: dict[str, Path], browser: Chromium, tmp_path: Path) -> None:
    """README's flow: select → label → finetune → select uncertain → label → finetune on both rounds."""
    folder, downloads = tmp_path / "labelling", tmp_path / "downloads"
    folder.mkdir()
    out = ["--out", str(folder / "to-label.csv"), "--workers", "0", "--quiet"]
    tune = ["--epochs", "1", "--batch-size", "10", "--lr", "0.05", "--workers", "0", "--quiet"]
    classes = ",".join(str(digit) for digit in range(10))  # numeric names: typed, never a digit shortcut
    result = runner.invoke(app, ["select", str(work["pool"]), "--budget", "10", "--from", str(work["run"]),
                                 "--classes", classes, *out])  # fmt: skip
    assert result.exit_code == 0, result.output
    first = _label_in_browser(browser, folder / "to-label.html", downloads)
    assert first.name == "labels-round1.csv"
    truth = {path: path.parent.name for path in read_labels(first).paths}
    assert len(truth) == 10 and read_labels(first).labels == tuple(truth.values())  # nothing mislabelled
    result = runner.invoke(app, ["finetune", "--labels", str(first), "--from", str(work["run"]),
                                 "--out", str(folder / "round1"), *tune])  # fmt: skip
    assert result.exit_code == 0, result.output

    result = runner.invoke(app, ["select", str(work["pool"]), "--budget", "10", "--from", str(folder / "round1"),
                                 "--labels", str(first), "--strategy", "uncertain", *out])  # fmt: skip
    assert result.exit_code == 0, result.output
    page = (folder / "to-label.html").read_text(encoding="utf-8")
    assert page.count("(labelled earlier)") == 10 and page.count("(uncertain)") == 10
    second = _label_in_browser(browser, folder / "to-label.html", downloads)
    assert second.name == "labels-round2.csv"
    assert len(read_labels(first)) == 10  # round 1's file is untouched
    both = read_labels(second)  # the round-2 page carried round 1's labels: nothing lost
    assert len(both) == 20 and all(
        label == path.parent.name for path, label in zip(both.paths, both.labels, strict=True)
    )
    result = runner.invoke(app, ["finetune", "--labels", str(first), "--labels", str(second), "--from",
                                 str(work["run"]), "--out", str(folder / "round2"), *tune])  # fmt: skip
    assert result.exit_code == 0, result.output
    recorded = json.loads((folder / "round2" / "run.json").read_text())["labels"]
    assert recorded["images"] == 20 and len(recorded["files"]) == 2
    assert len(read_labels(Path(recorded["path"]))) == 20  # the merge evaluate reads


def test_outlier_picks_only_when_the_larger_clusters_run_out_and_one_line_says_so(
    work: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """150 of 200 images: k-means' 150 clusters are mostly of <= 5 images, which TypiClust never picks
    (its loop fails once the larger ones are used up); select fills the rest from them and says so."""
    out = work["root"] / "outliers" / "to-label.csv"
    out.parent.mkdir()
    stage.run(
        SelectConfig(folder=work["pool"], budget=150, out=out, source=work["run"], workers=0, quiet=False)
    )
    printed = capsys.readouterr().out
    page = out.with_suffix(".html").read_text(encoding="utf-8")
    outliers = page.count("(outlier)")
    assert outliers > 0 and page.count("(typical)") == 150 - outliers
    assert f"{outliers} pick(s) come from clusters of ≤ 5 images" in " ".join(printed.split())


def test_init_clusters_the_weights_own_features_and_is_recorded(
    work: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TypiClust on `--init`'s features: the picks of `choose` on the same backbone's features by hand."""
    monkeypatch.setattr("labelfew.use.inference.device", lambda: torch.device("cpu"))
    torch.manual_seed(7)
    backbone = build_backbone("test_resnet", small_stem=False).eval()
    weights = work["root"] / "another-tools.safetensors"
    save_file(backbone.state_dict(), str(weights), metadata={"architecture": "test_resnet"})
    rows = select(work, "init", source=None, init=str(weights))
    record = json.loads((work["root"] / "init" / "to-label.json").read_text())
    assert record["pretrain"] is None and record["finetune"] is None
    assert (record["init"]["source"], record["init"]["sha256"]) == (str(weights), sha256_file(weights))
    assert record["init"]["image_size"] == 32
    paths = scan_images(work["pool"]).paths
    transform = eval_transform(32)
    with torch.no_grad():
        features = backbone(torch.stack([transform(load_rgb(path)) for path in paths])).numpy()
    picks, _ = stage.choose(selection.normalize(features), np.zeros(len(paths), bool), 10, "typical", 0)
    chosen = {(work["root"] / "init" / row["path"]).resolve() for row in rows}
    assert chosen == {paths[pick.row].resolve() for pick in picks}
