"""Fine-tuning on the labelled subset: pretrain artifact (or random init) -> model.safetensors.

As in SimCLR (arXiv 2002.05709, appendix B.5) the whole network is trained with crops and flips
only; SimCLRv2 (arXiv 2006.10029) fine-tunes from the first layer of a 3-layer projection head,
which helps most with 1% of the labels (`--from-head-layer 1`).

`--method fixmatch --unlabeled FOLDER` trains FixMatch (arXiv 2001.07685) from the same start, as
SelfMatch (arXiv 2101.06480) does from SimCLR, or from random init with `--scratch` (plain
FixMatch): each step adds μB unlabeled images (`labelfew.engine.fixmatch`), an epoch is one pass
over them, and the moving average of the weights (`labelfew.engine.ema`) is validated and saved.

`--init SOURCE` fine-tunes weights that already exist (timm's, another tool's, a labelfew run)
with no self-supervised step: the transfer baseline, one command (`labelfew.engine.init_weights`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, cast

from accelerate.utils import set_seed
from torch import nn

from labelfew import engine
from labelfew.artifacts import Artifact, load_artifact, write_run_json
from labelfew.config import FinetuneConfig, to_json
from labelfew.data import multilabel
from labelfew.data.class_weights import imbalance_warning
from labelfew.data.images import printable, skipped_note
from labelfew.data.labelled import held_out_split, readable_labels
from labelfew.data.labels import LabeledImages, read_label_files, write_labels
from labelfew.data.overlap import content_hashes
from labelfew.data.subsets import subset_hash
from labelfew.engine import linear_head, lr_search
from labelfew.engine.best import BestEpoch, kept_model, kept_note, save_models
from labelfew.engine.fine_tuning import (
    Training,
    data_source,
    fingerprint,
    labels_run_folder,
    method_defaults,
    prepare_training,
    run_class_weights,
    search_lr,
    start_classifier,
)
from labelfew.engine.fixmatch import PSEUDO_LABEL_METRICS, UnlabeledImages, find_unlabeled
from labelfew.engine.init_weights import Init, init_name, read_init
from labelfew.engine.loggers import check_loggers, open_loggers
from labelfew.engine.start import Start, data_start, finetune_start
from labelfew.errors import UserError
from labelfew.fileio import prepare_stage_folder, sha256_file
from labelfew.models import Classifier, head_spec
from labelfew.optim import finetune_learning_rate, finetune_schedule, fixmatch_learning_rate
from labelfew.registry import StageInfo, register_stage
from labelfew.report.tables import print_lr_search
from labelfew.use.held_out import epoch_scores, frozen_features, multi_label_threshold
from labelfew.use.inference import (
    EvalImages,
    accuracy,
    held_out_images,
    held_out_scores,
)


def _label(artifact: Artifact) -> str:
    """evaluate's name of a model by its start: "fine-tuned" (from a self-supervised pretrain),
    "fine-tuned (scratch)", "fine-tuned (init NAME)" (`--init`: no self-supervised step),
    "fine-tuned (init + SSL)" (from a pretrain that started from an init), with a method first
    ("fine-tuned (fixmatch, init NAME)"); `--method linear`'s "linear (frozen)"."""
    method, spec = artifact.metadata.get("method", "supervised"), artifact.spec
    start = ["scratch"] if spec.scratch else [] if spec.init is None else [
        f"init {init_name(spec.init)}" if artifact.metadata.get("start") == "init" else "init + SSL"]  # fmt: skip
    if method == "linear":  # the backbone was not fine-tuned: "linear (frozen[, init NAME])"
        return f"linear ({', '.join(['frozen', *start])})"
    parts = (
        [method] * (method != "supervised")
        + start
        + ["last epoch"] * (artifact.metadata.get("checkpoint") == "last")
    )
    return f"fine-tuned ({', '.join(parts)})" if parts else "fine-tuned"


STAGE = register_stage(
    StageInfo("finetune", file="model.safetensors", folder="finetune", kind="classifier", label=_label)
)


def default_out(config: FinetuneConfig, start: Start) -> Path:
    """`<run>/finetune-<labels stem>` (`finetune-scratch-<stem>`, `finetune-fixmatch-[scratch-]<stem>`,
    `finetune-linear-<stem>`)
    beside the pretrain stage; without one, in a run of its own named after the labels (and the
    init): `runs/<stem>[-init-<name>]-<hash>` (`labelfew.engine.fine_tuning.labels_run_folder`)."""
    method = "" if config.method == "supervised" else f"{config.method}-"
    stem = config.labels[-1].stem  # the latest round's file names the stage
    name = f"finetune-{method}{'scratch-' if config.scratch else ''}{stem}"
    if start.artifact is not None:
        return start.artifact.path.parent.parent / name
    if start.init is not None:
        return labels_run_folder(config.labels, f"init-{start.init.name}", salt=start.init.sha256) / name
    return labels_run_folder(config.labels) / name


def label_file(config: FinetuneConfig, out: Path) -> Path:
    """The one label file run.json names, which evaluate reads for its kNN bank and overlap check:
    the `--labels` given, or the merge of several, written as `labels.csv` into the stage folder."""
    return config.labels[0] if len(config.labels) == 1 else out / "labels.csv"


def _val_loader(
    labeled: LabeledImages, class_names: list[str], start: Start, config: FinetuneConfig, accelerator: Any
) -> EvalImages:
    """The held-out images as the evaluation view sees them, sharded by Accelerate (for `accuracy`)."""
    return held_out_images(labeled, class_names, start.image_size, start.mean, start.std,
                           config.batch_size, config.workers, accelerator, decoding=start.decoding)  # fmt: skip


def _learning_rate(
    config: FinetuneConfig,
    start: Start,
    class_names: list[str],
    train: LabeledImages,
    out: Path,
    accelerator: Any,
) -> tuple[float, dict[str, Any] | None]:
    """The explicit `--lr`, or `--lr auto`'s choice with its record (`labelfew.engine.lr_search`);
    FixMatch's `--lr auto` is the rule for the labelled batch, not searched (each candidate would
    train on the unlabeled images too)."""
    given = lr_search.explicit_lr(config.lr)
    if given is not None:
        return given, None
    batch = min(config.batch_size, len(train))
    if train.multi_label:
        rule = finetune_learning_rate(config.optimizer, batch)  # type: ignore[arg-type]
        return rule, {"rule": rule, "optimizer": config.optimizer, "batch": batch, "candidates": [], "chosen": rule,
                      "note": "not searched for multi-label labels: the rule's lr"}  # fmt: skip
    if config.fixmatch is not None:
        rule = fixmatch_learning_rate(config.optimizer, batch)  # type: ignore[arg-type]
        return rule, {"rule": rule, "optimizer": config.optimizer, "batch": batch, "candidates": [], "chosen": rule,
                      "note": "not searched for --method fixmatch: FixMatch's lr (sgd 0.03 × B / 64)"}  # fmt: skip
    # the file lists (`_` keys) only name files in a refused resume; the search's record keeps none
    key = {key: value for key, value in fingerprint(config, start, train).items() if not key.startswith("_")}
    key["batch"] = batch
    record = lr_search.reuse(out, key, config.restart)
    if record is None:
        progress = lr_search.Progress.load(out, key, accelerator, config.restart)

        def score(model: nn.Module, check: LabeledImages) -> tuple[float, float]:
            return held_out_scores(
                model, _val_loader(check, class_names, start, config, accelerator), accelerator
            )

        record = search_lr(config, start, class_names, train, batch, accelerator, score, progress)
        lr_search.save(out, key, record, accelerator)
    if accelerator.is_main_process and not config.quiet:
        print_lr_search(record, reused=record.get("reused", False))
    return float(record["chosen"]), record


def run(config: FinetuneConfig) -> Path:
    """Fine-tunes and writes the artifact; returns the path of model.safetensors."""
    check_loggers(config.logger)  # a missing extra fails now, before any image is read
    # a bad --init (a truncated file, another arch) fails before any image is opened
    init = (
        None if config.init is None else read_init(config.init, arch=config.arch, prefix=config.init_prefix)
    )
    accelerator = engine.make_accelerator(config.precision, seed=config.seed)
    set_seed(config.seed)
    labeled, unreadable = readable_labels(read_label_files(config.labels), config.skip_bad)
    engine.per_process_batch(config.batch_size, accelerator)
    start = _start(config, init, labeled.paths)
    class_names = labeled.class_names
    if labeled.multi_label:
        multilabel.refuse_options(config, class_names)
    elif len(class_names) < 2:
        shown = ", ".join(str(path) for path in config.labels)
        raise UserError(f"{shown}: only one class ({class_names[0]}); a classifier needs at least 2")
    train, held = held_out_split(labeled, config.val_fraction, config.seed)
    weights = run_class_weights(config, class_names, train)  # a bad --class-weights file: exit 2 now
    _warn_if_imbalanced(config, labeled, accelerator)
    unlabeled = (
        None
        if config.unlabeled is None
        else find_unlabeled(config.unlabeled, class_names, config.follow_links)
    )
    # The main process makes the folder (a default one has a timestamp) and every process uses it.
    out = engine.on_main_process(accelerator, lambda: prepare_stage_folder(
        config.out or default_out(config, start), config.restart, source=data_source(config.labels)))  # fmt: skip
    if len(config.labels) > 1:
        engine.on_main_process(accelerator, lambda: write_labels(labeled, label_file(config, out)))
    if config.method == "linear":
        return _linear(config, start, class_names, train, held, unreadable, out, accelerator)
    lr, search = _learning_rate(config, start, class_names, train, out, accelerator)
    set_seed(config.seed)  # the same start whether the search ran or a resume read its choice
    training = prepare_training(config, start, class_names, train, lr, accelerator, unlabeled)
    result, best = _fit(
        config, start, class_names, train, held, unlabeled, training, out, lr, search, accelerator
    )
    artifact = out / "model.safetensors"
    trained = unlabeled.paths if unlabeled is not None else train.paths  # what the batches index
    skipped = unreadable + (unlabeled.skipped if unlabeled is not None else [])
    bad = skipped + training.undecodable + [printable(trained[index]) for index in result.bad_indices]
    # FixMatch's model is the moving average of the weights (DESIGN.md trap 10), not the weights.
    model = training.ema.module if training.ema is not None else accelerator.unwrap_model(training.model)
    threshold = None if not labeled.multi_label else multi_label_threshold(
        kept_model(model, best), _val_loader(held, class_names, start, config, accelerator) if held else None,
        accelerator)  # fmt: skip
    record = {"lr": lr, "threshold": threshold, "lr_search": None if search is None else
              {key: value for key, value in search.items() if key not in ("fingerprint", "reused")},
              "class_weights": None if weights is None else dict(zip(class_names, weights, strict=True)),
              "best": None if best is None else best.record(config.epochs, len(result.epoch_losses))}  # fmt: skip
    engine.on_main_process(accelerator, lambda: _save(config, start, model, artifact, class_names, train, unlabeled,
                                                      result, bad, accelerator, record, best))  # fmt: skip
    return artifact


def _linear(config: FinetuneConfig, start: Start, class_names: list[str], train: LabeledImages,
            held: LabeledImages | None, unreadable: list[str], out: Path, accelerator: Any) -> Path:  # fmt: skip
    """`--method linear`: the frozen backbone's features of the labels, the heads trained on them
    (`labelfew.engine.linear_head`), and the backbone + the chosen head saved as a classifier. No
    checkpoints: a rerun recomputes it (seconds), bit for bit."""
    started = time.perf_counter()
    model = start_classifier(start, len(class_names), config.from_head_layer).requires_grad_(False)
    frozen = nn.Sequential(model.backbone, *([model.head] if model.head is not None else []))
    spec = start.spec(int(model.backbone.num_features))  # type: ignore[arg-type]
    features, indices, bad = frozen_features(frozen, list(train.paths), spec, config.batch_size, config.workers,
                                             config.skip_bad, config.quiet or not accelerator.is_main_process)  # fmt: skip
    kept = LabeledImages(
        tuple(train.paths[i] for i in indices), tuple(train.labels[i] for i in indices), train.root
    )
    weights = run_class_weights(config, class_names, kept)
    settings = linear_head.HeadSettings(config.epochs, config.batch_size, config.decay, config.warmup,
                                        config.label_smoothing, config.balanced, config.seed,
                                        None if weights is None else tuple(weights))  # fmt: skip
    fit = linear_head.fit_linear(features, kept, class_names, lr_search.explicit_lr(config.lr), settings)
    model.classifier = fit.layer
    model.to(accelerator.device)
    metrics = [] if held is None or not len(held) else [
        {"val_top1": accuracy(model, _val_loader(held, class_names, start, config, accelerator), accelerator)}]  # fmt: skip
    if accelerator.is_main_process and not config.quiet:
        if fit.search is not None:
            print_lr_search(fit.search, reused=False)
        engine.console.print(f"[bold]finetune (linear)[/] {len(kept)} labelled images, {len(class_names)} classes, "
                             f"frozen backbone, lr {fit.lr:.4g}")  # fmt: skip
    result = engine.FitResult(config.epochs, fit.steps, time.perf_counter() - started, 0.0, fit.final_loss,
                              fit.epoch_losses, metrics)  # fmt: skip
    artifact = out / "model.safetensors"
    record = {"lr": fit.lr, "lr_search": fit.search, "threshold": None,
              "class_weights": None if weights is None else dict(zip(class_names, weights, strict=True))}  # fmt: skip
    engine.on_main_process(accelerator, lambda: _save(config, start, model, artifact, class_names, kept, None,
                                                      result, unreadable + bad, accelerator, record, None))  # fmt: skip
    return artifact


def _start(config: FinetuneConfig, init: Init | None, paths: tuple[Path, ...]) -> Start:
    """`--init`'s weights (their stem and mean/std, the image size as `init_start` says), else
    `--from`'s pretrained backbone, or random init with `--scratch`."""
    if init is None:
        return finetune_start(config.source, config.scratch, config.arch, config.image_size, paths,
                              config.channels, config.window, config.seed)  # fmt: skip
    return data_start(init, config.arch, config.init_prefix, config.image_size, paths, config.channels,
                      config.window, config.seed)  # fmt: skip


def _warn_if_imbalanced(config: FinetuneConfig, labeled: LabeledImages, accelerator: Any) -> None:
    """One line when the largest class has ≥ 10× the smallest's labels and neither
    `--class-weights` nor `--balanced` evens them (`labelfew.data.class_weights.imbalance_warning`)."""
    if config.class_weights != "none" or config.balanced or not accelerator.is_main_process:
        return
    where = ", ".join(str(path) for path in config.labels)
    line = imbalance_warning(labeled.counts(), where, "consider --class-weights auto or --balanced")
    if line is not None:
        engine.console.print(f"[yellow]warning[/]: {line}", highlight=False, soft_wrap=True)


def _announce(config: FinetuneConfig, start: Start, train: LabeledImages, classes: int,
              unlabeled: UnlabeledImages | None, lr: float, searched: bool, accelerator: Any) -> None:  # fmt: skip
    """The run's one line (and `--init`'s: what was loaded and skipped), main process only."""
    if not accelerator.is_main_process or config.quiet:
        return
    settings = config.fixmatch
    origin = ("random init (scratch)" if config.scratch else f"init {start.init.source}" if start.init
              else str(start.artifact.path if start.artifact else None))  # fmt: skip
    auto = " (auto: the rule, not searched for fixmatch)" if settings else " (auto)"
    plus = "" if unlabeled is None or settings is None else (
        f" + {len(unlabeled.paths)} unlabeled (FixMatch: μ {settings.mu}, threshold {settings.threshold:g}, "
        f"λ_u {settings.unlabeled_weight:g}, EMA {settings.ema:g})")  # fmt: skip
    if start.init is not None:
        engine.console.print(start.init.summary())
    engine.console.print(
        f"[bold]finetune[/] {len(train)} labelled images{plus}, {classes} classes, from {origin}, "
        f"{config.epochs} epochs, {config.optimizer} lr {lr:.4g}{auto if searched else ''}, "
        f"on {engine.describe_device(accelerator)}"
    )


def _fit(config: FinetuneConfig, start: Start, class_names: list[str], train: LabeledImages,
         held: LabeledImages | None, unlabeled: UnlabeledImages | None, training: Training, out: Path, lr: float,
         search: dict[str, Any] | None, accelerator: Any) -> tuple[engine.FitResult, BestEpoch | None]:  # fmt: skip
    """Trains the prepared run (validating the moving average with FixMatch) and returns its result,
    and with held-out labels its best epoch by `val_score` (balanced accuracy), weights kept."""
    val_loader = _val_loader(held, class_names, start, config, accelerator) if held else None
    validated = training.ema.module if training.ema is not None else training.model
    pseudo_labels = training.pseudo_labels
    best = None if val_loader is None else BestEpoch(
        training.ema.module if training.ema is not None else accelerator.unwrap_model(training.model),
        key="val_score", patience=config.early_stop)  # fmt: skip

    def on_epoch_end(epoch: int, loss: float) -> dict[str, float]:
        metrics = pseudo_labels.epoch_metrics(accelerator) if pseudo_labels is not None else {}
        if val_loader is not None:  # val_score: what the best epoch is chosen on
            metrics |= epoch_scores(validated, val_loader, accelerator, len(class_names), train.multi_label)
        return metrics

    run_loggers = open_loggers(config.logger, out, to_json(config)) if accelerator.is_main_process else None
    settings = config.fixmatch
    _announce(config, start, train, len(class_names), unlabeled, lr, search is not None, accelerator)
    trainer = engine.Trainer(
        accelerator=accelerator, model=training.model, optimizer=training.optimizer,
        scheduler=finetune_schedule(training.optimizer, len(training.loader) * config.epochs, config.warmup,
                                fixmatch=settings is not None),
        loader=training.loader, step=training.step, epochs=config.epochs,
        description="finetune" + (f" ({config.method})" if settings else "") + (" (scratch)" if config.scratch else ""),
        quiet=config.quiet, log_file=out / "log.jsonl", on_epoch_end=on_epoch_end, checkpoint_dir=out / "checkpoints",
        checkpoint_minutes=config.checkpoint_every, restart=config.restart, loggers=run_loggers, ema=training.ema,
        fingerprint={**fingerprint(config, start, train, unlabeled), "learning_rate": lr}, best=best,
    )  # fmt: skip
    return trainer.fit(), best


def _resolved(config: FinetuneConfig, start: Start, lr: float) -> dict[str, Any]:
    """The config as run: the start's arch and image size, the chosen lr (run.json's lr_search says
    whether it was searched) and FixMatch's values."""
    resolved = {**to_json(config), **method_defaults(config), "arch": start.arch, "image_size": start.image_size,
                "lr": lr}  # fmt: skip
    return {**resolved, **dataclasses.asdict(config.fixmatch)} if config.fixmatch is not None else resolved


def _save(config: FinetuneConfig, start: Start, model: nn.Module, artifact: Path, class_names: list[str],
          train: LabeledImages, unlabeled: UnlabeledImages | None, result: engine.FitResult, bad: list[str],
          accelerator: Any, learning_rate: dict[str, Any], best: BestEpoch | None) -> None:  # fmt: skip
    """model.safetensors (the best epoch's weights with held-out labels, else the last epoch's),
    model-last.safetensors beside it when they differ in kind, and run.json."""
    resolved = _resolved(config, start, learning_rate["lr"])
    head = None
    if config.from_head_layer > 0 and start.artifact is not None:
        head = head_spec(load_artifact(start.artifact.path.parent / "head.safetensors", "pretrain"))
    width = int(cast(Classifier, model).backbone.num_features)  # type: ignore[arg-type]
    # the init's lineage: `--init`'s own, or the one the pretrain started from (not a --scratch model's)
    lineage = start.artifact.spec if start.artifact is not None and not config.scratch else None
    init, init_sha256 = (start.init.source, start.init.sha256) if start.init else (
        (lineage.init, lineage.init_sha256) if lineage else (None, None))  # fmt: skip
    spec = start.spec(
        width, head=head, from_head_layer=config.from_head_layer, class_names=tuple(class_names),
        scratch=config.scratch, init=init, init_sha256=init_sha256,
        multi_label=learning_rate["threshold"] is not None, threshold=learning_rate["threshold"],
    )  # fmt: skip
    method = {"method": config.method} if config.method != "supervised" else {}
    origin = {"start": "init"} if start.init is not None else {}  # evaluate's "fine-tuned (init NAME)"
    metadata = {"stage": "finetune", **spec.to_metadata(), **method, **origin, "config": json.dumps(resolved)}
    files = save_models(artifact, model.state_dict(), metadata, best, len(result.epoch_losses))
    parent = (
        None
        if start.artifact is None or config.scratch
        else {"path": str(start.artifact.path.resolve()), "sha256": sha256_file(start.artifact.path)}
    )
    metrics: dict[str, Any] = {"final_loss": result.final_loss, "epoch_losses": result.epoch_losses}
    for key in ("val_top1", "val_macro_f1", "val_score", *PSEUDO_LABEL_METRICS):
        if any(key in epoch for epoch in result.epoch_metrics) or key == "val_top1":
            metrics[key] = [epoch[key] for epoch in result.epoch_metrics if key in epoch]
    data: dict[str, Any] = {"skipped": len(bad), "skipped_files": bad}
    if unlabeled is not None:
        data |= {"unlabeled": str(unlabeled.root.resolve()), "unlabeled_images": len(unlabeled.paths)}
    write_run_json(artifact.parent, {
        "stage": "finetune", **method, "config": resolved, "parent": parent,
        "init": start.init.record() if start.init is not None else None,
        "artifacts": files,
        "labels": {"path": str(label_file(config, artifact.parent).resolve()),
                   "files": [str(path.resolve()) for path in config.labels],
                   "images": len(train), "subset_sha256": subset_hash(train),
                   "class_names": class_names,
                   "content_sha256": content_hashes(train.paths)},  # evaluate refuses these as test images
        "data": data, "metrics": metrics, "wall_seconds": result.seconds, "steps": result.steps,
        "device": engine.describe_device(accelerator), **learning_rate,
    })  # fmt: skip
    if not config.quiet:
        engine.console.print(
            f"[green]finetune done[/] in {result.seconds:.0f} s, final loss {result.final_loss:.4f}{skipped_note(bad)}"
            f"\n  artifact: {artifact}{kept_note(best, len(result.epoch_losses))}"
        )
