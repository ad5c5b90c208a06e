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
from torch import Tensor, nn

from labelfew import engine
from labelfew.artifacts import (
    Artifact,
    StageInfo,
    load_artifact,
    register_stage,
    save_tensors,
    write_run_json,
)
from labelfew.config import FinetuneConfig, to_json
from labelfew.data.images import printable, skipped_note
from labelfew.data.labelled import held_out_split, readable_labels
from labelfew.data.labels import LabeledImages, read_label_files, write_labels
from labelfew.data.overlap import content_hashes
from labelfew.data.subsets import subset_hash
from labelfew.engine import linear_head, lr_search
from labelfew.engine.fine_tuning import (
    Training,
    data_source,
    fingerprint,
    labels_run_folder,
    method_defaults,
    prepare_training,
    start_classifier,
)
from labelfew.engine.fixmatch import PSEUDO_LABEL_METRICS, UnlabeledImages, find_unlabeled
from labelfew.engine.init_weights import Init, init_name, read_init
from labelfew.engine.loggers import check_loggers, open_loggers
from labelfew.engine.start import Start, finetune_start, init_start
from labelfew.errors import Interrupted, UserError
from labelfew.fileio import prepare_stage_folder, sha256_file
from labelfew.models import Classifier, head_spec
from labelfew.multilabel import DEFAULT_THRESHOLD, MAX_CLASSES, choose_threshold, macro_f1
from labelfew.optim import finetune_learning_rate, finetune_schedule, fixmatch_learning_rate
from labelfew.report.tables import print_lr_search
from labelfew.spec import ModelSpec
from labelfew.use.inference import (
    EvalImages,
    accuracy,
    held_out_images,
    held_out_multi_label,
    held_out_scores,
    run_model,
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
    parts = [method] * (method != "supervised") + start
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
                           config.batch_size, config.workers, accelerator)  # fmt: skip


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
        record = _search(config, start, class_names, train, batch, accelerator, progress)
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
    progress: lr_search.Progress | None = None,
) -> dict[str, Any]:
    """Fine-tunes briefly at each candidate lr on 4/5 of the labels and scores it on the other fifth
    (on further fifths, for the candidates still in the race, while the search's budget of
    `lr_search.SEARCH_BUDGET` × this fine-tuning's steps lasts: `lr_search.search`)."""
    rule = finetune_learning_rate(config.optimizer, batch)  # type: ignore[arg-type]
    folds = lr_search.search_folds(train, config.seed)
    checks = [_val_loader(check, class_names, start, config, accelerator) if len(check) else None
              for _, check in folds]  # fmt: skip

    def steps(count: int) -> int:  # an epoch's steps: `labelled_batches` drops the last incomplete batch
        return max(1, count // min(config.batch_size, count))

    plan = lr_search.search_plan(config.epochs, steps_per_epoch=steps(len(train)),
                                 fit_steps_per_epoch=steps(len(folds[0][0])), folds=len(folds))  # fmt: skip

    def candidate(lr: float, fold: int, epochs: int) -> lr_search.Candidate:
        set_seed(config.seed)  # every candidate from the same initialisation and batches
        training = prepare_training(config, start, class_names, folds[fold][0], lr, accelerator)
        where = f" fold {fold + 1}/{len(folds)}" if len(folds) > 1 else ""
        trainer = engine.Trainer(
            accelerator=accelerator, model=training.model, optimizer=training.optimizer,
            scheduler=finetune_schedule(training.optimizer, len(training.loader) * epochs, config.warmup),
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
        except Interrupted as error:  # the trainer says "checkpoints are off": not the whole truth
            kept = f"the lr search's finished candidates are in {lr_search.SEARCH_FILE}: rerun to continue it"
            raise Interrupted(f"{error}; {kept}", error.exit_code) from None
        return lr_search.Candidate(lr, epochs, steps, val_top1=top1, val_loss=held_loss, final_loss=loss)

    return lr_search.search(rule, config.optimizer, batch, class_names, folds, candidate, plan, progress)


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
        refuse_multi_label(config, class_names)
    elif len(class_names) < 2:
        shown = ", ".join(str(path) for path in config.labels)
        raise UserError(f"{shown}: only one class ({class_names[0]}); a classifier needs at least 2")
    train, held = held_out_split(labeled, config.val_fraction, config.seed)
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
    result = _fit(config, start, class_names, train, held, unlabeled, training, out, lr, search, accelerator)
    artifact = out / "model.safetensors"
    trained = unlabeled.paths if unlabeled is not None else train.paths  # what the batches index
    skipped = unreadable + (unlabeled.skipped if unlabeled is not None else [])
    bad = skipped + training.undecodable + [printable(trained[index]) for index in result.bad_indices]
    # FixMatch's model is the moving average of the weights (DESIGN.md trap 10), not the weights.
    model = training.ema.module if training.ema is not None else accelerator.unwrap_model(training.model)
    threshold = (
        _threshold(model, held, class_names, start, config, accelerator) if labeled.multi_label else None
    )
    record = {"lr": lr, "threshold": threshold, "lr_search": None if search is None else
              {key: value for key, value in search.items() if key not in ("fingerprint", "reused")}}  # fmt: skip
    engine.on_main_process(
        accelerator,
        lambda: _save(
            config, start, model, artifact, class_names, train, unlabeled, result, bad, accelerator, record
        ),
    )
    return artifact


def refuse_multi_label(config: FinetuneConfig, class_names: list[str]) -> None:
    """What multi-label labels cannot train with, refused before any image is decoded.

    Raises:
        UserError: FixMatch (its pseudo-label is a softmax's argmax), the linear head (trained with
            a softmax's cross-entropy), `--balanced` (an image holds
            several classes), label smoothing, or more than `MAX_CLASSES` classes.
    """
    shown = ", ".join(str(path) for path in config.labels)
    refused = ("--method fixmatch" if config.fixmatch is not None else "--method linear" if config.method == "linear"
               else "--balanced" if config.balanced
               else "--label-smoothing" if config.label_smoothing > 0 else None)  # fmt: skip
    if refused is not None:
        raise UserError(f"{shown}: multi-label labels; {refused} does not support them, drop it")
    if len(class_names) > MAX_CLASSES:
        raise UserError(
            f"{shown}: {len(class_names)} classes; a multi-label model takes at most {MAX_CLASSES}"
        )


def validation_metrics(model: nn.Module, images: EvalImages, accelerator: Any) -> dict[str, float]:
    """A multi-label epoch's held-out numbers: mAP-free and cheap, macro-F1 at `DEFAULT_THRESHOLD`,
    which is also its `val_score` (the best-checkpoint metric)."""
    scores, targets = held_out_multi_label(model, images, accelerator)
    score = macro_f1(scores, targets, DEFAULT_THRESHOLD)
    return {"val_macro_f1": score, "val_score": score}


def _threshold(model: nn.Module, held: LabeledImages | None, class_names: list[str], start: Start,
               config: FinetuneConfig, accelerator: Any) -> float:  # fmt: skip
    """The saved multi-label model's global threshold: the best macro-F1 on the held-out images, or
    `DEFAULT_THRESHOLD` without any (`--val-fraction 0`)."""
    if held is None:
        return DEFAULT_THRESHOLD
    scores, targets = held_out_multi_label(model, _val_loader(held, class_names, start, config, accelerator),
                                           accelerator)  # fmt: skip
    return choose_threshold(scores, targets)


def _linear(config: FinetuneConfig, start: Start, class_names: list[str], train: LabeledImages,
            held: LabeledImages | None, unreadable: list[str], out: Path, accelerator: Any) -> Path:  # fmt: skip
    """`--method linear`: the frozen backbone's features of the labels, the heads trained on them
    (`labelfew.engine.linear_head`), and the backbone + the chosen head saved as a classifier. No
    checkpoints: a rerun recomputes it (seconds), bit for bit."""
    started = time.perf_counter()
    model = start_classifier(start, len(class_names), config.from_head_layer).requires_grad_(False)
    features, kept, bad = _frozen_features(config, start, model, train, accelerator)
    settings = linear_head.HeadSettings(config.epochs, config.batch_size, config.decay, config.warmup,
                                        config.label_smoothing, config.balanced, config.seed)  # fmt: skip
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
    artifact, record = out / "model.safetensors", {"lr": fit.lr, "lr_search": fit.search}
    engine.on_main_process(accelerator, lambda: _save(config, start, model, artifact, class_names, kept, None,
                                                      result, unreadable + bad, accelerator, record))  # fmt: skip
    return artifact


def _frozen_features(config: FinetuneConfig, start: Start, model: Classifier, train: LabeledImages,
                     accelerator: Any) -> tuple[Tensor, LabeledImages, list[str]]:  # fmt: skip
    """The frozen classifier's features (backbone, and head layers) of the labelled images, once,
    in the evaluation view (`labelfew.use.inference.run_model`), the images they are of, and the
    undecodable ones (refused unless `--skip-bad`). Shape: (decoded images, width)."""
    frozen = nn.Sequential(model.backbone, *([model.head] if model.head is not None else []))
    width = int(model.backbone.num_features)  # type: ignore[arg-type]
    spec = ModelSpec(start.arch, start.image_size, start.small_stem, width, start.mean, start.std)
    outputs = run_model(frozen, list(train.paths), spec, config.batch_size, config.workers,
                        description="features (frozen backbone)", quiet=config.quiet or not accelerator.is_main_process)  # fmt: skip
    bad = [printable(train.paths[index]) for index in sorted(outputs.errors)]
    if bad and not config.skip_bad:
        raise UserError(
            f"{bad[0]}: cannot be decoded ({len(bad)} labelled image(s)); fix it or pass --skip-bad"
        )
    kept = LabeledImages(tuple(train.paths[i] for i in outputs.kept), tuple(train.labels[i] for i in outputs.kept),
                         train.root)  # fmt: skip
    return outputs.values, kept, bad


def _start(config: FinetuneConfig, init: Init | None, paths: tuple[Path, ...]) -> Start:
    """`--init`'s weights (their stem and mean/std, the image size as `init_start` says), else
    `--from`'s pretrained backbone, or random init with `--scratch`."""
    if init is None:
        return finetune_start(config.source, config.scratch, config.arch, config.image_size, paths)
    return init_start(init, config.arch, config.init_prefix, config.image_size, None, paths)


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
         search: dict[str, Any] | None, accelerator: Any) -> engine.FitResult:  # fmt: skip
    """Trains the prepared run (validating the moving average with FixMatch) and returns its result."""
    val_loader = _val_loader(held, class_names, start, config, accelerator) if held else None
    validated = training.ema.module if training.ema is not None else training.model
    pseudo_labels = training.pseudo_labels

    def on_epoch_end(epoch: int, loss: float) -> dict[str, float]:
        metrics = pseudo_labels.epoch_metrics(accelerator) if pseudo_labels is not None else {}
        if val_loader is not None and train.multi_label:
            metrics |= validation_metrics(validated, val_loader, accelerator)
        elif val_loader is not None:
            metrics["val_top1"] = accuracy(validated, val_loader, accelerator)
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
        fingerprint={**fingerprint(config, start, train, unlabeled), "learning_rate": lr},
    )  # fmt: skip
    return trainer.fit()


def _resolved(config: FinetuneConfig, start: Start, lr: float) -> dict[str, Any]:
    """The config as run: the start's arch and image size, the chosen lr (run.json's lr_search says
    whether it was searched) and FixMatch's values."""
    resolved = {**to_json(config), **method_defaults(config), "arch": start.arch, "image_size": start.image_size,
                "lr": lr}  # fmt: skip
    return {**resolved, **dataclasses.asdict(config.fixmatch)} if config.fixmatch is not None else resolved


def _save(config: FinetuneConfig, start: Start, model: nn.Module, artifact: Path, class_names: list[str],
          train: LabeledImages, unlabeled: UnlabeledImages | None, result: engine.FitResult, bad: list[str],
          accelerator: Any, learning_rate: dict[str, Any]) -> None:  # fmt: skip
    resolved = _resolved(config, start, learning_rate["lr"])
    head = None
    if config.from_head_layer > 0 and start.artifact is not None:
        head = head_spec(load_artifact(start.artifact.path.parent / "head.safetensors", "pretrain"))
    width = int(cast(Classifier, model).backbone.num_features)  # type: ignore[arg-type]
    # the init's lineage: `--init`'s own, or the one the pretrain started from (not a --scratch model's)
    lineage = start.artifact.spec if start.artifact is not None and not config.scratch else None
    init, init_sha256 = (start.init.source, start.init.sha256) if start.init else (
        (lineage.init, lineage.init_sha256) if lineage else (None, None))  # fmt: skip
    spec = ModelSpec(
        start.arch, start.image_size, start.small_stem, width, start.mean, start.std, head,
        config.from_head_layer, tuple(class_names), config.scratch, init, init_sha256,
        multi_label=learning_rate["threshold"] is not None, threshold=learning_rate["threshold"],
    )  # fmt: skip
    method = {"method": config.method} if config.method != "supervised" else {}
    origin = {"start": "init"} if start.init is not None else {}  # evaluate's "fine-tuned (init NAME)"
    metadata = {"stage": "finetune", **spec.to_metadata(), **method, **origin, "config": json.dumps(resolved)}
    digest = save_tensors(artifact, model.state_dict(), metadata)
    parent = (
        None
        if start.artifact is None or config.scratch
        else {"path": str(start.artifact.path.resolve()), "sha256": sha256_file(start.artifact.path)}
    )
    metrics: dict[str, Any] = {"final_loss": result.final_loss, "epoch_losses": result.epoch_losses}
    for key in ("val_top1", "val_macro_f1", *PSEUDO_LABEL_METRICS):
        if any(key in epoch for epoch in result.epoch_metrics) or key == "val_top1":
            metrics[key] = [epoch[key] for epoch in result.epoch_metrics if key in epoch]
    data: dict[str, Any] = {"skipped": len(bad), "skipped_files": bad}
    if unlabeled is not None:
        data |= {"unlabeled": str(unlabeled.root.resolve()), "unlabeled_images": len(unlabeled.paths)}
    write_run_json(artifact.parent, {
        "stage": "finetune", **method, "config": resolved, "parent": parent,
        "init": start.init.record() if start.init is not None else None,
        "artifacts": {"model.safetensors": {"sha256": digest}},
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
            f"\n  artifact: {artifact}"
        )
