"""Checkpoints that let a killed run resume to the same model.

A checkpoint is a folder `checkpoints/step-00001234/` holding

    model.safetensors   the unwrapped model's state dict (safetensors: loading runs no code)
    ema.safetensors     the moving average of the weights, when the run keeps one (`engine.ema`)
    state.pt            optimizer, LR scheduler, grad scaler, RNG states of every process
                        (python, numpy, torch CPU, CUDA), epoch, position inside the epoch and
                        progress totals — read back with `torch.load(weights_only=True)`, which
                        refuses anything but tensors and plain containers, so it cannot run code
    fingerprint.json    what must not change between the run and its resume (arch, batch, data …)

It is written into a temporary folder and renamed, so a kill leaves either the whole checkpoint
or none; the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from labelfew.engine.ema import ModelEMA
from labelfew.errors import UserError

PREFIX = "step-"


@dataclass
class Position:
    """Where training is: the next step to run and the totals so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    views: int = 0
    seconds: float = 0.0
    epoch_losses: list[float] = field(default_factory=list)
    running_loss: float = 0.0
    bad_indices: list[int] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    """This process's random number generator states, as tensors and plain values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the states saved by `rng_state`."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    folder: Path, model_state: dict[str, torch.Tensor], training_state: dict[str, Any],
    fingerprint: dict[str, Any], keep: int = 2, extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:  # fmt: skip
    """Writes one checkpoint atomically (temporary folder, fsync, rename) and prunes old ones;
    each of `extra_tensors` as `<name>.safetensors` beside the model's."""
    folder.mkdir(parents=True, exist_ok=True)
    step = int(training_state["position"]["global_step"])
    final = folder / f"{PREFIX}{step:08d}"
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        for name, tensors in {"model": model_state, **(extra_tensors or {})}.items():
            save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()},
                      str(temporary / f"{name}.safetensors"))  # fmt: skip
        torch.save(training_state, temporary / "state.pt")
        (temporary / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
        for path in temporary.iterdir():
            with open(path, "rb") as stream:
                os.fsync(stream.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in sorted(folder.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None."""
    if not folder.is_dir():
        return None
    complete = [path for path in sorted(folder.glob(f"{PREFIX}*")) if (path / "state.pt").is_file()]
    return complete[-1] if complete else None


def load(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, training state, fingerprint) of a checkpoint; never unpickles code.

    Raises:
        UserError: a damaged checkpoint, naming it and how to start over.
    """
    try:
        model_state = load_file(str(checkpoint / "model.safetensors"))
        training_state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
        fingerprint = json.loads((checkpoint / "fingerprint.json").read_text())
    except Exception as error:  # any damage: safetensors, unpickling or JSON errors
        raise UserError(
            f"{checkpoint}: damaged checkpoint ({type(error).__name__}); delete it or pass --restart"
        ) from None
    return model_state, training_state, fingerprint


def check_fingerprint(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuses to resume a run whose recipe changed.

    Raises:
        UserError: naming every changed key, its old and new value, and `--restart`.
    """
    changed = [f"{key} {saved.get(key)!r} → {current.get(key)!r}"
               for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]  # fmt: skip
    if changed:
        raise UserError(
            f"{checkpoint.parent}: a checkpoint of a different run ({'; '.join(changed)}); "
            "rerun with the original settings to resume, or pass --restart to start over"
        )


def position_from(state: dict[str, Any]) -> Position:
    return Position(**state["position"])


def position_state(position: Position) -> dict[str, Any]:
    return asdict(position)


def remove_all(folder: Path) -> None:
    """Deletes every checkpoint in `folder` (for --restart)."""
    for path in folder.glob(f"{PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(f".{PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def save_training(
    accelerator: Any, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, position: Position, fingerprint: dict[str, Any], metrics: list[dict[str, float]],
    ema: ModelEMA | None = None,
) -> None:  # fmt: skip
    """Gathers every process's RNG state and has the main process write one checkpoint (with the
    weights' moving average when there is one).

    Every process must call this at the same step.
    """
    rng_states = [rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rng_states = gather_object(rng_states)
    if accelerator.is_main_process:
        scaler = getattr(accelerator, "scaler", None)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states,
            "position": position_state(position),
            "metrics": metrics,
            "ema": ema.extra_state() if ema is not None else None,
        }
        extra = {"ema": ema.state_dict()} if ema is not None else None
        save(folder, accelerator.unwrap_model(model).state_dict(), state, fingerprint, extra_tensors=extra)
    accelerator.wait_for_everyone()


def restore_training(
    accelerator: Any, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, fingerprint: dict[str, Any], ema: ModelEMA | None = None,
) -> tuple[Path, Position, list[dict[str, float]]] | None:  # fmt: skip
    """Loads the newest checkpoint into the model, optimizer, scheduler, scaler, RNGs (and `ema`).

    Returns (checkpoint folder, position, per-epoch metrics), or None when there is none.

    Raises:
        UserError: the checkpoint belongs to a run with other settings, or is damaged.
    """
    found = latest(folder)
    if found is None:
        return None
    model_state, state, saved = load(found)
    check_fingerprint(found, saved, fingerprint)
    accelerator.unwrap_model(model).load_state_dict(model_state)
    if ema is not None:
        _restore_ema(found, ema, state.get("ema"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    rng_states = state["rng"]
    set_rng_state(rng_states[accelerator.process_index % len(rng_states)])
    return found, position_from(state), list(state.get("metrics", []))


def _restore_ema(checkpoint: Path, ema: ModelEMA, record: dict[str, Any] | None) -> None:
    """Loads `ema.safetensors` and the update count into `ema`.

    Raises:
        UserError: the checkpoint has no moving average (or a damaged one).
    """
    try:
        if record is None:
            raise FileNotFoundError("no moving average recorded")
        ema.load_state_dict(load_file(str(checkpoint / "ema.safetensors")), updates=int(record["updates"]))
    except Exception as error:  # a missing or damaged file, or tensors that do not fit
        raise UserError(
            f"{checkpoint}: no usable weights' moving average ({type(error).__name__}); delete it or pass --restart"
        ) from None
