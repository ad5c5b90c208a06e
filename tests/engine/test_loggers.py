"""The run loggers: what TensorBoard and MLflow hold afterwards, read back with their own readers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from labelfew.engine import loggers
from labelfew.errors import UserError


def test_tensorboard_event_file_holds_the_scalars_image_and_config(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = loggers.open_loggers(["jsonl", "tensorboard"], tmp_path / "run" / "pretrain", {"epochs": 3})
    for step in range(1, 6):
        run.log_scalars(step, {"loss": 1.0 / step, "lr": 0.1 * step})
    run.log_image("views", np.full((8, 12, 3), 200, dtype=np.uint8))
    run.close()

    events = EventAccumulator(str(tmp_path / "run" / "pretrain" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr"}
    losses = events.Scalars("loss")
    assert [event.step for event in losses] == [1, 2, 3, 4, 5]
    assert [event.value for event in losses] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert events.Tags()["images"] == ["views"]
    image = events.Images("views")[0]
    assert (image.width, image.height) == (12, 8)


def test_mlflow_run_holds_params_and_metric_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"arch": "resnet18", "epochs": 3, "view": {"min_scale": 0.08}, "sizes": [1, 2]}
    run = loggers.open_loggers(["mlflow"], tmp_path / "runs" / "cells" / "pretrain", config)
    for step in (10, 20, 30):
        run.log_scalars(step, {"loss": step / 10})
    mlflow_run_id = run.backends[0].run.info.run_id  # type: ignore[attr-defined]
    run.close()

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    record = client.get_run(mlflow_run_id)
    assert record.info.run_name == "cells/pretrain"
    assert record.data.params == {
        "arch": "resnet18",
        "epochs": "3",
        "view.min_scale": "0.08",
        "sizes": "[1, 2]",
    }
    history = client.get_metric_history(mlflow_run_id, "loss")
    assert [(metric.step, metric.value) for metric in history] == [(10, 1.0), (20, 2.0), (30, 3.0)]


def test_no_backend_means_no_files(tmp_path: Path) -> None:
    run = loggers.open_loggers(["jsonl"], tmp_path / "run" / "pretrain", {"epochs": 1})
    run.log_scalars(1, {"loss": 1.0})
    run.close()
    assert run.backends == []
    assert not (tmp_path / "run").exists()


def test_unknown_logger_is_one_line_naming_the_choices() -> None:
    with pytest.raises(UserError, match=r"--logger wandb: use one of jsonl, tensorboard, mlflow"):
        loggers.check_loggers(["wandb"])


def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "mlflow" else real(name, *args)
    )
    with pytest.raises(UserError, match=r"mlflow is not installed; pip install 'labelfew\[mlflow\]'"):
        loggers.check_loggers(["tensorboard", "mlflow"])


def test_duplicates_and_jsonl_are_dropped() -> None:
    assert loggers.check_loggers(["jsonl", "tensorboard", "tensorboard"]) == ("tensorboard",)
