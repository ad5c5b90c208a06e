"""SimCLR pretraining: unlabeled folder -> backbone.safetensors + head.safetensors + run.json.

The stage's own: the model, the contrastive step and the run around the one training loop. What
the config leaves automatic, the learning rate, the resume fingerprint and the run.json record are
resolved one layer down, in `labelfew.engine.simclr`; `--init`'s weights come from
`labelfew.engine.start`.

SimCLR: Chen et al. 2020, arXiv 2002.05709; the v2 head and fine-tuning: arXiv 2006.10029.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn

from labelfew import engine
from labelfew.artifacts import save_tensors, write_run_json
from labelfew.config import PretrainConfig, to_json
from labelfew.data import sources
from labelfew.data.batches import Batch, EpochBatches, EpochOrder
from labelfew.data.images import printable, require_images, skipped_note
from labelfew.engine import estimate, simclr
from labelfew.engine.batchnorm import batchnorm_description, use_sync_batchnorm
from labelfew.engine.key_queue import KeyQueue
from labelfew.engine.loggers import check_loggers, open_loggers
from labelfew.engine.start import DEFAULT_ARCH, Start
from labelfew.errors import UserError
from labelfew.fileio import prepare_stage_folder
from labelfew.losses import nt_xent_loss
from labelfew.models import ProjectionHead, SimCLRModel, build_backbone
from labelfew.optim import build_optimizer, parameter_groups, warmup_cosine
from labelfew.registry import StageInfo, register_stage
from labelfew.report.views_figure import write_views_figure
from labelfew.spec import SMALL_IMAGE_SIDE, Decoding, HeadSpec
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


def build_model(config: PretrainConfig, channels: int = 3) -> SimCLRModel:
    """Backbone (of ``channels`` input channels) + projection head for a resolved config."""
    assert config.arch is not None  # resolved
    backbone = build_backbone(
        config.arch, small_stem=bool(config.small_stem), image_size=config.image_size, channels=channels
    )
    width = int(backbone.num_features)  # type: ignore[arg-type]
    head = ProjectionHead(
        width,
        width if config.projection_hidden is None else config.projection_hidden,
        output_dim=config.projection_dim,
        depth=config.projection_depth,
    )
    return SimCLRModel(backbone, head)


def channels_last(device: torch.device) -> bool:
    """Whether pretraining keeps the model and views in channels-last memory format: on GPUs and on
    the CPU, where oneDNN's convolutions are faster so (1.45x test_resnet's step, 1.18x resnet18's:
    benchmarks/RESULTS.md, "The faster CPU step"); the arithmetic is the same up to rounding."""
    return device.type in ("cuda", "cpu")


def contrastive_step(
    temperature: float, channels_last: bool, views: PairViews, keys: KeyQueue | None = None
) -> engine.StepFunction:
    """One SimCLR step: two views of every image made on the device (``views``, usually
    `labelfew.views.simclr.SimCLRViews`, drawing from the batch's seeded generator), both in one
    forward pass (so BN sees all 2N views), then NT-Xent.

    With ``keys`` (`--queue`), the momentum encoder makes the keys of the same views (one more
    forward pass, no gradient): they are this step's positives and in-batch negatives, the queued
    keys of earlier steps are more negatives (`nt_xent_loss`), and then they are queued; the
    trainer updates the momentum encoder after the optimizer step (`labelfew.engine.key_queue`).

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
        if keys is None:
            return nt_xent_loss(z1, z2, temperature), images.shape[0]
        made = keys.encode(images)  # this step's keys: the positives and in-batch negatives
        loss = nt_xent_loss(z1, z2, temperature, queue=keys.negatives(), keys=made)
        keys.enqueue(made)
        return loss, images.shape[0]

    return step


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

    Every process runs this; the checks below depend only on the config, `--init` and the image
    folder, so they fail the same way on every process, before the first collective.
    """
    check_loggers(config.logger)  # a missing extra fails now, not after decoding the folder
    accelerator = engine.make_accelerator(config.precision, seed=config.seed, cpu_bf16=True)
    set_seed(config.seed)
    own = simclr.run_folder(config) / "pretrain"  # `pretrain .` must not train on its own views.png
    found = require_images(config.data, follow_links=config.follow_links, exclude=[own])
    paths = found.paths
    sources.check_decode_on(config.decode_on, config.augment_on, accelerator.device)  # before any image
    init = simclr.read_init(config, paths)  # is opened: a bad value or init fails in one line, early
    automatic_batch = config.batch_size is None
    surveyed = simclr.survey(config, paths)  # channels, window, statistics: a seeded sample of the files
    config = simclr.resolve(
        config, paths, accelerator.num_processes, accelerator.device, init, surveyed.decoding
    )
    simclr.check(config, len(paths))
    start = simclr.fed(config, init, surveyed)
    note = simclr.batch_note(config, len(paths)) if automatic_batch else None
    sync_bn = use_sync_batchnorm(config.sync_bn, accelerator)
    # The default run folder has a timestamp: use the main process's, on every process.
    config = dataclasses.replace(
        config, out=engine.on_main_process(accelerator, lambda: _prepare_output(config))
    )
    assert config.out is not None and config.batch_size is not None  # resolved
    loader, undecodable = build_batches(
        config, paths, accelerator, engine.per_process_batch(config.batch_size, accelerator), start.decoding
    )
    simclr.check_bad(config, undecodable, len(paths))  # known before training on the device path
    model, optimizer, random_keys, keys = _prepare_model(config, start, sync_bn, accelerator, len(loader))
    engine.seed_augmentations(accelerator, config.seed)
    lr = simclr.learning_rate(config)
    views = SimCLRViews(simclr.view_config(config, start))
    facts = simclr.RunFacts(
        len(paths), found.skipped, lr, engine.describe_device(accelerator), accelerator.num_processes,
        batchnorm_description(sync_bn, accelerator), note, start, random_keys, survey=surveyed.record(),
    )  # fmt: skip
    run_loggers = None
    if accelerator.is_main_process:
        _announce(config, facts, surveyed.describe(asked_window=config.window is not None))
        run_loggers = open_loggers(config.logger, config.out / "pretrain", to_json(config))
        write_views_figure(loader, views, config.out / "pretrain" / "views.png", run_loggers)
    fingerprint = simclr.fingerprint(config, paths, start)
    result = _trainer(
        config, model, optimizer, loader, views, keys, accelerator, fingerprint, run_loggers
    ).fit()
    bad = undecodable + [printable(paths[index]) for index in result.bad_indices]
    simclr.check_bad(config, bad, len(paths))
    artifact = config.out / "pretrain" / "backbone.safetensors"
    facts = dataclasses.replace(facts, skipped=found.skipped + bad, decoded=sources.decode_record(loader))
    unwrapped = accelerator.unwrap_model(model)
    engine.on_main_process(accelerator, lambda: _save(config, unwrapped, artifact, result, facts))
    return artifact


def _prepare_model(
    config: PretrainConfig, start: Start, sync_bn: bool, accelerator: Any, steps_per_epoch: int
) -> tuple[nn.Module, Any, list[str], KeyQueue | None]:
    """The encoder + projection head (the backbone from `start`'s weights when it has any, sync-BN
    across processes, channels-last on a GPU or CPU, compiled on request) and its optimizer at the
    resolved lr, both prepared by Accelerate; the backbone's tensors `start` left random; and with
    `--queue`, the momentum encoder (a copy of the prepared model, compiled with it on request) and
    its key queue."""
    model = build_model(config, start.channels)
    random_keys = start.load_into(model.backbone)  # strict: every other tensor is the init's
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last(accelerator.device):
        model = model.to(memory_format=torch.channels_last)
    groups = parameter_groups(model, config.weight_decay)
    optimizer = build_optimizer(config.optimizer, groups, lr=simclr.learning_rate(config))  # type: ignore[arg-type]
    model, optimizer = accelerator.prepare(model, optimizer)
    keys = None
    assert config.epochs is not None  # resolved
    if config.queue:
        ramp = steps_per_epoch * config.epochs if config.key_momentum_ramp else None
        keys = KeyQueue(accelerator.unwrap_model(model), config.queue, config.projection_dim,
                        config.key_momentum, ramp_steps=ramp, autocast=accelerator.autocast)  # fmt: skip
    if config.compile:
        model.compile()  # in place: the state_dict keys (checkpoints, artifacts) stay the same
        if keys is not None:
            keys.module.compile()
    return model, optimizer, random_keys, keys


def _trainer(
    config: PretrainConfig, model: nn.Module, optimizer: Any, loader: EpochBatches, views: SimCLRViews,
    keys: KeyQueue | None, accelerator: Any, fingerprint: dict[str, Any], loggers: Any,
) -> engine.Trainer:  # fmt: skip
    """The one training loop over ``loader`` with the contrastive step, warmup + cosine per step,
    checkpoints in `<out>/pretrain/checkpoints` (with the momentum encoder and the key queue, which
    the trainer updates and keeps as its moving average) and the time estimate after the first steps."""
    assert config.out is not None and config.epochs is not None
    steps_per_epoch = len(loader)
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=round(float(config.warmup_epochs or 0) * steps_per_epoch),
        total_steps=steps_per_epoch * config.epochs,
    )
    return engine.Trainer(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        step=contrastive_step(config.temperature, channels_last(accelerator.device), views, keys),
        ema=keys,
        epochs=config.epochs,
        description="pretrain",
        quiet=config.quiet,
        log_file=config.out / "pretrain" / "log.jsonl",
        checkpoint_dir=config.out / "pretrain" / "checkpoints",
        checkpoint_minutes=config.checkpoint_every,
        fingerprint=fingerprint,
        on_first_steps=None if config.quiet else _estimate_printer(config, steps_per_epoch, accelerator),
        restart=config.restart,
        loggers=loggers,
    )


def _estimate_printer(
    config: PretrainConfig, steps_per_epoch: int, accelerator: Any
) -> Callable[[float, int], None]:
    """Prints the time left after the first steps; on a CPU, over an hour, what would fit one."""
    assert config.image_size is not None and config.epochs is not None
    return estimate.first_steps_printer(
        config.arch or DEFAULT_ARCH, config.image_size, bool(config.small_stem), config.epochs,
        steps_per_epoch, on_cpu=accelerator.device.type == "cpu", small_side=SMALL_IMAGE_SIDE,
    )  # fmt: skip


def build_batches(
    config: PretrainConfig,
    paths: list[Path],
    accelerator: Any,
    per_process: int,
    decoding: Decoding = Decoding(),
) -> tuple[EpochBatches, list[str]]:
    """This process's uint8 training batches from the image source ``config.augment_on`` names,
    decoded where ``config.decode_on`` says (`labelfew.data.sources`) as ``decoding`` says (channels,
    window), and the files found undecodable before training."""
    assert config.image_size is not None
    order = EpochOrder(
        len(paths), per_process, config.seed, accelerator.process_index, accelerator.num_processes
    )
    show = accelerator.is_main_process and not config.quiet
    return sources.training_batches(
        paths, config.augment_on, config.image_size, order, accelerator, config.memory_budget,
        workers=engine.default_workers(config.workers),
        on_progress=sources.decode_progress(engine.console) if show else None, decode_on=config.decode_on,
        decoding=decoding,
    )  # fmt: skip


def _announce(config: PretrainConfig, facts: simclr.RunFacts, input_note: str | None = None) -> None:
    """The run's summary line (after the automatic batch's, the input's and the init's lines),
    unless `--quiet`."""
    if config.quiet:
        return
    init = facts.start.init if facts.start is not None else None
    for line in (
        facts.batch_note,
        input_note,
        init.summary() if init else None,
        _random_note(facts.random_keys),
    ):
        if line:
            engine.console.print(line, markup=False)
    assert config.batch_size is not None
    split = f" ({config.batch_size // facts.processes} per process)" if facts.processes > 1 else ""
    source = "decoded images in memory" if config.augment_on == "device" else "decoding workers"
    if config.decode_on == "device":
        source = "workers reading JPEGs decoded on the device"
    engine.console.print(
        f"[bold]pretrain[/] {facts.images} images from {config.data} at {config.image_size} px, "
        f"{config.arch}{' (small-image stem)' if config.small_stem else ''}, batch {config.batch_size}{split}, "
        f"{config.epochs} epochs, {config.optimizer} lr {facts.lr:.3g}, T {config.temperature}, "
        f"views on the training device from {source}, on {facts.device}, {facts.batchnorm}"
        f"{', compiled' if config.compile else ''}{_queue_note(config)}"
    )


def _queue_note(config: PretrainConfig) -> str:
    """`, queue of 4096 keys (momentum 0.999)` for the summary line; "" without `--queue`."""
    if not config.queue:
        return ""
    ramp = " rising to 1" if config.key_momentum_ramp else ""
    return f", queue of {config.queue} keys (momentum {config.key_momentum:g}{ramp})"


def _random_note(keys: list[str]) -> str | None:
    """The line that says which tensors of the init start random (the small stem's first conv)."""
    if not keys:
        return None
    return (
        f"--small-stem: {', '.join(keys)} start(s) random (the init's own stem is an ImageNet stem of "
        "another shape); leave --small-stem out to keep every tensor of the init"
    )


def _save(
    config: PretrainConfig, model: Any, artifact: Path, result: engine.FitResult, facts: simclr.RunFacts
) -> None:
    """Writes backbone.safetensors and head.safetensors with the model's spec (its init's mean/std
    and sha256 among it) as metadata, then run.json (`simclr.run_record`)."""
    assert config.arch is not None and config.image_size is not None and config.batch_size is not None
    assert facts.start is not None  # `run` sets it
    width = int(model.backbone.num_features)
    spec = facts.start.spec(width)
    metadata = {"stage": "pretrain", **spec.to_metadata(), "config": json.dumps(to_json(config))}
    backbone_hash = save_tensors(artifact, model.backbone.state_dict(), metadata)
    hidden = width if config.projection_hidden is None else config.projection_hidden
    head = HeadSpec(config.projection_depth, hidden, config.projection_dim)
    head_metadata = {**metadata, "part": "head", **dataclasses.replace(spec, head=head).to_metadata()}
    head_hash = save_tensors(artifact.parent / "head.safetensors", model.head.state_dict(), head_metadata)
    hashes = {"backbone.safetensors": backbone_hash, "head.safetensors": head_hash}
    write_run_json(artifact.parent, simclr.run_record(config, facts, result, hashes))
    if not config.quiet:
        engine.console.print(
            f"[green]pretrain done[/] in {result.seconds:.0f} s, final loss {result.final_loss:.4f} "
            f"(chance {math.log(2 * config.batch_size - 1 + config.queue):.2f}), {result.views_per_second:.0f} "
            f"views/s{skipped_note(facts.skipped)}\n  artifact: {artifact}"
        )
