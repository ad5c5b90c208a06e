"""The installed `labelfew` command, end to end, on small real images (as a user runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

LABELFEW = str(Path(sys.executable).parent / "labelfew")


def labelfew(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [LABELFEW, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, (
        f"labelfew {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def digits_run(digits_folder: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """pretrain → subset → finetune (SSL and scratch) → evaluate on the digits, through the CLI."""
    train, test = digits_folder
    work = tmp_path_factory.mktemp("digits-run")
    labelfew("subset", train, "--per-class", "10", "--seed", "0", "--out", work / "10pc.csv", cwd=work)
    labelfew(
        "pretrain", train, "--arch", "test_resnet", "--no-small-stem", "--epochs", "8",
        "--batch-size", "128", "--out", work / "runs" / "digits", "--quiet", cwd=work,
    )  # fmt: skip
    labelfew("finetune", "--labels", work / "10pc.csv", "--epochs", "20", "--quiet", cwd=work)
    labelfew("finetune", "--labels", work / "10pc.csv", "--scratch", "--epochs", "20", "--quiet", cwd=work)
    evaluated = labelfew("evaluate", "--test", test, "--random-baseline", cwd=work)
    return {"work": work, "run": work / "runs" / "digits", "stdout": Path(evaluated.stdout)}


def test_artifacts_are_written_with_their_metadata(digits_run: dict[str, Path]) -> None:
    run = digits_run["run"]
    for name in ("pretrain/backbone.safetensors", "pretrain/head.safetensors", "pretrain/run.json",
                 "pretrain/log.jsonl", "finetune-10pc/model.safetensors", "finetune-10pc/run.json",
                 "finetune-scratch-10pc/model.safetensors", "evaluate/report.json"):  # fmt: skip
        assert (run / name).is_file(), name
    with safe_open(str(run / "finetune-10pc" / "model.safetensors"), "pt") as reader:
        metadata = reader.metadata()
    assert metadata["stage"] == "finetune"
    assert json.loads(metadata["class_names"]) == [str(digit) for digit in range(10)]
    record = json.loads((run / "finetune-10pc" / "run.json").read_text())
    pretrain_record = json.loads((run / "pretrain" / "run.json").read_text())
    assert record["parent"]["sha256"] == pretrain_record["artifacts"]["backbone.safetensors"]["sha256"]
    assert record["labels"]["images"] == 100


def test_report_has_a_row_per_method(digits_run: dict[str, Path]) -> None:
    report = json.loads((digits_run["run"] / "evaluate" / "report.json").read_text())
    methods = [row["method"] for row in report["rows"]]
    assert methods == ["kNN", "linear probe", "kNN (random init)", "fine-tuned", "fine-tuned (scratch)"]
    assert report["test"]["images"] == 450
    for row in report["rows"]:
        assert 0.0 <= row["top1"] <= 1.0
        assert row["top5"] is not None  # 10 classes
    printed = str(digits_run["stdout"])
    assert "linear probe" in printed and "fine-tuned (scratch)" in printed


def test_ssl_features_beat_random_init_features(digits_run: dict[str, Path]) -> None:
    rows = {
        row["method"]: row
        for row in json.loads((digits_run["run"] / "evaluate" / "report.json").read_text())["rows"]
    }
    assert rows["kNN"]["top1"] > rows["kNN (random init)"]["top1"] + 0.05
    assert rows["kNN"]["top1"] > 0.5  # ten classes: chance is 0.1


def test_hymenoptera_photos_run_through_every_stage(hymenoptera: Path, tmp_path: Path) -> None:
    """Full-size real photos (ants and bees, varied sizes): the ImageNet stem path at 64 px."""
    labelfew(
        "pretrain", hymenoptera / "train", "--arch", "test_resnet", "--image-size", "64", "--epochs", "1",
        "--batch-size", "64", "--out", tmp_path / "runs" / "bugs", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    labelfew(
        "subset", hymenoptera / "train", "--fraction", "0.1", "--out", tmp_path / "10pct.csv", cwd=tmp_path
    )
    labelfew("finetune", "--labels", tmp_path / "10pct.csv", "--epochs", "1", "--quiet", cwd=tmp_path)
    labelfew("evaluate", "--test", hymenoptera / "val", "--quiet", cwd=tmp_path)
    report = json.loads((tmp_path / "runs" / "bugs" / "evaluate" / "report.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["kNN", "linear probe", "fine-tuned"]
    assert report["class_names"] == ["ants", "bees"]
    assert all(row["top5"] is None for row in report["rows"])  # two classes
    assert report["test"]["images"] == 153
