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
from torch.utils.data import DataLoader, WeightedRandomSampler

from labelfew import engine
from labelfew.artifacts import (
    Artifact,
    load_artifact,
    resolve_artifact,
    save_tensors,
    write_run_json,
)
from labelfew.config import FinetuneConfig, to_json
from labelfew.data.images import ImageDataset, collate, typical_image_side
from labelfew.data.labels import LabeledImages, read_labels
from labelfew.data.subsets import balanced_subset, subset_hash
from labelfew.errors import UserError
from labelfew.fileio import prepare_folder, sha256_file
from labelfew.models import (
    SMALL_IMAGE_SIDE,
    Classifier,
    ProjectionHead,
    artifact_backbone,
    build_backbone,
    head_prefix,
    load_weights,
)
from labelfew.optim import build_optimizer, parameter_groups, warmup_cosine
from labelfew.views.pil import eval_transform, finetune_transform


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the weights come from: the pretrain artifact, or nothing (scratch)."""

    artifact: Artifact | None
    arch: str
    image_size: int
    small_stem: bool
    mean: list[float]
    std: list[float]


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
        image_size = config.image_size or int(artifact.metadata["image_size"])
        return Start(
            artifact,
            artifact.arch,
            image_size,
            bool(artifact.json_field("small_stem")),
            artifact.json_field("mean"),
            artifact.json_field("std"),
        )
    image_size = config.image_size or typical_image_side(list(labeled.paths))
    return Start(
        None,
        config.arch or "resnet18",
        image_size,
        image_size <= SMALL_IMAGE_SIDE,
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    )


def build_classifier(start: Start, num_classes: int, from_head_layer: int, load_weights: bool) -> Classifier:
    """The backbone (+ head layers) with pretrained weights when `load_weights`, and a new linear layer."""
    backbone = build_backbone(start.arch, small_stem=start.small_stem, image_size=start.image_size)
    head: nn.Module | None = None
    if start.artifact is not None and load_weights:
        backbone.load_state_dict(start.artifact.tensors)
    if from_head_layer > 0:
        if start.artifact is None:
            raise UserError("--from-head-layer needs a pretrain artifact (the head's layers come from it)")
        head_artifact = load_artifact(start.artifact.path.parent / "head.safetensors", "pretrain")
        metadata = head_artifact.metadata
        full = ProjectionHead(
            int(start.artifact.metadata["num_features"]),
            int(metadata["projection_hidden"]),
            output_dim=int(metadata["projection_dim"]),
            depth=int(metadata["projection_depth"]),
        )
        if load_weights:
            full.load_state_dict(head_artifact.tensors)
        head = head_prefix(full, from_head_layer)
    return Classifier(backbone, num_classes, head)


def load_classifier(artifact: Artifact) -> Classifier:
    """Rebuilds a fine-tuned model from its artifact (arch, stem, head layers, class count)."""
    metadata = artifact.metadata
    backbone = artifact_backbone(artifact)
    layers = int(metadata.get("from_head_layer", "0"))
    head = None
    if layers > 0:
        full = ProjectionHead(
            int(metadata["num_features"]),
            int(metadata["projection_hidden"]),
            output_dim=int(metadata["projection_dim"]),
            depth=int(metadata["projection_depth"]),
        )
        head = head_prefix(full, layers)
    model = Classifier(backbone, len(artifact.json_field("class_names")), head)
    load_weights(model, artifact)
    return model


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


def _loader(
    labeled: LabeledImages,
    class_names: list[str],
    transform: Any,
    config: FinetuneConfig,
    train: bool,
    accelerator: Any,
) -> DataLoader[Any]:
    targets = labeled.label_indices(class_names)
    dataset = ImageDataset(list(labeled.paths), transform, targets, seed=config.seed if train else None)
    workers = engine.default_workers(config.workers)
    # --batch-size is the global batch (capped by the images there are); each process loads its share.
    batch = max(1, min(config.batch_size, len(labeled)) // accelerator.num_processes)
    sampler = None
    if train and config.balanced:
        counts = torch.bincount(torch.tensor(targets), minlength=len(class_names)).float()
        weights = (1.0 / counts)[torch.tensor(targets)]
        sampler = WeightedRandomSampler(
            weights.tolist(),
            num_samples=len(targets),
            replacement=True,
            generator=torch.Generator().manual_seed(config.seed),
        )
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=False,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(config.seed) if train and sampler is None else None,
        worker_init_fn=engine.worker_seeder(accelerator),
    )


def classification_step(label_smoothing: float, channels_last: bool) -> engine.StepFunction:
    """Cross-entropy on one labelled batch."""

    def step(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        images = batch["images"]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images).float()
        return nn.functional.cross_entropy(
            logits, batch["labels"], label_smoothing=label_smoothing
        ), images.shape[0]

    return step


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader[Any], accelerator: Any) -> float:
    """Top-1 accuracy of `model` over a prepared loader (all processes)."""
    model.eval()
    correct = total = torch.zeros((), device=accelerator.device)
    for batch in loader:
        predictions = model(batch["images"]).argmax(dim=1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct = correct + (predictions == labels).sum()
        total = total + labels.numel()
    model.train()
    return float(correct / total.clamp(min=1))


def default_out(config: FinetuneConfig, start: Start) -> Path:
    """`<run>/finetune-<labels stem>` (or `finetune-scratch-<stem>`) beside the pretrain stage."""
    name = f"finetune-{'scratch-' if config.scratch else ''}{config.labels.stem}"
    if start.artifact is not None:
        return start.artifact.path.parent.parent / name
    return Path("runs") / config.labels.stem / name


def fingerprint(config: FinetuneConfig, start: Start, train: LabeledImages) -> dict[str, Any]:
    """What a resumed fine-tuning must share with the run that wrote the checkpoint."""
    ignored = {"out", "quiet", "workers", "checkpoint_every", "restart", "labels", "source"}
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


def run(config: FinetuneConfig) -> Path:
    """Fine-tunes and writes the artifact; returns the path of model.safetensors."""
    accelerator = engine.make_accelerator(config.precision, seed=config.seed)
    set_seed(config.seed)
    labeled = read_labels(config.labels)
    if config.epochs < 1:
        raise UserError(f"--epochs {config.epochs}: use at least 1")
    engine.per_process_batch(config.batch_size, accelerator)
    start = _start(config, labeled)
    class_names = labeled.class_names
    if len(class_names) < 2:
        raise UserError(f"{config.labels}: only one class ({class_names[0]}); a classifier needs at least 2")
    train, held = _split(labeled, config.val_fraction, config.seed)
    model = build_classifier(start, len(class_names), config.from_head_layer, load_weights=not config.scratch)
    channels_last = accelerator.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(config.optimizer, parameter_groups(model, config.weight_decay), lr=config.lr)  # type: ignore[arg-type]
    loader = _loader(
        train,
        class_names,
        finetune_transform(start.image_size, start.mean, start.std),
        config,
        train=True,
        accelerator=accelerator,
    )
    val_loader = (
        _loader(
            held,
            class_names,
            eval_transform(start.image_size, start.mean, start.std),
            config,
            train=False,
            accelerator=accelerator,
        )
        if held
        else None
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    engine.seed_augmentations(accelerator, config.seed)
    scheduler = warmup_cosine(optimizer, warmup_steps=0, total_steps=len(loader) * config.epochs)
    # The main process makes the folder (a default one has a timestamp) and every process uses it.
    out = engine.on_main_process(
        accelerator, lambda: _prepare_output(config.out or default_out(config, start), config.restart)
    )

    def validate(epoch: int, loss: float) -> dict[str, float]:
        return {"val_top1": accuracy(model, val_loader, accelerator)} if val_loader is not None else {}

    if accelerator.is_main_process and not config.quiet:
        origin = "random init (scratch)" if config.scratch else str(start.artifact.path)  # type: ignore[union-attr]
        engine.console.print(
            f"[bold]finetune[/] {len(train)} labelled images, {len(class_names)} classes, from {origin}, "
            f"{config.epochs} epochs, {config.optimizer} lr {config.lr:g}, on {engine.describe_device(accelerator)}"
        )
    trainer = engine.Trainer(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        step=classification_step(config.label_smoothing, channels_last),
        epochs=config.epochs,
        description="finetune" + (" (scratch)" if config.scratch else ""),
        quiet=config.quiet,
        log_file=out / "log.jsonl",
        on_epoch_end=validate,
        checkpoint_dir=out / "checkpoints",
        checkpoint_minutes=config.checkpoint_every,
        fingerprint=fingerprint(config, start, train),
        restart=config.restart,
    )
    result = trainer.fit()
    history = [metrics["val_top1"] for metrics in result.epoch_metrics if "val_top1" in metrics]
    artifact = out / "model.safetensors"
    bad = [str(train.paths[index]) for index in result.bad_indices]
    unwrapped = accelerator.unwrap_model(model)
    engine.on_main_process(
        accelerator,
        lambda: _save(
            config, start, unwrapped, artifact, class_names, train, result, history, bad, accelerator
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
) -> None:
    resolved = {**to_json(config), "arch": start.arch, "image_size": start.image_size}
    metadata = {
        "stage": "finetune",
        "arch": start.arch,
        "num_features": str(model.backbone.num_features),
        "image_size": str(start.image_size),
        "small_stem": json.dumps(start.small_stem),
        "mean": json.dumps(start.mean),
        "std": json.dumps(start.std),
        "class_names": json.dumps(class_names),
        "from_head_layer": str(config.from_head_layer),
        "scratch": json.dumps(config.scratch),
        "config": json.dumps(resolved),
    }
    if config.from_head_layer > 0 and start.artifact is not None:
        head_meta = load_artifact(start.artifact.path.parent / "head.safetensors", "pretrain").metadata
        metadata.update(
            {key: head_meta[key] for key in ("projection_depth", "projection_hidden", "projection_dim")}
        )
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
        },
    )
    if not config.quiet:
        engine.console.print(
            f"[green]finetune done[/] in {result.seconds:.0f} s, final loss {result.final_loss:.4f}\n  artifact: {artifact}"
        )
