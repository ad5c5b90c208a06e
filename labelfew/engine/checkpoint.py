"""Checkpoints that let a killed run resume to the same model.

A checkpoint is a folder `checkpoints/step-00001234/` holding

    model.safetensors   the unwrapped model's state dict (safetensors: loading runs no code)
    ema.safetensors     the moving average of the weights, when the run keeps one (`engine.ema`)
    best.safetensors    the best validated epoch's weights, when the run keeps one (`engine.best`)
    state.pt            optimizer, LR scheduler, grad scaler, RNG states of every process
                        (python, numpy, torch CPU, CUDA), epoch, position inside the epoch and
                        progress totals — read back with `torch.load(weights_only=True)`, which
                        refuses anything but tensors and plain containers, so it cannot run code
    fingerprint.json    what must not change between the run and its resume (arch, batch, data …)

It is written into a temporary folder and renamed, so a kill leaves either the whole checkpoint
or none; the newest `keep` checkpoints are kept. A full disk fails the write, not the earlier
checkpoints: the run stops with one line saying how much space the checkpoint needs, and
rerunning once space is freed resumes from the newest complete one. `require_space` refuses to
start a run whose first checkpoint would not fit.
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

from labelfew.engine.accelerator import on_main_process
from labelfew.engine.best import BestEpoch
from labelfew.engine.ema import ModelEMA
from labelfew.errors import UserError
from labelfew.fileio import disk_full_error, is_disk_full, require_free_space

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
    each of `extra_tensors` as `<name>.safetensors` beside the model's.

    Raises:
        UserError: the disk is full: the folder, the checkpoint's size and that a rerun resumes
            (the earlier checkpoints are left as they were).
    """
    tensors = {"model": model_state, **(extra_tensors or {})}
    needed = sum(_tensor_bytes(values) for values in tensors.values()) + _tensor_bytes(training_state)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(folder)  # a killed write's (the stage folder's lock: no other writer)
        temporary = Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=folder))
    except OSError as error:
        if is_disk_full(error, folder, needed):
            raise disk_full_error(folder, "the next checkpoint", needed) from None
        raise
    step = int(training_state["position"]["global_step"])
    final = folder / f"{PREFIX}{step:08d}"
    try:
        for name, values in tensors.items():
            save_file({key: value.detach().cpu().contiguous() for key, value in values.items()},
                      str(temporary / f"{name}.safetensors"))  # fmt: skip
        torch.save(training_state, temporary / "state.pt")
        (temporary / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
        for path in temporary.iterdir():
            with open(path, "rb") as stream:
                os.fsync(stream.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException as error:
        full = isinstance(error, Exception) and is_disk_full(error, folder, needed)  # before freeing space
        shutil.rmtree(temporary, ignore_errors=True)
        if full:
            raise disk_full_error(folder, "the next checkpoint", needed) from None
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

    A key `_K` holds the file list hashed into key `K` (`_image_list_sha256`): it is not compared
    itself, but names the files that appeared or vanished when `K` differs.

    Raises:
        UserError: naming every changed key, its old and new value (and up to 3 files that appeared
            or vanished), and `--restart`.
    """
    changed = [f"{key} {saved.get(key)!r} → {current.get(key)!r}{_files_changed(saved, current, key)}"
               for key in sorted(set(saved) | set(current))
               if not key.startswith("_") and saved.get(key) != current.get(key)]  # fmt: skip
    if changed:
        raise UserError(
            f"{checkpoint.parent}: a checkpoint of a different run ({'; '.join(changed)}); "
            "rerun with the original settings to resume, or pass --restart to start over"
        )


def _files_changed(saved: dict[str, Any], current: dict[str, Any], key: str) -> str:
    """` (2 appeared: a.png, b.png; 1 vanished: c.png)` from the lists under `_<key>`; "" without them."""
    before, after = saved.get("_" + key), current.get("_" + key)
    if not isinstance(before, list) or not isinstance(after, list):
        return ""  # a checkpoint written before the lists were kept, or a list too long to keep
    parts = []
    appeared, vanished = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    for word, names in (("appeared", appeared), ("vanished", vanished)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{len(names)} file(s) {word}: {', '.join(names[:3])}{more}")
    return f" ({'; '.join(parts)})" if parts else ""


def position_from(state: dict[str, Any]) -> Position:
    return Position(**state["position"])


def position_state(position: Position) -> dict[str, Any]:
    return asdict(position)


def remove_all(folder: Path) -> None:
    """Deletes every checkpoint in `folder` (for --restart)."""
    for path in folder.glob(f"{PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
    _remove_temporaries(folder)


def _remove_temporaries(folder: Path) -> None:
    """Deletes the temporary folders of checkpoint writes that were killed (they only take space)."""
    for path in folder.glob(f".{PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state: what a checkpoint of it takes on disk, near enough."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def estimated_bytes(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: ModelEMA | None = None,
    best: BestEpoch | None = None,
) -> int:  # fmt: skip
    """The size of a checkpoint of this training before its first step: the weights, the moving
    average's tensors (with `pretrain --queue`, the momentum encoder and its queue), the weights
    once more with a best epoch kept, the optimizer's per-parameter buffers (two with Adam's betas,
    one with momentum) and 1 MB for the rest; the optimizer creates its buffers only at its first
    step."""
    weights = _tensor_bytes(model.state_dict())
    trainable = sum(_tensor_bytes(group["params"]) for group in optimizer.param_groups)
    defaults = optimizer.defaults
    buffers = 2 if "betas" in defaults else 1 if defaults.get("momentum") else 0
    return (
        weights * (1 + (best is not None))
        + (_tensor_bytes(ema.state_dict()) if ema is not None else 0)
        + max(trainable * buffers, _tensor_bytes(optimizer.state))
        + (1 << 20)
    )


def require_space(
    accelerator: Any, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    ema: ModelEMA | None = None, best: BestEpoch | None = None,
) -> None:  # fmt: skip
    """Refuses, before training starts, a run whose next checkpoint would not fit on the disk of
    `folder` (the last ones are pruned only after it is written); every process must call this.

    Raises:
        UserError: on every process, naming the folder, the free space and the size needed.
    """
    needed = estimated_bytes(accelerator.unwrap_model(model), optimizer, ema, best)
    on_main_process(accelerator, lambda: require_free_space(folder, needed, "a checkpoint of this run"))


def save_training(
    accelerator: Any, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, position: Position, fingerprint: dict[str, Any], metrics: list[dict[str, float]],
    ema: ModelEMA | None = None, best: BestEpoch | None = None,
) -> None:  # fmt: skip
    """Gathers every process's RNG state and has the main process write one checkpoint (with the
    weights' moving average and the best epoch's weights when the run keeps them).

    Every process must call this at the same step.

    Raises:
        UserError: on every process, when the main process's disk is full (`save`).
    """
    rng_states = [rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rng_states = gather_object(rng_states)

    def write() -> None:
        scaler = getattr(accelerator, "scaler", None)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states,
            "position": position_state(position),
            "metrics": metrics,
            "ema": ema.extra_state() if ema is not None else None,
            "best": best.extra_state() if best is not None else None,
        }
        extra = {"ema": ema.state_dict()} if ema is not None else {}
        if best is not None and best.weights:
            extra["best"] = best.weights
        save(folder, accelerator.unwrap_model(model).state_dict(), state, fingerprint, extra_tensors=extra)

    on_main_process(accelerator, write)  # a full disk stops every process with its one line


def restore_training(
    accelerator: Any, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, fingerprint: dict[str, Any], ema: ModelEMA | None = None, best: BestEpoch | None = None,
) -> tuple[Path, Position, list[dict[str, float]]] | None:  # fmt: skip
    """Loads the newest checkpoint into the model, optimizer, scheduler, scaler, RNGs (and `ema`, `best`).

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
    if best is not None:
        _restore_best(found, best, state.get("best"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    rng_states = state["rng"]
    set_rng_state(rng_states[accelerator.process_index % len(rng_states)])
    return found, position_from(state), list(state.get("metrics", []))


def _restore_best(checkpoint: Path, best: BestEpoch, record: dict[str, Any] | None) -> None:
    """Loads `best.safetensors` and the best epoch's record into `best`; a checkpoint written before
    any validation (or before the best epoch was kept) has none, and the best starts from there.

    Raises:
        UserError: a record whose weights file is missing or damaged.
    """
    if record is None or record.get("epoch") is None:
        return
    try:
        best.load(load_file(str(checkpoint / "best.safetensors")), record)
    except Exception as error:  # a missing or damaged file
        raise UserError(
            f"{checkpoint}: no usable best epoch's weights ({type(error).__name__}); delete it or pass --restart"
        ) from None


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
