"""SimCLR pretraining: unlabeled folder -> backbone.safetensors + head.safetensors + run.json.

SimCLR: Chen et al. 2020, arXiv 2002.05709; the v2 head and fine-tuning: arXiv 2006.10029.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate.utils import set_seed
from torch import nn

from labelfew import engine
from labelfew.artifacts import StageInfo, register_stage, save_tensors, write_run_json
from labelfew.config import PretrainConfig, to_json
from labelfew.data import sources
from labelfew.data.batches import Batch, EpochBatches, EpochOrder
from labelfew.data.images import printable, require_images, skipped_note, typical_image_side
from labelfew.engine import estimate
from labelfew.engine.loggers import check_loggers, open_loggers
from labelfew.errors import UserError
from labelfew.fileio import default_run_folder, prepare_stage_folder
from labelfew.losses import nt_xent_loss
from labelfew.models import ProjectionHead, SimCLRModel, build_backbone
from labelfew.optim import build_optimizer, parameter_groups, scaled_learning_rate, warmup_cosine
from labelfew.report.views_figure import write_views_figure
from labelfew.spec import SMALL_IMAGE_SIDE, HeadSpec, ModelSpec, uses_small_stem
from labelfew.views.config import ViewConfig
from labelfew.views.simclr import PairViews, SimCLRViews

STAGE = register_stage(
    StageInfo(
        "pretrain",
        file="backbone.safetensors",
        folder="pretrain",
        kind="backbone",
        label=lambda _: "pretrain",
    )
)


LISTED_FILES = 100_000
"""Folders up to this many images keep their file list in every checkpoint (a few MB of JSON)."""

DEFAULT_BATCH = 256
"""The batch without `--batch-size` (or a recipe's): suits a few thousand images on one GPU; a
smaller folder trains on all its images per step (rounded down to a multiple of the processes)."""


def run_folder(config: PretrainConfig) -> Path:
    """`--out`, or `runs/<folder name>-<hash of its path>` (`fileio.default_run_folder`): known before
    the images are listed, so that its own `pretrain/` folder (views.png) is never an input image,
    even for `pretrain .`."""
    return config.out or default_run_folder(config.data)


def resolve(config: PretrainConfig, paths: list[Path], processes: int = 1) -> PretrainConfig:
    """Fills the automatic values (batch, image size, stem, colour strength, blur, warmup, output).

    Raises:
        UserError: no batch was given and the folder holds fewer images than a contrastive batch needs.
    """
    image_size = typical_image_side(paths) if config.image_size is None else config.image_size
    batch = config.batch_size or _automatic_batch(config, len(paths), processes)  # given: at least 2
    small = uses_small_stem(image_size)
    warmup = config.warmup_epochs
    if warmup is None:
        warmup = min(10.0, config.epochs / 10)
    out = run_folder(config)
    return _replace(
        config,
        augment_on=sources.augment_place(config.augment_on, config.memory_budget, paths, image_size),
        image_size=image_size,
        small_stem=small if config.small_stem is None else config.small_stem,
        color_strength=(0.5 if small else 1.0) if config.color_strength is None else config.color_strength,
        blur=image_size > 32 if config.blur is None else config.blur,
        warmup_epochs=warmup,
        out=out,
        batch_size=batch,
    )


def _automatic_batch(config: PretrainConfig, image_count: int, processes: int) -> int:
    """`DEFAULT_BATCH`, or every image of a smaller folder (a multiple of the processes)."""
    batch = min(DEFAULT_BATCH, image_count // processes * processes)
    if batch < max(2, processes):
        raise UserError(
            f"{config.data}: {image_count} image(s); contrastive pretraining needs at least "
            f"{max(2, processes)} (two per batch, one per process); add images"
        )
    return batch


def _replace(config: PretrainConfig, **changes: Any) -> PretrainConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def _check(config: PretrainConfig, image_count: int) -> None:
    """What depends on the data or on two settings; the config checked each value when it was made."""
    if config.warmup_epochs is not None and config.warmup_epochs >= config.epochs:
        raise UserError(
            f"--warmup-epochs {config.warmup_epochs:g} is not shorter than --epochs {config.epochs} (a recipe "
            f"may set it); pass --warmup-epochs {config.epochs / 10:g} (10% of the run) or more --epochs"
        )
    if not timm.is_model(config.arch):
        build_backbone(config.arch, small_stem=False)  # raises the UserError with close names
    assert config.batch_size is not None  # resolved
    if config.batch_size > image_count:
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the {image_count} images in {config.data}; "
            f"use at most {image_count}"
        )


def build_model(config: PretrainConfig) -> SimCLRModel:
    """Backbone + projection head for a resolved config."""
    backbone = build_backbone(config.arch, small_stem=bool(config.small_stem), image_size=config.image_size)
    width = int(backbone.num_features)  # type: ignore[arg-type]
    head = ProjectionHead(
        width,
        width if config.projection_hidden is None else config.projection_hidden,
        output_dim=config.projection_dim,
        depth=config.projection_depth,
    )
    return SimCLRModel(backbone, head)


def contrastive_step(temperature: float, channels_last: bool, views: PairViews) -> engine.StepFunction:
    """One SimCLR step: two views of every image made on the device (``views``, usually
    `labelfew.views.simclr.SimCLRViews`, drawing from the batch's seeded generator), both in one
    forward pass (so BN sees all 2N views), then NT-Xent.

    NT-Xent runs in float32 under mixed precision (`nt_xent_loss` upcasts half-precision
    projections) and in float64 for a float64 model, which the multi-process parity test uses.
    """

    def step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        first, second = views(batch.images, batch.sizes, batch.generator())
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
    ignored = {"out", "quiet", "workers", "checkpoint_every", "restart", "max_bad_fraction", "data", "logger",
               "memory_budget", "compile", "follow_links"}  # fmt: skip
    values = {key: value for key, value in to_json(config).items() if key not in ignored}
    names = [str(path.relative_to(config.data)) for path in paths]
    listing = hashlib.sha256(os.fsencode("\n".join(names)))
    # the list itself names the files that appeared or vanished when a resume is refused
    kept = {"_image_list_sha256": names} if len(names) <= LISTED_FILES else {}
    return {**values, "images": len(paths), "image_list_sha256": listing.hexdigest()[:16], **kept}


def _prepare_output(config: PretrainConfig) -> Path:
    """Creates and locks `<out>/pretrain`, records its data, and clears an old log; main process only."""
    assert config.out is not None
    stage = config.out / "pretrain"
    if stage.exists() and not stage.is_dir():
        raise UserError(f"{stage} is a file; pass --out a folder for the run")
    prepare_stage_folder(stage, config.restart, source=config.data)
    return config.out


def run(config: PretrainConfig) -> Path:
    """Pretrains and writes the artifact; returns the path of backbone.safetensors.

    Every process runs this; the checks below depend only on the config and the image folder,
    so they fail the same way on every process, before the first collective.
    """
    check_loggers(config.logger)  # a missing extra fails now, not after decoding the folder
    accelerator = engine.make_accelerator(config.precision, seed=config.seed)
    set_seed(config.seed)
    own = run_folder(config) / "pretrain"  # `pretrain .` must not train on its own views.png
    found = require_images(config.data, follow_links=config.follow_links, exclude=[own])
    paths = found.paths
    automatic_batch = config.batch_size is None
    config = resolve(config, paths, accelerator.num_processes)
    _check(config, len(paths))
    assert config.out is not None and config.image_size is not None and config.batch_size is not None
    batch_note = _batch_note(config, len(paths)) if automatic_batch else None
    per_process = engine.per_process_batch(config.batch_size, accelerator)
    sync_bn = use_sync_batchnorm(config.sync_bn, accelerator)
    # The default run folder has a timestamp: use the main process's, on every process.
    config = _replace(config, out=engine.on_main_process(accelerator, lambda: _prepare_output(config)))
    assert config.out is not None and config.image_size is not None
    loader, undecodable = build_batches(config, paths, accelerator, per_process)
    _check_bad(config, undecodable, len(paths))  # known before training on the device path
    model, optimizer, lr = _prepare_model(config, sync_bn, accelerator)
    channels_last = accelerator.device.type == "cuda"
    engine.seed_augmentations(accelerator, config.seed)
    steps_per_epoch = len(loader)
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=round(float(config.warmup_epochs or 0) * steps_per_epoch),
        total_steps=steps_per_epoch * config.epochs,
    )
    views = SimCLRViews(view_config(config))
    run_loggers = None
    if accelerator.is_main_process:
        _announce(
            config, len(paths), lr, accelerator, batchnorm_description(sync_bn, accelerator), batch_note
        )
        run_loggers = open_loggers(config.logger, config.out / "pretrain", to_json(config))
        write_views_figure(loader, views, config.out / "pretrain" / "views.png", run_loggers)
    trainer = engine.Trainer(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        step=contrastive_step(config.temperature, channels_last, views),
        epochs=config.epochs,
        description="pretrain",
        quiet=config.quiet,
        log_file=config.out / "pretrain" / "log.jsonl",
        checkpoint_dir=config.out / "pretrain" / "checkpoints",
        checkpoint_minutes=config.checkpoint_every,
        fingerprint=fingerprint(config, paths),
        on_first_steps=None if config.quiet else _estimate_printer(config, steps_per_epoch, accelerator),
        restart=config.restart,
        loggers=run_loggers,
    )
    result = trainer.fit()
    bad = undecodable + [printable(paths[index]) for index in result.bad_indices]
    _check_bad(config, bad, len(paths))
    artifact = config.out / "pretrain" / "backbone.safetensors"
    batchnorm = batchnorm_description(sync_bn, accelerator)
    unwrapped = accelerator.unwrap_model(model)
    engine.on_main_process(
        accelerator,
        lambda: _save(
            config,
            unwrapped,
            artifact,
            result,
            len(paths),
            found.skipped + bad,
            lr,
            accelerator,
            batchnorm,
            batch_note,
        ),
    )
    return artifact


def _prepare_model(config: PretrainConfig, sync_bn: bool, accelerator: Any) -> tuple[nn.Module, Any, float]:
    """The encoder + projection head (sync-BN across processes, channels-last on a GPU, compiled on
    request) and its optimizer at the resolved lr, both prepared by Accelerate."""
    model = build_model(config)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    lr = _learning_rate(config)
    optimizer = build_optimizer(config.optimizer, parameter_groups(model, config.weight_decay), lr=lr)  # type: ignore[arg-type]
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.compile:
        model.compile()  # in place: the state_dict keys (checkpoints, artifacts) stay the same
    return model, optimizer, lr


def _estimate_printer(
    config: PretrainConfig, steps_per_epoch: int, accelerator: Any
) -> Callable[[float, int], None]:
    """Prints the time left after the first steps; on a CPU, over an hour, what would fit one."""
    assert config.image_size is not None
    return estimate.first_steps_printer(
        config.arch, config.image_size, bool(config.small_stem), config.epochs, steps_per_epoch,
        on_cpu=accelerator.device.type == "cpu", small_side=SMALL_IMAGE_SIDE,
    )  # fmt: skip


def view_config(config: PretrainConfig) -> ViewConfig:
    """The view parameters of a resolved config."""
    assert config.image_size is not None and config.color_strength is not None  # set by `resolve`
    return ViewConfig(
        image_size=config.image_size,
        min_scale=config.min_scale,
        color_strength=float(config.color_strength),  # 0 is a valid strength: no colour distortion
        blur=config.blur,
    )


def build_batches(
    config: PretrainConfig, paths: list[Path], accelerator: Any, per_process: int
) -> tuple[EpochBatches, list[str]]:
    """This process's uint8 training batches from the image source ``config.augment_on`` names
    (`labelfew.data.sources`), and the files found undecodable before training."""
    assert config.image_size is not None
    order = EpochOrder(
        len(paths), per_process, config.seed, accelerator.process_index, accelerator.num_processes
    )
    show = accelerator.is_main_process and not config.quiet
    return sources.training_batches(
        paths, config.augment_on, config.image_size, order, accelerator, config.memory_budget,
        workers=engine.default_workers(config.workers),
        on_progress=sources.decode_progress(engine.console) if show else None,
    )  # fmt: skip


def _batch_note(config: PretrainConfig, image_count: int) -> str | None:
    """The line that says the default batch was lowered to fit a small folder (None: it was not)."""
    if config.batch_size == DEFAULT_BATCH:
        return None
    return (
        f"batch {config.batch_size}: the default {DEFAULT_BATCH} is more than the {image_count} images in "
        f"{config.data}, so each step takes all of them (pass --batch-size to choose)"
    )


def _check_bad(config: PretrainConfig, bad: list[str], image_count: int) -> None:
    if len(bad) > config.max_bad_fraction * image_count:
        raise UserError(
            f"{len(bad)} of {image_count} images could not be decoded (more than --max-bad-fraction "
            f"{config.max_bad_fraction}); e.g. {bad[0]}. Fix or remove them."
        )


def _learning_rate(config: PretrainConfig) -> float:
    assert config.batch_size is not None  # resolved
    if config.optimizer == "lars":
        return scaled_learning_rate(config.base_lr, config.batch_size, config.lr_rule)  # type: ignore[arg-type]
    if config.base_lr is None:
        return {"sgd": 0.05 * config.batch_size / 256, "adamw": 1e-3}.get(config.optimizer, 0.1)
    return config.base_lr


def _announce(
    config: PretrainConfig, image_count: int, lr: float, accelerator: Any, bn: str, batch_note: str | None
) -> None:
    if config.quiet:
        return
    if batch_note:
        engine.console.print(batch_note)
    processes = accelerator.num_processes
    split = f" ({config.batch_size // processes} per process)" if processes > 1 else ""
    engine.console.print(
        f"[bold]pretrain[/] {image_count} images from {config.data} at {config.image_size} px, "
        f"{config.arch}{' (small-image stem)' if config.small_stem else ''}, batch {config.batch_size}{split}, "
        f"{config.epochs} epochs, {config.optimizer} lr {lr:.3g}, T {config.temperature}, "
        f"views on the training device from {'decoded images in memory' if config.augment_on == 'device' else 'decoding workers'}, "
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
    batch_note: str | None,
) -> None:
    resolved = to_json(config)
    assert config.image_size is not None and config.batch_size is not None
    width = int(model.backbone.num_features)
    spec = ModelSpec(config.arch, config.image_size, bool(config.small_stem), num_features=width)
    metadata = {"stage": "pretrain", **spec.to_metadata(), "config": json.dumps(resolved)}
    backbone_hash = save_tensors(artifact, model.backbone.state_dict(), metadata)
    hidden = width if config.projection_hidden is None else config.projection_hidden
    head = HeadSpec(config.projection_depth, hidden, config.projection_dim)
    head_metadata = {**metadata, "part": "head", **dataclasses.replace(spec, head=head).to_metadata()}
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
            **({"automatic_batch": batch_note} if batch_note else {}),
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
        skipped = skipped_note(bad)
        engine.console.print(
            f"[green]pretrain done[/] in {result.seconds:.0f} s, final loss {result.final_loss:.4f} "
            f"(chance {math.log(2 * config.batch_size - 1):.2f}), {result.views_per_second:.0f} views/s{skipped}\n"
            f"  artifact: {artifact}"
        )
