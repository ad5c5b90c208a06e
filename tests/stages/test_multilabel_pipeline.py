"""A multi-label run end to end as a user types it: 2×2 mosaics of coloured squares labelled by the
colours they hold → finetune (sigmoid per class) → evaluate (mAP, F1, kNN and probe per class) →
predict (every class over the threshold); the refusals; and a killed run resumed bit for bit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_resume import LABELFEW, _whole_then_killed_and_resumed
from typer.testing import CliRunner

from labelfew.artifacts import load_artifact
from labelfew.cli import app
from labelfew.spec import ModelSpec

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def write_mosaics(folder: Path, count: int, seed: int) -> Path:
    """`count` 32 px mosaics of four 16 px squares, each a colour or black, and their `path,labels` CSV."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows = ["path,labels"]
    for index in range(count):
        cells = rng.integers(0, len(names) + 1, size=4)  # len(names): black
        cells[index % 4] = index % len(names)  # every colour appears
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        for cell, value in enumerate(cells):
            if value < len(names):
                y, x = divmod(cell, 2)
                pixels[16 * y : 16 * y + 16, 16 * x : 16 * x + 16] = COLOURS[names[value]]
        Image.fromarray(pixels).save(folder / f"m{index:03d}.png")
        present = sorted({names[value] for value in cells if value < len(names)})
        rows.append(f"m{index:03d}.png,{'|'.join(present)}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("mosaics")
    return write_mosaics(work / "train", 64, seed=0), write_mosaics(work / "test", 24, seed=1)


def test_finetune_evaluate_predict_multi_label(mosaics: tuple[Path, Path], tiny_pretrained: Path, tmp_path: Path) -> None:  # fmt: skip
    train, test = mosaics
    out = tmp_path / "run" / "finetune-mosaics"
    result = runner.invoke(app, ["finetune", "--labels", str(train), "--from", str(tiny_pretrained / "run"),
                                 "--epochs", "3", "--batch-size", "16", "--workers", "0", "--lr", "0.05",
                                 "--val-fraction", "0.25", "--out", str(out), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = load_artifact(out / "model.safetensors", "finetune").spec
    assert spec.multi_label and spec.class_names == ("blue", "green", "red", "yellow")
    assert spec.threshold is not None and 0 < spec.threshold < 1
    record = json.loads((out / "run.json").read_text())
    assert len(record["metrics"]["val_macro_f1"]) == 3 and record["threshold"] == spec.threshold

    result = runner.invoke(
        app,
        [
            "evaluate",
            "--from",
            str(out),
            "--test",
            str(test),
            "--out",
            str(tmp_path / "ev"),
            "--workers",
            "0",
            "--allow-overlap",
        ],
    )  # fmt: skip (4 colours: mosaics repeat)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["multi_label"] and [row["method"] for row in report["rows"]] == [
        "kNN",
        "linear probe",
        "fine-tuned",
    ]
    for row in report["rows"]:
        assert 0 <= row["mAP"] <= 1 and set(row["per_class_ap"]) == set(COLOURS)
    assert report["rows"][2]["threshold"] == spec.threshold
    assert "mAP" in result.output and "per-class AP" in result.output

    predictions = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(test.parent), "--from", str(out), "--out", str(predictions),
                                 "--workers", "0", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(predictions.open()))
    assert len(rows) == 24 and list(rows[0]) == ["path", "labels", "scores", "error"]
    for row in rows:
        scores = [float(value) for value in row["scores"].split("|") if value]
        assert len(scores) == len([n for n in row["labels"].split("|") if n])
        assert all(score > spec.threshold for score in scores) and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(["--balanced"], "--balanced does not support them"),
     (["--method", "fixmatch", "--unlabeled", "UNLABELED"], "--method fixmatch does not support them")],
)  # fmt: skip
def test_multi_label_refuses_what_it_cannot_train_with(mosaics: tuple[Path, Path], tmp_path: Path,
                                                       flags: list[str], expected: str) -> None:  # fmt: skip
    flags = [str(mosaics[0].parent) if flag == "UNLABELED" else flag for flag in flags]
    result = runner.invoke(app, ["finetune", "--labels", str(mosaics[0]), "--scratch", "--arch", "test_resnet",
                                 "--workers", "0", "--out", str(tmp_path / "out"), *flags])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_a_linear_head_refuses_multi_label_labels(mosaics: tuple[Path, Path], tiny_pretrained: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    result = runner.invoke(app, ["finetune", "--labels", str(mosaics[0]), "--from", str(tiny_pretrained / "run"),
                                 "--method", "linear", "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--method linear does not support them" in " ".join(result.output.split())
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_older_specs_without_the_key_are_single_label() -> None:
    spec = ModelSpec("test_resnet", 32, True, 8, class_names=("a", "b"))
    metadata = spec.to_metadata()
    assert "multi_label" not in metadata and not ModelSpec.from_metadata(metadata).multi_label
    multi = ModelSpec("test_resnet", 32, True, 8, class_names=("a", "b"), multi_label=True, threshold=0.35)
    assert ModelSpec.from_metadata(multi.to_metadata()) == multi


def test_multi_label_finetune_killed_mid_epoch_resumes_to_the_same_model(tmp_path: Path) -> None:
    labels = write_mosaics(
        tmp_path / "data", 208, seed=2
    )  # 13 steps of 16 an epoch: checkpoint 20 in epoch 2

    def command(out: Path) -> list[str]:
        return [LABELFEW, "finetune", "--labels", str(labels), "--scratch", "--arch", "test_resnet",
                "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--workers", "0", "--quiet",
                "--val-fraction", "0", "--lr", "0.05", "--checkpoint-every", "1e-6", "--out", str(out)]  # fmt: skip

    _whole_then_killed_and_resumed(command, tmp_path)
    assert load_artifact(tmp_path / "killed" / "model.safetensors", "finetune").spec.threshold == 0.5
