"""The best epoch by a validation score, its weights kept, and early stopping (`--early-stop N`).

Fine-tuning on a few hundred labels often peaks before its last epoch (a high lr, a tiny set), so
with a held-out split the run keeps the weights of the epoch whose score is highest (the first of
equal ones) and saves them as the model, the last epoch's beside them. The score is the validated
model's `val_score` (`labelfew.stages.finetune`: balanced accuracy for single-label): on an
imbalanced split top-1 rewards predicting the largest class. With `patience` the run stops once
that many validations in a row brought no improvement, as Keras' ``EarlyStopping(patience=N)``
and LightlyTrain's early stopping do.

The kept weights and the counters are part of every checkpoint (`labelfew.engine.checkpoint`:
``best.safetensors`` and the record in state.pt), so a resumed run chooses as the whole run would.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelfew.artifacts import save_tensors


@dataclass
class BestEpoch:
    """Tracks the best validated epoch of `module` (the model that is validated and saved: the
    weights' moving average with FixMatch).

    Attributes:
        module: the unwrapped validated model; its state is copied (to the CPU) at each new best.
        key: the per-epoch metric to maximise.
        patience: stop after this many validations without improvement; None: never.
        epoch: the best epoch so far (1-based), None before any validation.
        score: its score.
        since: validations since the best one.
        weights: the best epoch's state dict, on the CPU.
        stopped_at: the epoch (1-based) after which `patience` stopped the run, or None.
    """

    module: nn.Module
    key: str = "val_score"
    patience: int | None = None
    epoch: int | None = None
    score: float = -math.inf
    since: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    stopped_at: int | None = None

    def observe(self, epoch: int, metrics: dict[str, float]) -> None:
        """Takes the metrics of `epoch` (0-based, as the trainer counts): a higher score than the best
        keeps this epoch's weights; otherwise one more validation without improvement."""
        if self.key not in metrics:
            return
        value = float(metrics[self.key])
        if value > self.score or self.epoch is None:
            self.epoch, self.score, self.since = epoch + 1, value, 0
            self.weights = {name: tensor.detach().to("cpu", copy=True)
                            for name, tensor in self.module.state_dict().items()}  # fmt: skip
        else:
            self.since += 1
        if self.patience is not None and self.since >= self.patience:
            self.stopped_at = epoch + 1

    @property
    def stopped(self) -> bool:
        """Whether `patience` validations in a row brought no improvement."""
        return self.stopped_at is not None

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the weights."""
        return {"key": self.key, "epoch": self.epoch, "score": self.score, "since": self.since,
                "stopped_at": self.stopped_at}  # fmt: skip

    def load(self, weights: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """Restores what `extra_state` and `weights` held (a resumed run)."""
        self.weights = dict(weights)
        self.epoch, self.score, self.since = record["epoch"], float(record["score"]), int(record["since"])
        self.stopped_at = record.get("stopped_at")

    def record(self, epochs: int, last_epoch: int) -> dict[str, Any]:
        """run.json's `best`: the epoch kept, its score, and whether early stopping ended the run."""
        return {"metric": self.key, "epoch": self.epoch, "score": self.score, "epochs_trained": last_epoch,
                "epochs": epochs, "early_stop": self.patience, "stopped_early": self.stopped}  # fmt: skip


def save_models(artifact: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], best: BestEpoch | None,
                 epochs: int) -> dict[str, dict[str, str]]:  # fmt: skip
    """Writes the model (the best epoch's weights when there is one) and, then, the last epoch's as
    `model-last.safetensors` (metadata `checkpoint`: best / last, `epoch`); run.json's `artifacts`.

    `model-last.safetensors` is recorded in run.json (sha256) but not registered as a stage's file:
    `evaluate --from RUN` scores the best model only, `--from .../model-last.safetensors` the last."""
    if best is None or not best.weights:
        digest = save_tensors(artifact, state, {**metadata, "epoch": str(epochs)})
        return {artifact.name: {"sha256": digest}}
    last = artifact.with_name("model-last.safetensors")
    return {
        artifact.name: {"sha256": save_tensors(artifact, best.weights,
                                               {**metadata, "checkpoint": "best", "epoch": str(best.epoch)})},
        last.name: {"sha256": save_tensors(last, state, {**metadata, "checkpoint": "last",
                                                                      "epoch": str(epochs)})},
    }  # fmt: skip


def kept_note(best: BestEpoch | None, epochs: int) -> str:
    """The artifact line's note: which epoch is the model, and where the last one is."""
    if best is None or best.epoch is None:
        return f" (the last epoch, {epochs}: no --val-fraction to choose one)"
    stop = f", stopped early after epoch {best.stopped_at}" if best.stopped else ""
    return (f" (best epoch {best.epoch} of the {epochs} trained, by held-out balanced accuracy {100 * best.score:.1f}%{stop};"
            f" the last epoch's: model-last.safetensors)")  # fmt: skip


def kept_model(model: nn.Module, best: BestEpoch | None) -> nn.Module:
    """The model that `save_models` writes as the model: `model`, or a copy holding the best epoch's
    weights."""
    if best is None or not best.weights:
        return model
    kept = copy.deepcopy(model)
    kept.load_state_dict(best.weights)
    return kept
