"""The one training loop for pretrain and finetune, on Accelerate.

Accelerate places the model and data (CPU, one GPU, many GPUs, many nodes; `accelerate launch`
or `torchrun`), handles mixed precision and shards the data loader across processes: every
process takes its own part of one seeded permutation per epoch, so K processes with batch N see
the same global batches as one process with batch K × N. Only the main process prints and
writes files; what it does alone goes through `on_main_process`, so that its errors reach every
process instead of leaving the others waiting.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from labelfew import checkpoint
from labelfew.errors import UserError

console = Console(stderr=True)

StepFunction = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, int]]
"""(model, batch) -> (loss to back-propagate, number of views processed)."""


T = TypeVar("T")

DISTRIBUTED_TIMEOUT = timedelta(minutes=10)
"""How long a process waits in a collective (all-reduce, gather) for the others.

When a process dies, torchrun stops the other processes of its node at once; processes on other
nodes only notice when their next collective times out. No step of labelfew keeps one process
busy alone for long (the main process's writes take seconds), so ten minutes is ample.
"""

_PROCESS_SEED_STRIDE = 1_000_003
"""Offset between the augmentation seeds of consecutive processes (a prime, so that the seeds of
process p's loader workers, base + worker, do not collide with those of process p + 1)."""


def launched_processes() -> int:
    """The world size announced by the launcher (torchrun, accelerate launch, mpirun); 1 without one."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def _has_gpu() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def make_accelerator(precision: str, seed: int) -> Accelerator:
    """An Accelerator for this process, with `precision` resolved and the data order seeded.

    auto precision is bf16 on GPUs that support it, else no. The data loaders it prepares use
    Accelerate's seedable sampler: epoch e's order is a function of (`seed`, e) alone, identical
    on every process (each takes its own part) and after a resume. On a machine without a GPU
    that was launched with several processes, Accelerate is told to use the CPU: it then joins
    the processes with gloo (by default it would ignore torchrun's environment on such a machine
    and let every process train alone on the whole data set).

    Raises:
        UserError: fp16 or bf16 asked for on hardware that cannot run it; the launcher's
            processes did not all join; gradient accumulation configured through Accelerate.
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
    launched = launched_processes()
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=launched > 1 and not _has_gpu(),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=DISTRIBUTED_TIMEOUT)],
    )
    if accelerator.num_processes != launched:
        raise UserError(
            f"the launcher started {launched} processes but Accelerate joined {accelerator.num_processes} "
            f"({accelerator.distributed_type}); launch with torchrun or accelerate launch --multi_gpu"
        )
    if accelerator.gradient_accumulation_steps > 1:
        raise UserError(
            f"gradient accumulation ({accelerator.gradient_accumulation_steps} steps, set through Accelerate) "
            "is not supported: for pretrain it changes the objective, since NT-Xent would only see the "
            "negatives of one micro-batch; unset it and reach a large batch with --batch-size (the global "
            "batch) over more processes"
        )
    return accelerator


def on_main_process(accelerator: Accelerator, action: Callable[[], T]) -> T:
    """Runs `action` on the main process only and hands its result, or its error, to every process.

    Without this, an error while the main process writes (an output path that is a file, a full
    disk) would leave the other processes waiting in their next collective. Every process must
    call this at the same point. The result travels with `broadcast_object_list` (pickled, only
    between this job's processes), so it must be a small picklable value such as a Path.

    Raises:
        UserError: `action` raised one (on the main process; the same sentence on the others).
        RuntimeError: on the other processes, when `action` raised any other error (the main
            process raises the original).
    """
    outcome: list[Any] = [None]
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            outcome[0] = ("done", action())
        except Exception as error:
            failure = error
            kind = "user" if isinstance(error, UserError) else "internal"
            outcome[0] = (kind, str(error) if kind == "user" else f"{type(error).__name__}: {error}")
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if failure is not None:
        raise failure
    kind, value = outcome[0]
    if kind == "user":
        raise UserError(value)
    if kind == "internal":
        raise RuntimeError(f"the main process failed: {value}")
    result: T = value
    return result


def shutdown() -> None:
    """Destroys the process group of a multi-process run, if there is one; safe to call always.

    Without it, the gloo/NCCL process group is torn down by the interpreter's exit, where its
    threads may still be running: a finished torchrun job then sometimes dies with
    "terminate called without an active exception" (SIGABRT), and torchrun reports a failure.
    `labelfew.cli.guarded` calls this in a `finally`, on success, user error and interrupt alike.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def seed_augmentations(accelerator: Accelerator, seed: int) -> None:
    """Gives this process its own random stream for the augmentations done without loader workers.

    Call it after the model is built (from the shared seed) and the loader prepared. The data
    order stays shared (the seedable sampler has its own seed); the random crops and colour
    jitter must not: with one stream, image i of process 0 and image i of process 1 would get
    the same crop box and jitter factors at every step.
    """
    set_seed(seed + _PROCESS_SEED_STRIDE * accelerator.process_index)


def worker_seeder(accelerator: Accelerator) -> Callable[[int], None]:
    """`worker_init_fn` for a DataLoader: the augmentation counterpart of `seed_augmentations`.

    PyTorch seeds worker w with base + w, where base comes from the loader's generator and is
    therefore the same on every process; this adds a per-process offset.
    """
    return functools.partial(_seed_worker, offset=_PROCESS_SEED_STRIDE * accelerator.process_index)


def _seed_worker(worker_id: int, offset: int) -> None:
    seed = (torch.initial_seed() + offset) % 2**63
    torch.manual_seed(seed)
    random.seed(seed)


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


class EpochBatches(Protocol):
    """Batches that are not a DataLoader (`labelfew.data.memory.MemoryBatches`): one epoch per
    iteration, chosen by `set_epoch`, which can also start the epoch at a later step."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def set_epoch(self, epoch: int, first_step: int = 0) -> None: ...


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
    loader: DataLoader[Any] | EpochBatches
    step: StepFunction
    epochs: int
    description: str
    quiet: bool = False
    log_file: Path | None = None
    log_every: int = 10
    max_grad_norm: float | None = None
    on_epoch_end: Callable[[int, float], dict[str, float]] | None = None
    checkpoint_dir: Path | None = None
    checkpoint_minutes: float = 10.0
    fingerprint: dict[str, Any] = field(default_factory=dict)
    restart: bool = False
    _bad: set[int] = field(default_factory=set)
    _position: checkpoint.Position = field(default_factory=checkpoint.Position)
    _metrics: list[dict[str, float]] = field(default_factory=list)
    _last_checkpoint: float = 0.0

    def fit(self) -> FitResult:
        main = self.accelerator.is_main_process
        resumed = self._resume()
        position = self._position
        start = time.perf_counter() - position.seconds
        self._last_checkpoint = time.perf_counter()
        log = self.log_file.open("a", encoding="utf-8") if (main and self.log_file) else None
        progress = _progress(self.description, disable=not main or self.quiet)
        try:
            with progress, checkpoint.StopSignals() as signals:
                task = progress.add_task(self.description, total=len(self.loader) * self.epochs,
                                         completed=position.global_step, loss=float("nan"), lr=0.0, rate=0.0)  # fmt: skip
                while position.epoch < self.epochs:
                    self._epoch(position, log, progress, task, start, signals)
        finally:
            if log is not None:
                log.close()
        seconds = time.perf_counter() - start
        bad = sorted({index for part in gather_object([sorted(self._bad)]) for index in part})
        losses = position.epoch_losses
        return FitResult(
            epochs=self.epochs, steps=position.global_step, seconds=seconds,
            views_per_second=position.views / max(seconds, 1e-9), final_loss=losses[-1] if losses else float("nan"),
            epoch_losses=losses, epoch_metrics=self._metrics, bad_indices=bad, resumed_from=resumed,
        )  # fmt: skip

    def _epoch(self, position: checkpoint.Position, log: Any, progress: Progress, task: Any,
               start: float, signals: checkpoint.StopSignals) -> None:  # fmt: skip
        epoch, skip = position.epoch, position.step_in_epoch
        self.model.train()
        loader: Iterable[dict[str, Any]] = self.loader
        if isinstance(self.loader, DataLoader):
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(epoch)
            if hasattr(self.loader.dataset, "set_epoch"):
                self.loader.dataset.set_epoch(epoch)
            if skip:
                loader = self.accelerator.skip_first_batches(self.loader, skip)
        elif hasattr(
            self.loader, "set_epoch"
        ):  # MemoryBatches: starts at `skip` without making earlier batches
            self.loader.set_epoch(epoch, first_step=skip)
        elif skip:  # any other re-iterable of batches
            loader = itertools.islice(self.loader, skip, None)
        running = torch.full((), position.running_loss, device=self.accelerator.device)
        pending: list[tuple[int, torch.Tensor, float]] = []
        for batch in loader:
            loss, batch_views = self._train_step(batch)
            running += loss.detach().float()
            position.step_in_epoch += 1
            position.global_step += 1
            position.views += batch_views * self.accelerator.num_processes
            pending.append((position.global_step, loss.detach(), self.optimizer.param_groups[0]["lr"]))
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
        position.epoch, position.step_in_epoch, position.running_loss = epoch + 1, 0, 0.0
        if self.accelerator.is_main_process and (self.quiet or extra):
            shown = " ".join(f"{key} {value:.4f}" for key, value in extra.items())
            console.print(
                f"{self.description} epoch {epoch + 1}/{self.epochs} loss {epoch_loss:.4f} {shown}".rstrip()
            )
        self._save(start)
        signals.raise_if_received(self._checkpoint_hint())

    def _train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        self._bad.update(batch.pop("bad", []))
        loss, batch_views = self.step(self.model, batch)
        self.accelerator.backward(loss)  # finiteness is checked where losses reach the host (_flush)
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, batch_views

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
        if log is not None:
            for (step, _, lr), value in zip(pending, values, strict=True):
                log.write(json.dumps({"epoch": epoch + 1, "step": step, "loss": value, "lr": lr}) + "\n")
            log.flush()

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
                                 self.scheduler, self._position, self.fingerprint, self._metrics)  # fmt: skip
        self._last_checkpoint = time.perf_counter()

    def _resume(self) -> str | None:
        if self.checkpoint_dir is None:
            return None
        if self.restart:
            if self.accelerator.is_main_process:
                checkpoint.remove_all(self.checkpoint_dir)
            self.accelerator.wait_for_everyone()
            return None
        restored = checkpoint.restore_training(self.accelerator, self.checkpoint_dir, self.model, self.optimizer,
                                               self.scheduler, self.fingerprint)  # fmt: skip
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


def describe_device(accelerator: Accelerator) -> str:
    """e.g. 'cuda (NVIDIA H100) × 8 processes, bf16' or 'cpu × 1 process, no'."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    processes = accelerator.num_processes
    plural = "process" if processes == 1 else "processes"
    label = f"{device.type} ({name})" if name else device.type
    return f"{label} × {processes} {plural}, precision {accelerator.mixed_precision}"
