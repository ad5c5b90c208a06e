"""The parts of a fine-tuning below its stage: the classifier built from its start and placed on
the device (`distill`'s student too), its optimizer, batches and step (supervised, or FixMatch's
from `labelfew.engine.fixmatch`), what a resumed run must share (its fingerprint, with the file
lists that name what changed), and the run folder of a fine-tuning with no pretrain run to live
in, and `--lr auto`'s candidates (`search_lr`). `labelfew.stages.finetune` puts them together and
writes the stage."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn

from labelfew.config import FIXMATCH_OPTIONS, FinetuneConfig, to_json
from labelfew.data.batches import Batch, EpochBatches
from labelfew.data.class_weights import class_weights
from labelfew.data.labelled import labelled_batches
from labelfew.data.labels import LabeledImages
from labelfew.data.subsets import subset_hash
from labelfew.engine import lr_search
from labelfew.engine.accelerator import default_workers, seed_augmentations
from labelfew.engine.ema import ModelEMA
from labelfew.engine.fixmatch import FIXMATCH_VERSION, PseudoLabels, UnlabeledImages, fixmatch_training
from labelfew.engine.start import Start
from labelfew.engine.trainer import StepFunction, Trainer
from labelfew.errors import Interrupted
from labelfew.fileio import sha256_file
from labelfew.losses import classification_loss
from labelfew.models import Classifier, build_classifier
from labelfew.multilabel import binary_cross_entropy
from labelfew.optim import build_finetune_optimizer, finetune_learning_rate, finetune_schedule
from labelfew.spec import Decoding
from labelfew.views.finetune import CropFlipViews

LISTED_FILES = 100_000
"""A fingerprint keeps the names behind a hash up to this many (`listed`); more would bloat it."""


def start_classifier(
    start: Start, num_classes: int, from_head_layer: int = 0, load_weights: bool = True
) -> Classifier:
    """The classifier `labelfew.models.build_classifier` makes from the start's pretrain artifact,
    with `--init`'s tensors copied (strictly) into its backbone when the start is an init.

    `load_weights` False keeps the random init (`--scratch`)."""
    model = build_classifier(start.arch, start.small_stem, start.image_size, num_classes, start.artifact,
                             from_head_layer, load_weights=load_weights, channels=start.channels)  # fmt: skip
    if load_weights:
        start.load_into(model.backbone)
    return model


def place_for_training(model: nn.Module, accelerator: Any) -> tuple[nn.Module, bool]:
    """`model` in channels_last on CUDA (where convolutions are faster so) and with SyncBatchNorm
    across several CUDA processes; returns it and whether the batches must be channels_last too."""
    channels_last = accelerator.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if accelerator.num_processes > 1 and channels_last:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, channels_last


def labels_run_folder(
    labels: Sequence[Path], tag: str = "", salt: str = "", root: Path = Path("runs")
) -> Path:
    """`runs/<labels stem>[-<tag>]-<8 hex digits>`: the run folder of a fine-tuning without a pretrain
    run (`--scratch`, `--init`).

    The digits hash the label files' absolute paths (and `salt`: the init's sha256), as
    `labelfew.fileio.default_run_folder` does for a data folder: two label files of one name
    (`a/labels.csv`, `b/labels.csv`) must not share a run, where `--restart` of one would delete
    the other's.
    """
    absolute = sorted(str(Path(path).resolve()) for path in labels)
    digest = hashlib.sha256(os.fsencode("\n".join([*absolute, salt]))).hexdigest()[:8]
    stem = Path(labels[-1]).stem  # the latest round's file names the run, as it names the stage
    return root / f"{stem}{'-' + tag if tag else ''}-{digest}"


def listed(names: Iterable[str]) -> list[str] | None:
    """The sorted names a fingerprint's `_<key>` keeps beside the hash `<key>`, so that a refused
    resume names the files that appeared or vanished (`labelfew.engine.checkpoint.check_fingerprint`);
    None above `LISTED_FILES`."""
    kept = sorted(names)
    return kept if len(kept) <= LISTED_FILES else None


def data_source(paths: Sequence[Path]) -> Path:
    """The one path `labelfew.fileio.prepare_stage_folder` records as a run's data: the file itself,
    or for several (the rounds of labelling) their sorted absolute paths joined by ` + `, so that
    `--restart` deletes only a run made from the same set of files."""
    if len(paths) == 1:
        return Path(paths[0])
    return Path(" + ".join(sorted(str(Path(path).resolve()) for path in paths)))


def run_class_weights(
    config: FinetuneConfig, class_names: list[str], labeled: LabeledImages
) -> list[float] | None:
    """`--class-weights` for a run that trains on `labeled` (`auto`: its class frequencies), in
    `class_names` order; None for `none`."""
    return class_weights(config.class_weights, class_names, labeled.counts())


def classification_step(
    label_smoothing: float,
    channels_last: bool,
    views: CropFlipViews,
    weights: list[float] | None = None,
    multi_label: bool = False,
) -> StepFunction:
    """Cross-entropy on one labelled batch (weighted per class by `weights`), its crop + flip views
    made on the device; with `multi_label`, a sigmoid and binary cross-entropy per class
    (`labelfew.multilabel`)."""
    weight_tensor = None if weights is None else torch.tensor(weights)

    def step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        assert batch.labels is not None
        images = views(batch.images, batch.sizes, batch.generator())
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images)
        if multi_label:
            return binary_cross_entropy(logits.float(), batch.labels), images.shape[0]
        return classification_loss(logits, batch.labels, label_smoothing, weight_tensor), images.shape[0]

    return step


@dataclasses.dataclass
class Training:
    """A prepared model, optimizer and batches for one fine-tuning run (a search candidate or the final one)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: EpochBatches
    undecodable: list[str]
    step: StepFunction
    ema: ModelEMA | None = None
    pseudo_labels: PseudoLabels | None = None


def prepare_training(config: FinetuneConfig, start: Start, class_names: list[str], labeled: LabeledImages,
                     lr: float, accelerator: Any, unlabeled: UnlabeledImages | None = None) -> Training:  # fmt: skip
    """The classifier, its optimizer and batches, and the step: supervised, or FixMatch's with the
    unlabeled batches attached and the moving average of the weights."""
    model, channels_last = place_for_training(
        start_classifier(start, len(class_names), config.from_head_layer, load_weights=not config.scratch),
        accelerator,
    )
    # FixMatch decays the classifier's weight too; SimCLR's fine-tuning does not (`build_finetune_optimizer`)
    optimizer = build_finetune_optimizer(config.optimizer, model, model.classifier, config.decay, lr,  # type: ignore[arg-type]
                                         decay_classifier=config.fixmatch is not None)  # fmt: skip
    loader, undecodable = labelled_batches(labeled, class_names, config.batch_size, config.seed, start.image_size,
                                           accelerator, default_workers(config.workers), config.balanced,
                                           skip_bad=config.skip_bad, decoding=start.decoding)  # fmt: skip
    model, optimizer = accelerator.prepare(model, optimizer)
    seed_augmentations(accelerator, config.seed)
    views = CropFlipViews(start.image_size, start.mean, start.std)
    settings = config.fixmatch
    weights = run_class_weights(config, class_names, labeled)
    if settings is None or unlabeled is None:
        step = classification_step(config.label_smoothing, channels_last, views, weights, labeled.multi_label)
        return Training(model, optimizer, loader, undecodable, step)
    workers = default_workers(config.workers)
    parts = fixmatch_training(accelerator.unwrap_model(model), loader, unlabeled, settings, views, config.label_smoothing,
                              class_weights=weights, labelled_batch=min(config.batch_size, len(labeled)), seed=config.seed + 1,
                              workers=workers, show=not config.quiet, accelerator=accelerator, decoding=start.decoding)  # fmt: skip
    undecodable += parts.skipped
    return Training(model, optimizer, parts.loader, undecodable, parts.step, parts.ema, parts.pseudo_labels)


def fingerprint(
    config: FinetuneConfig, start: Start, train: LabeledImages, unlabeled: UnlabeledImages | None = None
) -> dict[str, Any]:
    """What a resumed fine-tuning must share with the run that wrote the checkpoint (a supervised
    run's as before the FixMatch options, so that its older checkpoints still resume; the class
    weights as the values trained with, and early stopping, only when they are used)."""
    ignored = {"out", "quiet", "workers", "checkpoint_every", "restart", "labels", "source", "logger",
               "unlabeled", "follow_links", "skip_bad", "init", "init_prefix", "label_delimiter", "class_weights",
               "early_stop", "channels", "window"}  # fmt: skip
    if config.fixmatch is None:
        ignored |= {"method", *FIXMATCH_OPTIONS}
    values = {
        key: value
        for key, value in {**to_json(config), **method_defaults(config)}.items()
        if key not in ignored
    }
    parent = sha256_file(start.artifact.path) if start.artifact is not None and not config.scratch else None
    found = {"arch": start.arch, "image_size": start.image_size, "parent_sha256": parent,
             "labels_sha256": subset_hash(train), "_labels_sha256": listed(
                 f"{train.relative_key(path)} ({label})" for path, label in zip(train.paths, train.labels, strict=True))}  # fmt: skip
    if start.init is not None:
        found |= {"init_sha256": start.init.sha256, "init_prefix": start.init.prefix}
    if start.decoding != Decoding():  # an 8-bit RGB run keeps the keys of one before --channels
        found["decoding"] = start.decoding_record()
    weights = run_class_weights(config, train.class_names, train)
    if weights is not None:
        found["class_weights"] = weights
    if config.early_stop is not None:
        found["early_stop"] = config.early_stop
    if config.fixmatch is not None and unlabeled is not None:
        found |= {"fixmatch": dataclasses.asdict(config.fixmatch), "fixmatch_version": FIXMATCH_VERSION,
                  "unlabeled_images": len(unlabeled.paths), "unlabeled_list_sha256": unlabeled.listing_sha256(),
                  "_unlabeled_list_sha256": listed(str(path.relative_to(unlabeled.root)) for path in unlabeled.paths)}  # fmt: skip
    return {**values, **found}


def method_defaults(config: FinetuneConfig) -> dict[str, float]:
    """The weight decay and warmup the method trains with, given or its default."""
    return {"weight_decay": config.decay, "warmup_fraction": config.warmup}


def search_lr(
    config: FinetuneConfig,
    start: Start,
    class_names: list[str],
    train: LabeledImages,
    batch: int,
    accelerator: Any,
    score: Callable[[nn.Module, LabeledImages], tuple[float, float]],
    progress: lr_search.Progress | None = None,
) -> dict[str, Any]:
    """Fine-tunes briefly at each candidate lr on 4/5 of the labels and scores it on the other fifth
    (on further fifths, for the candidates still in the race, while the search's budget of
    `lr_search.SEARCH_BUDGET` × this fine-tuning's steps lasts: `lr_search.search`); `score` gives a
    trained candidate's (top-1, mean cross-entropy) on held-out labels (the stage's inference loop)."""
    rule = finetune_learning_rate(config.optimizer, batch)  # type: ignore[arg-type]
    folds = lr_search.search_folds(train, config.seed)

    def steps(count: int) -> int:  # an epoch's steps: `labelled_batches` drops the last incomplete batch
        return max(1, count // min(config.batch_size, count))

    plan = lr_search.search_plan(config.epochs, steps_per_epoch=steps(len(train)),
                                 fit_steps_per_epoch=steps(len(folds[0][0])), folds=len(folds))  # fmt: skip

    def candidate(lr: float, fold: int, epochs: int) -> lr_search.Candidate:
        set_seed(config.seed)  # every candidate from the same initialisation and batches
        training = prepare_training(config, start, class_names, folds[fold][0], lr, accelerator)
        where = f" fold {fold + 1}/{len(folds)}" if len(folds) > 1 else ""
        trainer = Trainer(
            accelerator=accelerator, model=training.model, optimizer=training.optimizer,
            scheduler=finetune_schedule(training.optimizer, len(training.loader) * epochs, config.warmup),
            loader=training.loader, step=training.step, epochs=epochs,
            description=f"lr search {lr:.3g}{where}", quiet=config.quiet,
        )  # fmt: skip
        steps = epochs * len(training.loader)
        assert len(folds[fold][1]) > 0  # `search` trains no candidate without held-out labels
        try:
            loss = trainer.fit().final_loss
            top1, held_loss = score(training.model, folds[fold][1])
        except FloatingPointError:  # diverged: this lr is out
            return lr_search.Candidate(lr, epochs, steps)
        except Interrupted as error:  # the trainer says "checkpoints are off": not the whole truth
            kept = f"the lr search's finished candidates are in {lr_search.SEARCH_FILE}: rerun to continue it"
            raise Interrupted(f"{error}; {kept}", error.exit_code) from None
        return lr_search.Candidate(lr, epochs, steps, val_top1=top1, val_loss=held_loss, final_loss=loss)

    return lr_search.search(rule, config.optimizer, batch, class_names, folds, candidate, plan, progress)
