"""SimCLR pretraining: unlabeled folder -> backbone.safetensors + head.safetensors + run.json.

SimCLR: Chen et al. 2020, arXiv 2002.05709; the v2 head and fine-tuning: arXiv 2006.10029.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader

from labelfew import engine
from labelfew.artifacts import save_tensors, write_run_json
from labelfew.config import PretrainConfig, to_json
from labelfew.data.images import ImageDataset, collate, find_images, typical_image_side
from labelfew.data.store import MemoryBatches, decode_images, fits_in_memory, store_device, stored_side
from labelfew.errors import UserError
from labelfew.fileio import prepare_folder
from labelfew.losses import nt_xent_loss
from labelfew.models import SMALL_IMAGE_SIDE, ProjectionHead, SimCLRModel, build_backbone
from labelfew.optim import build_optimizer, parameter_groups, scaled_learning_rate, warmup_cosine
from labelfew.views.batched import BatchedTwoViews
from labelfew.views.pil import TwoViews, ViewConfig

AUGMENT_PLACES = ("auto", "device", "workers")


def resolve(config: PretrainConfig, paths: list[Path]) -> PretrainConfig:
    """Fills the automatic values (image size, stem, colour strength, blur, warmup, output)."""
    image_size = config.image_size or typical_image_side(paths)
    small = image_size <= SMALL_IMAGE_SIDE
    warmup = config.warmup_epochs
    if warmup is None:
        warmup = min(10.0, config.epochs / 10)
    out = config.out or Path("runs") / config.data.resolve().name
    return _replace(
        config,
        augment_on=augment_place(config.augment_on, config.memory_budget, len(paths), image_size),
        image_size=image_size,
        small_stem=small if config.small_stem is None else config.small_stem,
        color_strength=(0.5 if small else 1.0) if config.color_strength is None else config.color_strength,
        blur=image_size > 32 if config.blur is None else config.blur,
        warmup_epochs=warmup,
        out=out,
    )


def augment_place(requested: str, budget_gib: float, image_count: int, image_size: int) -> str:
    """Where the views are made: ``device`` or ``workers`` (``auto`` resolved).

    ``device``: every image decoded once into memory (`labelfew.data.store`) and both views of
    a batch made on the training device in a few tensor operations (`labelfew.views.batched`);
    the data path then costs the GPU ~1% and the CPU nothing. ``workers``: one PIL image at a
    time in DataLoader workers (`labelfew.views.pil`), for folders too large to decode into memory.
    ``auto`` picks ``device`` when the decoded images fit in ``budget_gib``.
    """
    if requested not in AUGMENT_PLACES:
        raise UserError(f"--augment-on {requested}: use one of {', '.join(AUGMENT_PLACES)}")
    if budget_gib <= 0:
        raise UserError(f"--memory-budget {budget_gib}: give a positive size in GiB (default 4)")
    if requested != "auto":
        return requested
    fits = fits_in_memory(image_count, stored_side(image_size), int(budget_gib * 2**30))
    return "device" if fits else "workers"


def _replace(config: PretrainConfig, **changes: Any) -> PretrainConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def _check(config: PretrainConfig, image_count: int) -> None:
    if config.epochs < 1:
        raise UserError(f"--epochs {config.epochs}: use at least 1")
    if config.temperature <= 0:
        raise UserError(f"--temperature {config.temperature}: use a positive value (0.1 to 0.5)")
    if config.batch_size > image_count:
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the {image_count} images in {config.data}; "
            f"use at most {image_count}"
        )
    if config.batch_size < 2:
        raise UserError(f"--batch-size {config.batch_size}: a contrastive batch needs at least 2 images")


def build_model(config: PretrainConfig) -> SimCLRModel:
    """Backbone + projection head for a resolved config."""
    backbone = build_backbone(config.arch, small_stem=bool(config.small_stem), image_size=config.image_size)
    width = int(backbone.num_features)  # type: ignore[arg-type]
    head = ProjectionHead(
        width,
        config.projection_hidden or width,
        output_dim=config.projection_dim,
        depth=config.projection_depth,
    )
    return SimCLRModel(backbone, head)


def contrastive_step(temperature: float, channels_last: bool) -> engine.StepFunction:
    """One SimCLR step: both views in one forward pass (so BN sees all 2N views), then NT-Xent.

    NT-Xent runs in float32 under mixed precision (`nt_xent_loss` upcasts half-precision
    projections) and in float64 for a float64 model, which the multi-process parity test uses.
    """

    def step(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        first, second = batch["images"]
        images = torch.cat([first, second])
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        projections = model(images)
        z1, z2 = projections.chunk(2)
        return nt_xent_loss(z1, z2, temperature), images.shape[0]

    return step


def use_sync_batchnorm(requested: bool | None, accelerator: Any) -> bool:
    """Whether to convert BatchNorm to SyncBatchNorm (statistics over the global batch).

    Automatic (`requested` None): on CUDA GPUs with more than one process, so that BN sees the
    global batch as in the paper (and cannot use it to tell a positive pair apart by its local
    statistics). Forcing it on with one process runs the SyncBatchNorm code path on one GPU.

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


def fingerprint(config: PretrainConfig, paths: list[Path]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint.

    Everything that changes the model or its training (arch, batch, schedule, augmentations, the
    data's file list) — but not where output goes, how often it checkpoints, or how it prints.
    """
    ignored = {"out", "quiet", "workers", "checkpoint_every", "restart", "max_bad_fraction", "data",
               "memory_budget", "compile"}  # fmt: skip
    values = {key: value for key, value in to_json(config).items() if key not in ignored}
    listing = hashlib.sha256("\n".join(str(path.relative_to(config.data)) for path in paths).encode())
    return {**values, "images": len(paths), "image_list_sha256": listing.hexdigest()[:16]}


def _prepare_output(config: PretrainConfig) -> Path:
    """Creates `<out>/pretrain` and clears an old log; main process only."""
    assert config.out is not None
    stage = config.out / "pretrain"
    if stage.exists() and not stage.is_dir():
        raise UserError(f"{stage} is a file; pass --out a folder for the run")
    prepare_folder(stage)  # fails now, not at the first checkpoint, if nothing can be written there
    if config.restart:
        (stage / "log.jsonl").unlink(missing_ok=True)
    return config.out


def run(config: PretrainConfig) -> Path:
    """Pretrains and writes the artifact; returns the path of backbone.safetensors.

    Every process runs this; the checks below depend only on the config and the image folder,
    so they fail the same way on every process, before the first collective.
    """
    accelerator = engine.make_accelerator(config.precision, seed=config.seed)
    set_seed(config.seed)
    paths = find_images(config.data)
    if not paths:
        raise UserError(
            f"{config.data}: no image files (jpg, png, webp, bmp, tif, gif) found, searched recursively"
        )
    config = resolve(config, paths)
    _check(config, len(paths))
    assert config.out is not None and config.image_size is not None
    per_process = engine.per_process_batch(config.batch_size, accelerator)
    sync_bn = use_sync_batchnorm(config.sync_bn, accelerator)
    # The default run folder has a timestamp: use the main process's, on every process.
    config = _replace(config, out=engine.on_main_process(accelerator, lambda: _prepare_output(config)))
    assert config.out is not None and config.image_size is not None
    loader, undecodable = build_batches(config, paths, accelerator, per_process)
    _check_bad(config, undecodable, len(paths))  # known before training on the device path
    model = build_model(config)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = accelerator.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = _learning_rate(config)
    optimizer = build_optimizer(config.optimizer, parameter_groups(model, config.weight_decay), lr=lr)  # type: ignore[arg-type]
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.compile:
        model.compile()  # in place: the state_dict keys (checkpoints, artifacts) stay the same
    engine.seed_augmentations(accelerator, config.seed)
    steps_per_epoch = len(loader)
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=round(float(config.warmup_epochs or 0) * steps_per_epoch),
        total_steps=steps_per_epoch * config.epochs,
    )
    if accelerator.is_main_process:
        _announce(config, len(paths), lr, accelerator, batchnorm_description(sync_bn, accelerator))
    trainer = engine.Trainer(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        step=contrastive_step(config.temperature, channels_last),
        epochs=config.epochs,
        description="pretrain",
        quiet=config.quiet,
        log_file=config.out / "pretrain" / "log.jsonl",
        checkpoint_dir=config.out / "pretrain" / "checkpoints",
        checkpoint_minutes=config.checkpoint_every,
        fingerprint=fingerprint(config, paths),
        restart=config.restart,
    )
    result = trainer.fit()
    bad = undecodable + [str(paths[index]) for index in result.bad_indices]
    _check_bad(config, bad, len(paths))
    artifact = config.out / "pretrain" / "backbone.safetensors"
    batchnorm = batchnorm_description(sync_bn, accelerator)
    unwrapped = accelerator.unwrap_model(model)
    engine.on_main_process(
        accelerator,
        lambda: _save(config, unwrapped, artifact, result, len(paths), bad, lr, accelerator, batchnorm),
    )
    return artifact


def view_config(config: PretrainConfig) -> ViewConfig:
    """The view parameters of a resolved config."""
    assert config.image_size is not None
    return ViewConfig(
        image_size=config.image_size,
        min_scale=config.min_scale,
        color_strength=float(config.color_strength or 1.0),
        blur=config.blur,
    )


def build_batches(
    config: PretrainConfig, paths: list[Path], accelerator: Any, per_process: int
) -> tuple[DataLoader[Any] | MemoryBatches, list[str]]:
    """This process's training batches, and the files found undecodable before training.

    ``device`` (see `augment_place`): the images are decoded once (threads, a progress bar) and
    kept on the GPU when they take at most a quarter of its free memory, else in host memory;
    every process holds them all and takes its share of each global batch. The views of a batch
    are drawn from a generator seeded by (seed, epoch, step, process) — per step, not per image
    as on the ``workers`` path, so the two paths make different (equally distributed) views for
    the same seed. ``workers``: a DataLoader, sharded by Accelerate.
    """
    assert config.image_size is not None
    view = view_config(config)
    if config.augment_on == "device":
        store = decode_images(
            paths,
            stored_side(config.image_size),
            budget=int(config.memory_budget * 2**30),
            on_progress=_decode_progress(accelerator.is_main_process and not config.quiet),
        )
        images = store.images.to(store_device(store.nbytes, accelerator.device))
        batches = MemoryBatches(
            images,
            per_process,
            transform=BatchedTwoViews(view),
            device=accelerator.device,
            seed=config.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        kept = set(store.paths)
        return batches, [str(path) for path in paths if path not in kept]
    workers = engine.default_workers(config.workers)
    loader = DataLoader(
        ImageDataset(paths, TwoViews.from_config(view), seed=config.seed),
        batch_size=per_process,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
        worker_init_fn=engine.worker_seeder(accelerator),
    )
    return accelerator.prepare(loader), []


def _decode_progress(show: bool) -> Callable[[int, int], None] | None:
    """A progress callback for `decode_images` that prints a bar on the main process."""
    if not show:
        return None
    progress = Progress(
        TextColumn("[bold]decode"), BarColumn(), TextColumn("{task.completed}/{task.total} images"),
        TimeElapsedColumn(), console=engine.console, transient=True,
    )  # fmt: skip
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("decode", total=total)
        progress.update(task, completed=done)
        if done >= total:
            progress.stop()

    return update


def _check_bad(config: PretrainConfig, bad: list[str], image_count: int) -> None:
    if len(bad) > config.max_bad_fraction * image_count:
        raise UserError(
            f"{len(bad)} of {image_count} images could not be decoded (more than --max-bad-fraction "
            f"{config.max_bad_fraction}); e.g. {bad[0]}. Fix or remove them."
        )


def _learning_rate(config: PretrainConfig) -> float:
    if config.optimizer == "lars":
        return scaled_learning_rate(config.base_lr, config.batch_size, config.lr_rule)  # type: ignore[arg-type]
    if config.base_lr is None:
        return {"sgd": 0.05 * config.batch_size / 256, "adamw": 1e-3}.get(config.optimizer, 0.1)
    return config.base_lr


def _announce(config: PretrainConfig, image_count: int, lr: float, accelerator: Any, bn: str) -> None:
    if config.quiet:
        return
    processes = accelerator.num_processes
    split = f" ({config.batch_size // processes} per process)" if processes > 1 else ""
    engine.console.print(
        f"[bold]pretrain[/] {image_count} images from {config.data} at {config.image_size} px, "
        f"{config.arch}{' (small-image stem)' if config.small_stem else ''}, batch {config.batch_size}{split}, "
        f"{config.epochs} epochs, {config.optimizer} lr {lr:.3g}, T {config.temperature}, "
        f"views on the {'training device, batched' if config.augment_on == 'device' else 'CPU, per image'}, "
        f"on {engine.describe_device(accelerator)}, {bn}{', compiled' if config.compile else ''}"
    )


def _save(
    config: PretrainConfig,
    model: Any,
    artifact: Path,
    result: engine.FitResult,
    image_count: int,
    bad: list[str],
    lr: float,
    accelerator: Any,
    batchnorm: str,
) -> None:
    resolved = to_json(config)
    metadata = {
        "stage": "pretrain",
        "arch": config.arch,
        "num_features": str(model.backbone.num_features),
        "image_size": str(config.image_size),
        "small_stem": json.dumps(bool(config.small_stem)),
        "mean": json.dumps(list(ViewConfig(image_size=8).mean)),
        "std": json.dumps(list(ViewConfig(image_size=8).std)),
        "config": json.dumps(resolved),
    }
    backbone_hash = save_tensors(artifact, model.backbone.state_dict(), metadata)
    head_metadata = {
        **metadata,
        "part": "head",
        "projection_depth": str(config.projection_depth),
        "projection_hidden": str(config.projection_hidden or model.backbone.num_features),
        "projection_dim": str(config.projection_dim),
    }
    head_hash = save_tensors(artifact.parent / "head.safetensors", model.head.state_dict(), head_metadata)
    write_run_json(
        artifact.parent,
        {
            "stage": "pretrain",
            "config": resolved,
            "artifacts": {
                "backbone.safetensors": {"sha256": backbone_hash},
                "head.safetensors": {"sha256": head_hash},
            },
            "data": {"images": image_count, "skipped": len(bad), "skipped_files": bad},
            "metrics": {
                "final_loss": result.final_loss,
                "epoch_losses": result.epoch_losses,
                "views_per_second": result.views_per_second,
                "lr": lr,
            },
            "wall_seconds": result.seconds,
            "steps": result.steps,
            "device": engine.describe_device(accelerator),
            "distributed": {
                "processes": accelerator.num_processes,
                "per_process_batch": config.batch_size // accelerator.num_processes,
                "batchnorm": batchnorm,
            },
        },
    )
    if not config.quiet:
        skipped = f"; skipped {len(bad)} undecodable file(s): {', '.join(bad[:3])}" if bad else ""
        engine.console.print(
            f"[green]pretrain done[/] in {result.seconds:.0f} s, final loss {result.final_loss:.4f} "
            f"(chance {math.log(2 * config.batch_size - 1):.2f}), {result.views_per_second:.0f} views/s{skipped}\n"
            f"  artifact: {artifact}"
        )
