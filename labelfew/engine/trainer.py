"""The one training loop for every stage: `Trainer` runs a step function over epochs of batches.

Loss values reach the host only at log points; checkpoints are written at epoch ends and every
few minutes, and a rerun resumes from the newest one (`labelfew.engine.checkpoint`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from labelfew.data.batches import Batch, EpochBatches
from labelfew.engine import checkpoint
from labelfew.engine import signals as signals_module
from labelfew.engine.accelerator import console
from labelfew.engine.best import BestEpoch
from labelfew.engine.ema import ModelEMA
from labelfew.engine.loggers import RunLogger

PROGRESS_SECONDS = 30.0
"""Seconds between the plain progress lines of a run without a live bar (`--quiet`, or output to a
file or pipe, where rich draws nothing until the end): a log point prints one once this has passed."""

StepFunction = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]
"""(model, batch) -> (loss to back-propagate, number of views processed). The step makes the views
of the batch's uint8 images itself (`labelfew.views`), drawing from ``batch.generator()``."""


@dataclass
class FitResult:
    """What a finished training loop reports."""

    epochs: int
    steps: int
    seconds: float
    views_per_second: float
    final_loss: float
    epoch_losses: list[float] = field(default_factory=list)
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    bad_indices: list[int] = field(default_factory=list)
    resumed_from: str | None = None


@dataclass
class Trainer:
    """Runs `step` over `loader` for `epochs`, stepping the optimizer and the per-step schedule.

    Loss values are read back to the host only every `log_every` steps and at epoch ends, so the
    device is not synchronised on every step. With `checkpoint_dir`, a checkpoint is written at
    every epoch end and every `checkpoint_minutes`, a rerun resumes from the newest one (unless
    `restart`), and SIGINT/SIGTERM finish the current step, write a checkpoint and raise
    `Interrupted`.
    """

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: EpochBatches
    step: StepFunction
    epochs: int
    description: str
    quiet: bool = False
    log_file: Path | None = None
    log_every: int = 10
    max_grad_norm: float | None = None
    on_epoch_end: Callable[[int, float], dict[str, float]] | None = None
    on_first_steps: Callable[[float, int], None] | None = None
    """Called once on the main process with (measured seconds per step, steps left), after the
    first step (which also pays for allocation and warm-up) and 3 more, or 1 more when slow."""
    loggers: RunLogger | None = None
    """TensorBoard / MLflow (`labelfew.engine.loggers`), main process only; closed when `fit` ends."""
    ema: ModelEMA | None = None
    """A moving average of the weights (`labelfew.engine.ema`), updated after every optimizer step
    and kept in the checkpoints."""
    best: BestEpoch | None = None
    """The best epoch by a per-epoch metric (`labelfew.engine.best`): told each epoch's metrics,
    kept in the checkpoints, and its early stopping ends the loop."""
    checkpoint_dir: Path | None = None
    checkpoint_minutes: float = 10.0
    fingerprint: dict[str, Any] = field(default_factory=dict)
    restart: bool = False
    _bad: set[int] = field(default_factory=set)
    _position: checkpoint.Position = field(default_factory=checkpoint.Position)
    _metrics: list[dict[str, float]] = field(default_factory=list)
    _last_checkpoint: float = 0.0
    _step_lr: float = 0.0  # the lr the last optimizer step used (the scheduler has moved on since)
    _step_times: list[float] = field(default_factory=list)  # ends of the first steps, for the estimate
    _estimated: bool = False
    _last_line: float = 0.0  # when the last plain progress line was printed

    def fit(self) -> FitResult:
        main = self.accelerator.is_main_process
        resumed = self._resume()
        position = self._position
        start = time.perf_counter() - position.seconds
        self._last_checkpoint = self._last_line = time.perf_counter()
        log = self.log_file.open("a", encoding="utf-8") if (main and self.log_file) else None
        progress = _progress(self.description, disable=not main or self.quiet)
        try:
            with progress, signals_module.StopSignals() as signals:
                task = progress.add_task(self.description, total=len(self.loader) * self.epochs,
                                         completed=position.global_step, loss=float("nan"), lr=0.0, rate=0.0)  # fmt: skip
                while position.epoch < self.epochs and not (self.best is not None and self.best.stopped):
                    self._epoch(position, log, progress, task, start, signals)
        finally:
            if log is not None:
                log.close()
            if self.loggers is not None:
                self.loggers.close()
        seconds = time.perf_counter() - start
        bad = sorted({index for part in gather_object([sorted(self._bad)]) for index in part})
        losses = position.epoch_losses
        return FitResult(
            epochs=self.epochs, steps=position.global_step, seconds=seconds,
            views_per_second=position.views / max(seconds, 1e-9), final_loss=losses[-1] if losses else float("nan"),
            epoch_losses=losses, epoch_metrics=self._metrics, bad_indices=bad, resumed_from=resumed,
        )  # fmt: skip

    def _epoch(self, position: checkpoint.Position, log: Any, progress: Progress, task: Any,
               start: float, signals: signals_module.StopSignals) -> None:  # fmt: skip
        epoch, skip = position.epoch, position.step_in_epoch
        self.model.train()
        self.loader.set_epoch(epoch, first_step=skip)  # a resume starts at `skip`, not making earlier batches
        running = torch.full((), position.running_loss, device=self.accelerator.device)
        pending: list[tuple[int, torch.Tensor, float]] = []
        for batch in self.loader:
            loss, batch_views = self._train_step(batch)
            running += loss.detach().float()
            position.step_in_epoch += 1
            position.global_step += 1
            position.views += batch_views * self.accelerator.num_processes
            pending.append((position.global_step, loss.detach(), self._step_lr))
            progress.advance(task)
            single = self.accelerator.num_processes == 1
            if position.global_step % self.log_every == 0 or (single and signals.received):
                rate = position.views / (time.perf_counter() - start)
                self._flush(pending, log, epoch, progress, task, rate)
                pending = []
                if self._agree(self._checkpoint_due() or signals.received is not None):
                    position.running_loss = float(running)
                    self._save(start)
                    signals.raise_if_received(self._checkpoint_hint())
        self._flush(pending, log, epoch, progress, task, position.views / (time.perf_counter() - start))
        count = max(position.step_in_epoch, 1)
        epoch_loss = float(self.accelerator.reduce(running, reduction="mean")) / count
        position.epoch_losses.append(epoch_loss)
        extra = self.on_epoch_end(epoch, epoch_loss) if self.on_epoch_end else {}
        self._metrics.append(extra)
        if self.best is not None:
            self.best.observe(epoch, extra)
        position.epoch, position.step_in_epoch, position.running_loss = epoch + 1, 0, 0.0
        if self.accelerator.is_main_process and (self.quiet or extra):
            shown = " ".join(f"{key} {value:.4f}" for key, value in extra.items())
            console.print(
                f"{self.description} epoch {epoch + 1}/{self.epochs} loss {epoch_loss:.4f} {shown}".rstrip()
            )
        if self.best is not None and self.best.stopped and self.accelerator.is_main_process:
            console.print(f"{self.description}: early stop after epoch {epoch + 1}/{self.epochs}: "
                          f"{self.best.since} validations without a better {self.best.key} than epoch "
                          f"{self.best.epoch}'s {self.best.score:.4f}")  # fmt: skip
        self._save(start)
        signals.raise_if_received(self._checkpoint_hint())

    def _train_step(self, batch: Batch) -> tuple[torch.Tensor, int]:
        self._bad.update(batch.bad)
        loss, batch_views = self.step(self.model, batch)
        self.accelerator.backward(loss)  # finiteness is checked where losses reach the host (_flush)
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self._step_lr = float(self.optimizer.param_groups[0]["lr"])  # this step's, logged as such
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.accelerator.unwrap_model(self.model))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._time_first_steps()
        return loss, batch_views

    def _time_first_steps(self) -> None:
        if self.on_first_steps is None or self._estimated or not self.accelerator.is_main_process:
            return
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # a few times only: the steps are otherwise still queued
        self._step_times.append(time.perf_counter())
        timed, elapsed = len(self._step_times) - 1, self._step_times[-1] - self._step_times[0]
        if timed >= 3 or (timed >= 1 and elapsed >= 20):
            steps_left = len(self.loader) * self.epochs - self._position.global_step - 1  # this one is done
            self.on_first_steps(elapsed / timed, max(steps_left, 0))
            self._estimated = True

    def _flush(
        self,
        pending: list[tuple[int, torch.Tensor, float]],
        log: Any,
        epoch: int,
        progress: Progress,
        task: Any,
        rate: float,
    ) -> None:
        if not pending:
            return
        # The mean over processes of the per-process losses is the loss of the global batch.
        stacked = torch.stack([loss for _, loss, _ in pending]).float()
        values = self.accelerator.reduce(stacked, reduction="mean").cpu().tolist()
        if not all(math.isfinite(value) for value in values):
            raise FloatingPointError(
                f"the loss became NaN or infinite by step {pending[-1][0]}; lower the learning rate "
                "(--lr / --base-lr) or use --precision no"
            )
        progress.update(task, loss=values[-1], lr=pending[-1][2], rate=rate)
        self._progress_line(epoch, pending[-1][0], values[-1], pending[-1][2], rate)
        if log is not None:
            for (step, _, lr), value in zip(pending, values, strict=True):
                log.write(json.dumps({"epoch": epoch + 1, "step": step, "loss": value, "lr": lr}) + "\n")
            log.flush()
        if self.loggers is not None and self.accelerator.is_main_process:
            for (step, _, lr), value in zip(pending, values, strict=True):
                self.loggers.log_scalars(step, {"loss": value, "lr": lr})
            self.loggers.log_scalars(pending[-1][0], {"views_per_second": rate})

    def _progress_line(self, epoch: int, step: int, loss: float, lr: float, rate: float) -> None:
        """A plain line every `PROGRESS_SECONDS` where no bar is drawn, so a long epoch shows progress."""
        no_bar = self.quiet or not console.is_terminal
        if not no_bar or not self.accelerator.is_main_process:
            return
        if time.perf_counter() - self._last_line < PROGRESS_SECONDS:
            return
        self._last_line = time.perf_counter()
        console.print(
            f"{self.description} epoch {epoch + 1}/{self.epochs} step {step}/{len(self.loader) * self.epochs} "
            f"loss {loss:.4f} lr {lr:.3g} {rate:.0f} views/s",
            highlight=False,
        )

    def _checkpoint_due(self) -> bool:
        return (time.perf_counter() - self._last_checkpoint) >= 60 * self.checkpoint_minutes

    def _agree(self, flag: bool) -> bool:
        """Whether any process says yes (every process must call this at the same step)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum") > 0)

    def _checkpoint_hint(self) -> str:
        if self.checkpoint_dir is None:
            return "no checkpoint was written (checkpoints are off)"
        return f"checkpoint in {self.checkpoint_dir}; rerun the same command to resume"

    def _save(self, start: float) -> None:
        if self.checkpoint_dir is None:
            return
        self._position.seconds = time.perf_counter() - start
        self._position.bad_indices = sorted(self._bad)
        checkpoint.save_training(self.accelerator, self.checkpoint_dir, self.model, self.optimizer,
                                 self.scheduler, self._position, self.fingerprint, self._metrics, self.ema,
                                 self.best)  # fmt: skip
        self._last_checkpoint = time.perf_counter()

    def _resume(self) -> str | None:
        if self.checkpoint_dir is None:
            return None
        if self.restart:
            if self.accelerator.is_main_process:
                checkpoint.remove_all(self.checkpoint_dir)
            self.accelerator.wait_for_everyone()
        # A full disk fails now, not at the first checkpoint minutes or hours later.
        checkpoint.require_space(self.accelerator, self.checkpoint_dir, self.model, self.optimizer, self.ema,
                                 self.best)  # fmt: skip
        if self.restart:
            return None
        restored = checkpoint.restore_training(self.accelerator, self.checkpoint_dir, self.model, self.optimizer,
                                               self.scheduler, self.fingerprint, self.ema,
                                               self.best)  # fmt: skip
        if restored is None:
            return None
        folder, self._position, self._metrics = restored
        self._bad = set(self._position.bad_indices)
        if self.accelerator.is_main_process and self.log_file is not None and self.log_file.is_file():
            _trim_log(self.log_file, self._position.global_step)
        if self.accelerator.is_main_process:
            console.print(
                f"resuming {self.description} from {folder} (epoch {self._position.epoch + 1}, "
                f"step {self._position.step_in_epoch} of the epoch); pass --restart to start over"
            )
        return str(folder)


def _trim_log(path: Path, last_step: int) -> None:
    """Drops the log lines of steps after the checkpoint, which the resumed run repeats."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _progress(description: str, disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("lr {task.fields[lr]:.3g}"),
        TextColumn("{task.fields[rate]:.0f} views/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )
