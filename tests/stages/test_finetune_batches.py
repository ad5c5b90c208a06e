"""Fine-tuning's batches: crop + flip views on the device, and no step with a single image."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from labelfew.cli import app

runner = CliRunner()


def _subset(digits: Path, destination: Path, per_class: int, classes: int) -> Path:
    for folder in sorted(p for p in digits.iterdir() if p.is_dir())[:classes]:
        (destination / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:per_class]:
            shutil.copy(path, destination / folder.name / path.name)
    return destination


def test_a_last_batch_of_one_image_is_dropped_so_head_batchnorm_trains(
    digits_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    """17 labels, batch 16, ``--from-head-layer 1`` (a BatchNorm1d in training mode after the
    backbone): a last batch of one image used to crash ("Expected more than 1 value per channel")."""
    unlabeled = _subset(digits_folder[0], tmp_path / "unlabeled", per_class=4, classes=8)
    common = ["--arch", "test_resnet", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--quiet"]
    pretrained = runner.invoke(app, ["pretrain", str(unlabeled), *common, "--out", str(tmp_path / "run")])
    assert pretrained.exit_code == 0, pretrained.output
    labels = tmp_path / "labels.csv"
    rows = [
        f"{path.relative_to(tmp_path)},{path.parent.name}" for path in sorted(unlabeled.rglob("*.png"))[:17]
    ]
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")
    arguments = [
        "finetune",
        "--labels",
        str(labels),
        "--from",
        str(tmp_path / "run"),
        "--from-head-layer",
        "1",
    ]
    finetuned = runner.invoke(
        app, [*arguments, "--epochs", "2", "--batch-size", "16", "--workers", "0", "--quiet"]
    )
    assert finetuned.exit_code == 0, finetuned.output
    record = (tmp_path / "run" / "finetune-labels" / "run.json").read_text()
    assert '"steps": 2' in record  # one full batch per epoch, the 17th image left for another epoch
