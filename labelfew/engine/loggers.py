"""Where a run's numbers go while it runs: `log.jsonl` always, TensorBoard and MLflow on request.

The trainer calls one `RunLogger` (a `Loggers` fan-out) at its existing log points, on the main
process only, with values already on the host, so logging adds no device synchronisation. Each
backend is an optional extra: `pip install 'labelfew[tensorboard]'` or `'labelfew[mlflow]'`; a
missing one is a one-line error before any work starts.

TensorBoard writes event files to `RUN/<stage>/tensorboard/` (`tensorboard --logdir runs/`).
MLflow logs to `MLFLOW_TRACKING_URI` when it is set, else to a local file store `./mlruns`
(`mlflow ui --backend-store-uri ./mlruns`), one MLflow run per stage, named `<run>/<stage>`, with
the resolved config as params.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from labelfew.errors import UserError

LOGGER_CHOICES = ("jsonl", "tensorboard", "mlflow")
_EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
"""logger name -> (module that must import, pip extra that brings it)."""


class RunLogger(Protocol):
    """What the engine and the stages log to. Values are plain Python numbers and arrays."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def log_image(self, tag: str, image: np.ndarray, step: int = 0) -> None: ...

    def close(self) -> None: ...


def check_loggers(names: Sequence[str]) -> tuple[str, ...]:
    """Validates `--logger` values and that their extras are installed; returns them without duplicates.

    `jsonl` is always on (the trainer writes `log.jsonl` itself), so it is accepted and dropped here.

    Raises:
        UserError: an unknown name, or a backend whose extra is missing (names the pip command).
    """
    chosen: list[str] = []
    for name in names:
        if name not in LOGGER_CHOICES:
            raise UserError(
                f"--logger {name}: use one of {', '.join(LOGGER_CHOICES)} (repeat it for several)"
            )
        if name == "jsonl" or name in chosen:
            continue
        module, extra = _EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--logger {name}: {module} is not installed; pip install 'labelfew[{extra}]'")
        chosen.append(name)
    return tuple(chosen)


class Loggers:
    """Fans every call out to the chosen backends; with none, every call does nothing."""

    def __init__(self, backends: Sequence[RunLogger] = ()) -> None:
        self.backends = list(backends)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for backend in self.backends:
            backend.log_params(params)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for backend in self.backends:
            backend.log_scalars(step, scalars)

    def log_image(self, tag: str, image: np.ndarray, step: int = 0) -> None:
        for backend in self.backends:
            backend.log_image(tag, image, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def open_loggers(names: Sequence[str], stage_folder: Path, params: Mapping[str, Any]) -> Loggers:
    """The backends `names` asks for, opened for one stage of a run, with `params` logged once.

    Call on the main process only. `stage_folder` is `RUN/<stage>` (TensorBoard writes below it;
    MLflow names its run after it).
    """
    backends: list[RunLogger] = []
    for name in check_loggers(names):
        if name == "tensorboard":
            backends.append(TensorBoardLogger(stage_folder / "tensorboard"))
        elif name == "mlflow":
            backends.append(MlflowLogger(f"{stage_folder.parent.name}/{stage_folder.name}"))
    loggers = Loggers(backends)
    loggers.log_params(params)
    return loggers


class TensorBoardLogger:
    """Event files through `torch.utils.tensorboard.SummaryWriter`."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {key}: {value}" for key, value in _flat(params).items())
        self.writer.add_text("config", text)  # indented: TensorBoard renders it as code

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # visible in TensorBoard while the run goes on

    def log_image(self, tag: str, image: np.ndarray, step: int = 0) -> None:
        """`image`: uint8, shape (height, width, 3)."""
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowLogger:
    """One MLflow run per stage, in the experiment `labelfew` (or `MLFLOW_EXPERIMENT_NAME`)."""

    def __init__(self, run_name: str) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps the file store in maintenance mode behind this opt-in; a local folder
            # needs no server and no database, which is what a first run on a lab machine wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "labelfew"))
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)

    def log_params(self, params: Mapping[str, Any]) -> None:
        # MLflow caps a param value at 6,000 characters; config values are short.
        self.mlflow.log_params({key: str(value)[:6000] for key, value in _flat(params).items()})

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.mlflow.log_metrics(dict(scalars), step=step)

    def log_image(self, tag: str, image: np.ndarray, step: int = 0) -> None:
        self.mlflow.log_image(image, artifact_file=f"{tag}.png")

    def close(self) -> None:
        self.mlflow.end_run()


def _flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists and other values as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat
