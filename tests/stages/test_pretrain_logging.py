"""Watching a pretraining: TensorBoard scalars while it runs, MLflow params and metrics, views.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from labelfew.cli import app
from labelfew.report.views_figure import GAP, MIN_CELL, SHOWN_IMAGES

runner = CliRunner()


@pytest.fixture(scope="module")
def logged_run(digits_folder: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("logged") / "run"
    result = runner.invoke(
        app,
        ["pretrain", str(digits_folder[0]), "--arch", "test_resnet", "--epochs", "2", "--batch-size", "128",
         "--logger", "tensorboard", "--logger", "jsonl", "--out", str(run), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return run


def test_tensorboard_holds_loss_lr_and_speed_for_every_logged_step(logged_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = json.loads((logged_run / "pretrain" / "run.json").read_text())
    lines = [json.loads(line) for line in (logged_run / "pretrain" / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(logged_run / "pretrain" / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "views_per_second"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("loss")
    assert [event.step for event in losses] == list(range(1, record["steps"] + 1))
    assert [event.value for event in losses] == pytest.approx([line["loss"] for line in lines], rel=1e-6)
    assert [event.value for event in events.Scalars("lr")] == pytest.approx([line["lr"] for line in lines])
    assert events.Tags()["images"] == ["views"]


def test_views_png_shows_eight_originals_beside_their_two_views(logged_run: Path) -> None:
    picture = np.asarray(Image.open(logged_run / "pretrain" / "views.png").convert("RGB"))
    cell = MIN_CELL  # 32 px views enlarged 3x
    assert picture.shape == (SHOWN_IMAGES * (cell + GAP) + GAP, 3 * (cell + GAP) + GAP, 3)
    for row in range(SHOWN_IMAGES):
        for column in range(3):
            top, left = GAP + row * (cell + GAP), GAP + column * (cell + GAP)
            tile = picture[top : top + cell, left : left + cell].astype(float)
            assert tile.std() > 5, f"row {row} column {column} is blank"
    first_view, second_view = (picture[GAP : GAP + cell, GAP + k * (cell + GAP) :][:, :cell] for k in (1, 2))
    assert not np.array_equal(first_view, second_view)  # two different random views


def test_views_png_is_written_without_a_logger_too(digits_folder: tuple[Path, Path], tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["pretrain", str(digits_folder[0]), "--arch", "test_resnet", "--epochs", "1", "--batch-size", "256",
         "--out", str(tmp_path / "run"), "--quiet", "--augment-on", "workers"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "pretrain" / "views.png").is_file()
    assert not (tmp_path / "run" / "pretrain" / "tensorboard").exists()


def test_mlflow_run_holds_the_resolved_config_and_the_loss(
    digits_folder: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(
        app,
        ["pretrain", str(digits_folder[0]), "--arch", "test_resnet", "--epochs", "1", "--batch-size", "256",
         "--logger", "mlflow", "--out", str(tmp_path / "cells"), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("labelfew")
    assert experiment is not None
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "cells/pretrain"
    assert found.data.params["arch"] == "test_resnet" and found.data.params["image_size"] == "32"
    steps = json.loads((tmp_path / "cells" / "pretrain" / "run.json").read_text())["steps"]
    assert len(client.get_metric_history(found.info.run_id, "loss")) == steps


def test_a_logger_without_its_extra_fails_before_any_work(
    digits_folder: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "tensorboard" else real(name, *args)
    )
    result = runner.invoke(
        app, ["pretrain", str(digits_folder[0]), "--logger", "tensorboard", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "pip install 'labelfew[tensorboard]'" in result.output
    assert not (tmp_path / "r").exists()


def test_evaluate_logs_each_rows_accuracies_beside_the_training_stages(
    logged_run: Path, digits_folder: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train, test = digits_folder
    result = runner.invoke(
        app,
        ["evaluate", "--test", str(test), "--bank", str(train), "--from", str(logged_run), "--quiet",
         "--logger", "tensorboard", "--logger", "mlflow"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((logged_run / "evaluate" / "report.json").read_text())
    knn = next(row for row in report["rows"] if row["method"] == "kNN")
    events = EventAccumulator(str(logged_run / "evaluate" / "tensorboard"))
    events.Reload()
    assert events.Scalars("kNN/top1")[0].value == pytest.approx(knn["top1"])
    assert "linear probe/balanced_accuracy" in events.Tags()["scalars"]
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("labelfew")
    assert experiment is not None
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == f"{logged_run.name}/evaluate"
    assert found.data.metrics["kNN/top1"] == pytest.approx(knn["top1"])
    assert found.data.params["knn_k"] == "20"
