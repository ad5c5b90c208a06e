"""The training engine every stage shares: the Accelerator, the one loop, checkpoints, stop signals."""

from labelfew.data.batches import EpochBatches
from labelfew.engine.accelerator import (
    DISTRIBUTED_TIMEOUT,
    console,
    default_workers,
    describe_device,
    launched_processes,
    make_accelerator,
    native_cpu_bf16,
    on_main_process,
    per_process_batch,
    seed_augmentations,
    shutdown,
    worker_seeder,
)
from labelfew.engine.trainer import FitResult, StepFunction, Trainer

__all__ = [
    "DISTRIBUTED_TIMEOUT",
    "EpochBatches",
    "FitResult",
    "StepFunction",
    "Trainer",
    "console",
    "default_workers",
    "describe_device",
    "launched_processes",
    "make_accelerator",
    "native_cpu_bf16",
    "on_main_process",
    "per_process_batch",
    "seed_augmentations",
    "shutdown",
    "worker_seeder",
]
