"""The one training loop for pretrain and finetune, on Accelerate.

Accelerate places the model and data (CPU, one GPU, many GPUs, many nodes; `accelerate launch`
or `torchrun`), handles mixed precision and shards the data loader across processes. Only the
main process prints and writes files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from labelfew.errors import UserError

console = Console(stderr=True)

StepFunction = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, int]]
"""(model, batch) -> (loss to back-propagate, number of views processed)."""


def make_accelerator(precision: str) -> Accelerator:
    """An Accelerator with `precision` resolved: auto is bf16 on GPUs that support it, else no.

    Raises:
        UserError: fp16 or bf16 asked for on hardware that cannot run it.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision not in ("no", "bf16", "fp16"):
        raise UserError(f"--precision {precision}: use bf16, fp16, no or auto")
    if precision == "fp16" and not cuda:
        raise UserError("--precision fp16 needs a CUDA GPU; on the CPU use --precision bf16 or no")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bfloat16 support; use --precision fp16 or no")
    return Accelerator(mixed_precision=precision)


def default_workers(requested: int | None) -> int:
    """DataLoader workers: as asked, else up to 8 on a GPU machine and half the cores on a CPU one.

    On a CPU-only machine the training step itself needs the cores, so fewer workers decode.
    """
    if requested is not None:
        return max(0, requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        return min(8, cores)
    return 0 if cores <= 2 else min(8, cores // 2)


def per_process_batch(global_batch: int, accelerator: Accelerator) -> int:
    """The batch each process loads, so that `global_batch` = per-process × processes.

    Raises:
        UserError: the global batch does not split evenly.
    """
    processes = accelerator.num_processes
    if global_batch < processes or global_batch % processes:
        raise UserError(
            f"--batch-size {global_batch} is the global batch and must be a multiple of the "
            f"{processes} processes; use {max(processes, global_batch // processes * processes)}"
        )
    return global_batch // processes


@dataclass
class FitResult:
    """What a finished training loop reports."""

    epochs: int
    steps: int
    seconds: float
    views_per_second: float
    final_loss: float
    epoch_losses: list[float] = field(default_factory=list)
    bad_indices: list[int] = field(default_factory=list)


@dataclass
class Trainer:
    """Runs `step` over `loader` for `epochs`, stepping the optimizer and the per-step schedule.

    Loss values are read back to the host only every `log_every` steps and at epoch ends, so the
    device is not synchronised on every step.
    """

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader[Any]
    step: StepFunction
    epochs: int
    description: str
    quiet: bool = False
    log_file: Path | None = None
    log_every: int = 10
    max_grad_norm: float | None = None
    on_epoch_end: Callable[[int, float], dict[str, float]] | None = None
    _bad: set[int] = field(default_factory=set)

    def fit(self) -> FitResult:
        main = self.accelerator.is_main_process
        show = main and not self.quiet
        start, views, steps, losses = time.perf_counter(), 0, 0, []
        log = self.log_file.open("a", encoding="utf-8") if (main and self.log_file) else None
        progress = _progress(self.description, disable=not show)
        try:
            with progress:
                task = progress.add_task(
                    self.description,
                    total=len(self.loader) * self.epochs,
                    loss=float("nan"),
                    lr=0.0,
                    rate=0.0,
                )
                for epoch in range(self.epochs):
                    self.model.train()
                    if hasattr(self.loader, "set_epoch"):
                        self.loader.set_epoch(epoch)
                    running, count, pending = torch.zeros((), device=self.accelerator.device), 0, []
                    for batch in self.loader:
                        loss, batch_views = self._train_step(batch)
                        running += loss.detach().float()
                        count += 1
                        steps += 1
                        views += batch_views * self.accelerator.num_processes
                        pending.append((steps, loss.detach()))
                        if steps % self.log_every == 0:
                            self._flush(
                                pending, log, epoch, progress, task, views / (time.perf_counter() - start)
                            )
                            pending = []
                        progress.advance(task)
                    self._flush(pending, log, epoch, progress, task, views / (time.perf_counter() - start))
                    epoch_loss = float(self.accelerator.reduce(running, reduction="mean")) / max(count, 1)
                    losses.append(epoch_loss)
                    extra = self.on_epoch_end(epoch, epoch_loss) if self.on_epoch_end else {}
                    if main and (self.quiet or extra):
                        shown = " ".join(f"{key} {value:.4f}" for key, value in extra.items())
                        console.print(
                            f"{self.description} epoch {epoch + 1}/{self.epochs} loss {epoch_loss:.4f} {shown}".rstrip()
                        )
        finally:
            if log is not None:
                log.close()
        seconds = time.perf_counter() - start
        bad = sorted({index for part in gather_object([sorted(self._bad)]) for index in part})
        return FitResult(
            epochs=self.epochs,
            steps=steps,
            seconds=seconds,
            views_per_second=views / max(seconds, 1e-9),
            final_loss=losses[-1] if losses else float("nan"),
            epoch_losses=losses,
            bad_indices=bad,
        )

    def _train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        self._bad.update(batch.pop("bad", []))
        loss, batch_views = self.step(self.model, batch)
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                "the loss became NaN or infinite; lower the learning rate (--lr / --base-lr) or use --precision no"
            )
        self.accelerator.backward(loss)
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, batch_views

    def _flush(
        self,
        pending: list[tuple[int, torch.Tensor]],
        log: Any,
        epoch: int,
        progress: Progress,
        task: Any,
        rate: float,
    ) -> None:
        if not pending:
            return
        values = torch.stack([loss for _, loss in pending]).float().cpu().tolist()
        lr = self.optimizer.param_groups[0]["lr"]
        progress.update(task, loss=values[-1], lr=lr, rate=rate)
        if log is not None:
            for (step, _), value in zip(pending, values, strict=True):
                log.write(json.dumps({"epoch": epoch + 1, "step": step, "loss": value, "lr": lr}) + "\n")
            log.flush()


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


def describe_device(accelerator: Accelerator) -> str:
    """e.g. 'cuda (NVIDIA H100) × 8 processes, bf16' or 'cpu × 1 process, no'."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    processes = accelerator.num_processes
    plural = "process" if processes == 1 else "processes"
    label = f"{device.type} ({name})" if name else device.type
    return f"{label} × {processes} {plural}, precision {accelerator.mixed_precision}"
