"""The Accelerator of a run and what every process shares: device, seeds, batch split, main-process writes.

Accelerate places the model and data (CPU, one GPU, many GPUs, many nodes; `accelerate launch`
or `torchrun`), handles mixed precision and shards the data loader across processes: every
process takes its own part of one seeded permutation per epoch, so K processes with batch N see
the same global batches as one process with batch K × N. Only the main process prints and
writes files; what it does alone goes through `on_main_process`, so that its errors reach every
process instead of leaving the others waiting.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, broadcast_object_list, set_seed
from rich.console import Console

from labelfew.errors import UserError

console = Console(stderr=True)

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


def native_cpu_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast makes
    convolutions faster; elsewhere oneDNN emulates it, slower than float32."""
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def make_accelerator(precision: str, seed: int, cpu_bf16: bool = False) -> Accelerator:
    """An Accelerator for this process, with `precision` resolved and the data order seeded.

    auto precision is bf16 on GPUs that support it and, with `cpu_bf16` (pretraining, whose CPU
    step was measured so: benchmarks/RESULTS.md), on CPUs with native bf16 instructions; else no.
    The data loaders it prepares use Accelerate's seedable sampler: epoch e's order is a function
    of (`seed`, e) alone, identical on every process (each takes its own part) and after a resume. On a machine without a GPU
    that was launched with several processes, Accelerate is told to use the CPU: it then joins
    the processes with gloo (by default it would ignore torchrun's environment on such a machine
    and let every process train alone on the whole data set).

    Raises:
        UserError: fp16 or bf16 asked for on hardware that cannot run it; the launcher's
            processes did not all join; gradient accumulation configured through Accelerate.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        gpu_bf16 = cuda and torch.cuda.is_bf16_supported()
        precision = "bf16" if gpu_bf16 or (cpu_bf16 and not _has_gpu() and native_cpu_bf16()) else "no"
    if precision not in ("no", "bf16", "fp16"):
        raise UserError(f"--precision {precision}: use bf16, fp16, no or auto")
    if precision == "fp16" and not cuda:
        raise UserError("--precision fp16 needs a CUDA GPU; on the CPU use --precision bf16 or no")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bfloat16 support; use --precision fp16 or no")
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # one process running stages of different precision (a script, the benchmarks, the tests):
        # Accelerate keeps one precision per process; the process group (PartialState) stays
        AcceleratorState._reset_state()
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


def describe_device(accelerator: Accelerator) -> str:
    """e.g. 'cuda (NVIDIA H100) × 8 processes, bf16' or 'cpu × 1 process, no'."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    processes = accelerator.num_processes
    plural = "process" if processes == 1 else "processes"
    label = f"{device.type} ({name})" if name else device.type
    return f"{label} × {processes} {plural}, precision {accelerator.mixed_precision}"
