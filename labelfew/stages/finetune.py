"""Fine-tuning on the labelled subset: pretrain artifact (or random init) -> model.safetensors.

As in SimCLR (arXiv 2002.05709, appendix B.5) the whole network is trained with crops and flips
only; SimCLRv2 (arXiv 2006.10029) fine-tunes from the first layer of a 3-layer projection head,
which helps most with 1% of the labels (`--from-head-layer 1`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from labelfew import engine
from labelfew.artifacts import (
    Artifact,
    StageInfo,
    load_artifact,
    register_stage,
    resolve_artifact,
    save_tensors,
    write_run_json,
)
from labelfew.config import FinetuneConfig, to_json
from labelfew.data import sources
from labelfew.data.batches import Batch, EpochOrder
from labelfew.data.images import ImageDataset, collate, typical_image_side
from labelfew.data.labels import LabeledImages, read_labels
from labelfew.data.overlap import content_hashes
from labelfew.data.store import DEFAULT_MEMORY_BUDGET
from labelfew.data.subsets import balanced_subset, subset_hash
from labelfew.engine import lr_search
from labelfew.engine.loggers import check_loggers, open_loggers
from labelfew.errors import UserError
from labelfew.fileio import prepare_folder, sha256_file
from labelfew.models import Classifier, build_backbone, build_head, head_prefix
from labelfew.optim import build_optimizer, finetune_learning_rate, parameter_groups, warmup_cosine
from labelfew.report.tables import print_lr_search
from labelfew.spec import IMAGENET_MEAN, IMAGENET_STD, HeadSpec, ModelSpec, uses_small_stem
from labelfew.use.inference import accuracy, held_out_scores
from labelfew.views.finetune import CropFlipViews
from labelfew.views.pil import eval_transform

STAGE = register_stage(
    StageInfo(
        "finetune",
        file="model.safetensors",
        folder="finetune",
        kind="classifier",
        label=lambda artifact: "fine-tuned (scratch)" if artifact.spec.scratch else "fine-tuned",
    )
)


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the weights come from: the pretrain artifact, or nothing (scratch)."""

    artifact: Artifact | None
    arch: str
    image_size: int
    small_stem: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _start(config: FinetuneConfig, labeled: LabeledImages) -> Start:
    artifact: Artifact | None = None
    try:
        artifact = load_artifact(resolve_artifact(config.source, ("pretrain",)), "pretrain")
    except UserError:
        if not config.scratch:
            raise
    if artifact is not None:
        if config.arch is not None and config.arch != artifact.arch:
            raise UserError(
                f"{artifact.path}: pretrained as {artifact.arch}, but --arch {config.arch} was asked for; drop --arch or pretrain {config.arch}"
            )
        spec = artifact.spec
        image_size = spec.image_size if config.image_size is None else config.image_size
        return Start(artifact, spec.arch, image_size, spec.small_stem, spec.mean, spec.std)
    image_size = typical_image_side(list(labeled.paths)) if config.image_size is None else config.image_size
    return Start(
        None,
        config.arch or "resnet18",
        image_size,
        uses_small_stem(image_size),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )


def build_classifier(start: Start, num_classes: int, from_head_layer: int, load_weights: bool) -> Classifier:
    """The backbone (+ head layers) with pretrained weights when `load_weights`, and a new linear layer.

    The linear layer starts at zero, as SimCLR's `zero_init_logits_layer` (the official fine-tuning
    command sets it): the first steps then train the classifier alone (the backbone's gradient is
    `W^T (p - y)` = 0) instead of back-propagating a random projection into the pretrained features.
    """
    backbone = build_backbone(start.arch, small_stem=start.small_stem, image_size=start.image_size)
    head: nn.Module | None = None
    if start.artifact is not None and load_weights:
        backbone.load_state_dict(start.artifact.tensors)
    if from_head_layer > 0:
        if start.artifact is None:
            raise UserError("--from-head-layer needs a pretrain artifact (the head's layers come from it)")
        head_artifact = load_artifact(start.artifact.path.parent / "head.safetensors", "pretrain")
        full = build_head(_head_spec(head_artifact), start.artifact.spec.num_features)
        if load_weights:
            full.load_state_dict(head_artifact.tensors)
        head = head_prefix(full, from_head_layer)
    model = Classifier(backbone, num_classes, head)
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)
    return model


def build_finetune_optimizer(config: FinetuneConfig, model: Classifier, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer; the classifier is neither LARS-adapted nor decayed (SimCLR's
    `lars_optimizer.py` excludes `head_supervised` from both)."""
    groups = parameter_groups(model, config.weight_decay, exclude=[model.classifier])
    return build_optimizer(config.optimizer, groups, lr=lr)  # type: ignore[arg-type]


def _head_spec(head_artifact: Artifact) -> HeadSpec:
    head = head_artifact.spec.head
    if head is None:
        raise UserError(f"{head_artifact.path}: no projection head recorded; rerun pretrain")
    return head


def _split(labeled: LabeledImages, fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages | None]:
    if fraction <= 0:
        return labeled, None
    if fraction >= 1:
        raise UserError(f"--val-fraction {fraction}: use a value in [0, 1)")
    held = balanced_subset(labeled, fraction=fraction, seed=seed + 1, allow_empty=True)
    held_paths = set(held.paths)
    kept = [(p, label) for p, label in zip(labeled.paths, labeled.labels, strict=True) if p not in held_paths]
    if len(held) == 0 or len({label for _, label in kept}) < len(labeled.class_names):
        raise UserError(
            f"--val-fraction {fraction} leaves no validation images or empties a class; use 0 or more labels"
        )
    train = LabeledImages(tuple(p for p, _ in kept), tuple(label for _, label in kept), labeled.root)
    return train, held


def _train_batches(
    labeled: LabeledImages, class_names: list[str], config: FinetuneConfig, image_size: int, accelerator: Any
) -> tuple[engine.EpochBatches, list[str]]:
    """The labelled images as uint8 batches from the store when they fit, else the stream
    (`labelfew.data.sources`), and the files found undecodable before training.

    --batch-size is the global batch, capped by the images there are; each process takes its
    share. The last incomplete batch is dropped, so no step sees a single image (a BatchNorm in
    training mode cannot normalise one, e.g. the head layer of ``--from-head-layer 1``).
    """
    targets = labeled.label_indices(class_names)
    batch = max(1, min(config.batch_size, len(labeled)) // accelerator.num_processes)
    weights = None
    if config.balanced:
        counts = torch.bincount(torch.tensor(targets), minlength=len(class_names)).float()
        weights = (1.0 / counts)[torch.tensor(targets)].tolist()
    order = EpochOrder(len(labeled), batch, config.seed, accelerator.process_index, accelerator.num_processes,
                       weights=weights)  # fmt: skip
    paths = list(labeled.paths)
    budget = DEFAULT_MEMORY_BUDGET / 2**30
    place = sources.augment_place("auto", budget, paths, image_size)
    return sources.training_batches(paths, place, image_size, order, accelerator, budget,
                                    workers=engine.default_workers(config.workers), labels=targets)  # fmt: skip


def _val_loader(
    labeled: LabeledImages, class_names: list[str], start: Start, config: FinetuneConfig, accelerator: Any
) -> DataLoader[Any]:
    """The held-out images through the evaluation transform, sharded by Accelerate (for `accuracy`)."""
    transform = eval_transform(start.image_size, start.mean, start.std)
    dataset = ImageDataset(list(labeled.paths), transform, labeled.label_indices(class_names))
    workers = engine.default_workers(config.workers)
    batch = max(1, min(config.batch_size, len(labeled)) // accelerator.num_processes)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)  # fmt: skip
    return accelerator.prepare(loader)


def classification_step(
    label_smoothing: float, channels_last: bool, views: CropFlipViews
) -> engine.StepFunction:
    """Cross-entropy on one labelled batch, its crop + flip views made on the device."""

    def step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        assert batch.labels is not None
        images = views(batch.images, batch.sizes, batch.generator())
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images).float()
        return nn.functional.cross_entropy(
            logits, batch.labels, label_smoothing=label_smoothing
        ), images.shape[0]

    return step


def default_out(config: FinetuneConfig, start: Start) -> Path:
    """`<run>/finetune-<labels stem>` (or `finetune-scratch-<stem>`) beside the pretrain stage."""
    name = f"finetune-{'scratch-' if config.scratch else ''}{config.labels.stem}"
    if start.artifact is not None:
        return start.artifact.path.parent.parent / name
    return Path("runs") / config.labels.stem / name


def fingerprint(config: FinetuneConfig, start: Start, train: LabeledImages) -> dict[str, Any]:
    """What a resumed fine-tuning must share with the run that wrote the checkpoint."""
    ignored = {"out", "quiet", "workers", "checkpoint_every", "restart", "labels", "source", "logger"}
    values = {key: value for key, value in to_json(config).items() if key not in ignored}
    parent = sha256_file(start.artifact.path) if start.artifact is not None and not config.scratch else None
    return {**values, "arch": start.arch, "image_size": start.image_size, "parent_sha256": parent,
            "labels_sha256": subset_hash(train)}  # fmt: skip


def _prepare_output(out: Path, restart: bool) -> Path:
    """Creates the stage folder (and clears an old log with --restart); main process only."""
    prepare_folder(out)  # fails now, not at the first checkpoint, if nothing can be written there
    if restart:
        (out / "log.jsonl").unlink(missing_ok=True)
    return out


@dataclasses.dataclass
class Training:
    """A prepared model, optimizer and batches for one fine-tuning run (a search candidate or the final one)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: engine.EpochBatches
    undecodable: list[str]
    step: engine.StepFunction


def _prepare_training(
    config: FinetuneConfig,
    start: Start,
    class_names: list[str],
    labeled: LabeledImages,
    lr: float,
    accelerator: Any,
) -> Training:
    model = build_classifier(start, len(class_names), config.from_head_layer, load_weights=not config.scratch)
    channels_last = accelerator.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_finetune_optimizer(config, model, lr=lr)
    loader, undecodable = _train_batches(labeled, class_names, config, start.image_size, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine.seed_augmentations(accelerator, config.seed)
    views = CropFlipViews(start.image_size, start.mean, start.std)
    return Training(
        model,
        optimizer,
        loader,
        undecodable,
        classification_step(config.label_smoothing, channels_last, views),
    )


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float) -> Any:
    """Linear warmup over `warmup_fraction` of the steps (at least one step when it is not 0), then cosine."""
    warmup = min(steps, max(1, round(warmup_fraction * steps))) if warmup_fraction > 0 else 0
    return warmup_cosine(optimizer, warmup_steps=warmup, total_steps=steps)


def _learning_rate(
    config: FinetuneConfig,
    start: Start,
    class_names: list[str],
    train: LabeledImages,
    out: Path,
    accelerator: Any,
) -> tuple[float, dict[str, Any] | None]:
    """The explicit `--lr`, or `--lr auto`'s choice with its record (`labelfew.engine.lr_search`)."""
    given = lr_search.explicit_lr(config.lr)
    if given is not None:
        return given, None
    batch = min(config.batch_size, len(train))
    key = {**fingerprint(config, start, train), "batch": batch}
    record = lr_search.reuse(out, key, config.restart)
    if record is None:
        record = _search(config, start, class_names, train, batch, accelerator)
        lr_search.save(out, key, record, accelerator)
    if accelerator.is_main_process and not config.quiet:
        print_lr_search(record, reused=record.get("reused", False))
    return float(record["chosen"]), record


def _search(
    config: FinetuneConfig,
    start: Start,
    class_names: list[str],
    train: LabeledImages,
    batch: int,
    accelerator: Any,
) -> dict[str, Any]:
    """Fine-tunes briefly at each candidate lr on 4/5 of the labels and scores it on the other fifth
    (on each of several fifths when one is small: `lr_search.search_folds`)."""
    rule = finetune_learning_rate(config.optimizer, batch)  # type: ignore[arg-type]
    folds = lr_search.search_folds(train, config.seed)
    checks = [_val_loader(check, class_names, start, config, accelerator) if len(check) else None
              for _, check in folds]  # fmt: skip

    def candidate(lr: float, fold: int) -> lr_search.Candidate:
        set_seed(config.seed)  # every candidate from the same initialisation and batches
        training = _prepare_training(config, start, class_names, folds[fold][0], lr, accelerator)
        epochs = lr_search.search_epochs(config.epochs, len(training.loader))
        where = f" fold {fold + 1}/{len(folds)}" if len(folds) > 1 else ""
        trainer = engine.Trainer(
            accelerator=accelerator, model=training.model, optimizer=training.optimizer,
            scheduler=_schedule(training.optimizer, len(training.loader) * epochs, config.warmup_fraction),
            loader=training.loader, step=training.step, epochs=epochs,
            description=f"lr search {lr:.3g}{where}", quiet=config.quiet,
        )  # fmt: skip
        steps = epochs * len(training.loader)
        check_loader = checks[fold]
        assert check_loader is not None  # `search` trains no candidate without held-out labels
        try:
            loss = trainer.fit().final_loss
            top1, held_loss = held_out_scores(training.model, check_loader, accelerator)
        except FloatingPointError:  # diverged: this lr is out
            return lr_search.Candidate(lr, epochs, steps)
        return lr_search.Candidate(lr, epochs, steps, val_top1=top1, val_loss=held_loss, final_loss=loss)

    return lr_search.search(rule, config.optimizer, batch, class_names, folds, candidate)


def run(config: FinetuneConfig) -> Path:
    """Fine-tunes and writes the artifact; returns the path of model.safetensors."""
    check_loggers(config.logger)  # a missing extra fails now, before any image is read
    accelerator = engine.make_accelerator(config.precision, seed=config.seed)
    set_seed(config.seed)
    labeled = read_labels(config.labels)
    engine.per_process_batch(config.batch_size, accelerator)
    start = _start(config, labeled)
    class_names = labeled.class_names
    if len(class_names) < 2:
        raise UserError(f"{config.labels}: only one class ({class_names[0]}); a classifier needs at least 2")
    train, held = _split(labeled, config.val_fraction, config.seed)
    # The main process makes the folder (a default one has a timestamp) and every process uses it.
    out = engine.on_main_process(
        accelerator, lambda: _prepare_output(config.out or default_out(config, start), config.restart)
    )
    lr, search = _learning_rate(config, start, class_names, train, out, accelerator)
    set_seed(config.seed)  # the same start whether the search ran or a resume read its choice
    training = _prepare_training(config, start, class_names, train, lr, accelerator)
    model, optimizer, loader, undecodable = (
        training.model,
        training.optimizer,
        training.loader,
        training.undecodable,
    )
    val_loader = _val_loader(held, class_names, start, config, accelerator) if held else None
    scheduler = _schedule(optimizer, len(loader) * config.epochs, config.warmup_fraction)

    def validate(epoch: int, loss: float) -> dict[str, float]:
        return {"val_top1": accuracy(model, val_loader, accelerator)} if val_loader is not None else {}

    run_loggers = open_loggers(config.logger, out, to_json(config)) if accelerator.is_main_process else None
    if accelerator.is_main_process and not config.quiet:
        origin = "random init (scratch)" if config.scratch else str(start.artifact.path)  # type: ignore[union-attr]
        engine.console.print(
            f"[bold]finetune[/] {len(train)} labelled images, {len(class_names)} classes, from {origin}, "
            f"{config.epochs} epochs, {config.optimizer} lr {lr:.4g}{' (auto)' if search else ''}, "
            f"on {engine.describe_device(accelerator)}"
        )
    trainer = engine.Trainer(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        step=training.step,
        epochs=config.epochs,
        description="finetune" + (" (scratch)" if config.scratch else ""),
        quiet=config.quiet,
        log_file=out / "log.jsonl",
        on_epoch_end=validate,
        checkpoint_dir=out / "checkpoints",
        checkpoint_minutes=config.checkpoint_every,
        fingerprint={**fingerprint(config, start, train), "learning_rate": lr},
        restart=config.restart,
        loggers=run_loggers,
    )
    result = trainer.fit()
    history = [metrics["val_top1"] for metrics in result.epoch_metrics if "val_top1" in metrics]
    artifact = out / "model.safetensors"
    bad = undecodable + [str(train.paths[index]) for index in result.bad_indices]
    unwrapped = accelerator.unwrap_model(model)
    engine.on_main_process(
        accelerator,
        lambda: _save(
            config,
            start,
            unwrapped,
            artifact,
            class_names,
            train,
            result,
            history,
            bad,
            accelerator,
            {
                "lr": lr,
                "lr_search": None
                if search is None
                else {k: v for k, v in search.items() if k not in ("fingerprint", "reused")},
            },
        ),
    )
    return artifact


def _save(
    config: FinetuneConfig,
    start: Start,
    model: Classifier,
    artifact: Path,
    class_names: list[str],
    train: LabeledImages,
    result: engine.FitResult,
    history: list[float],
    bad: list[str],
    accelerator: Any,
    learning_rate: dict[str, Any],
) -> None:
    # Resolved as pretrain's image size: the chosen lr (run.json's lr_search says it was searched).
    resolved = {
        **to_json(config),
        "arch": start.arch,
        "image_size": start.image_size,
        "lr": learning_rate["lr"],
    }
    head = None
    if config.from_head_layer > 0 and start.artifact is not None:
        head = _head_spec(load_artifact(start.artifact.path.parent / "head.safetensors", "pretrain"))
    width = int(model.backbone.num_features)  # type: ignore[arg-type]
    spec = ModelSpec(
        start.arch, start.image_size, start.small_stem, width, start.mean, start.std, head,
        config.from_head_layer, tuple(class_names), config.scratch,
    )  # fmt: skip
    metadata = {"stage": "finetune", **spec.to_metadata(), "config": json.dumps(resolved)}
    digest = save_tensors(artifact, model.state_dict(), metadata)
    parent = (
        None
        if start.artifact is None or config.scratch
        else {"path": str(start.artifact.path.resolve()), "sha256": sha256_file(start.artifact.path)}
    )
    write_run_json(
        artifact.parent,
        {
            "stage": "finetune",
            "config": resolved,
            "parent": parent,
            "artifacts": {"model.safetensors": {"sha256": digest}},
            "labels": {
                "path": str(config.labels.resolve()),
                "images": len(train),
                "subset_sha256": subset_hash(train),
                "class_names": class_names,
                "content_sha256": content_hashes(train.paths),  # evaluate refuses these as test images
            },
            "data": {"skipped": len(bad), "skipped_files": bad},
            "metrics": {
                "final_loss": result.final_loss,
                "epoch_losses": result.epoch_losses,
                "val_top1": history,
            },
            "wall_seconds": result.seconds,
            "steps": result.steps,
            "device": engine.describe_device(accelerator),
            **learning_rate,
        },
    )
    if not config.quiet:
        engine.console.print(
            f"[green]finetune done[/] in {result.seconds:.0f} s, final loss {result.final_loss:.4f}\n  artifact: {artifact}"
        )
