"""Which BatchNorm a run uses across processes: SyncBatchNorm (the global batch's statistics) or each
process its own.

SimCLR normalises over the global batch (Chen et al. 2020, arXiv 2002.05709, section 3): with
per-process statistics a model can tell a positive pair apart by its local batch's statistics.
PyTorch's SyncBatchNorm runs on CUDA only.
"""

from __future__ import annotations

from typing import Any

from labelfew.errors import UserError


def use_sync_batchnorm(requested: bool | None, accelerator: Any) -> bool:
    """Whether to convert BatchNorm to SyncBatchNorm (statistics over the global batch).

    Automatic (`requested` None): on CUDA GPUs with more than one process, so that BN sees the
    global batch as in the paper. Forcing it on with one process runs the SyncBatchNorm code path on
    one GPU.

    Raises:
        UserError: forced on where PyTorch's SyncBatchNorm cannot run (anything but CUDA).
    """
    on_gpu = accelerator.device.type == "cuda"
    if requested is None:
        return on_gpu and accelerator.num_processes > 1
    if requested and not on_gpu:
        raise UserError(
            f"--sync-bn: PyTorch's SyncBatchNorm runs on CUDA GPUs only and this run is on "
            f"{accelerator.device.type}; drop --sync-bn (each process then normalises its own batch)"
        )
    return requested


def batchnorm_description(sync_bn: bool, accelerator: Any) -> str:
    """Which BatchNorm the run uses, for the summary line and run.json."""
    if sync_bn:
        return "SyncBatchNorm"
    if accelerator.num_processes == 1:
        return "BatchNorm"
    if accelerator.device.type == "cuda":
        return "per-process BatchNorm (--no-sync-bn)"
    return "per-process BatchNorm (SyncBatchNorm is GPU-only)"
