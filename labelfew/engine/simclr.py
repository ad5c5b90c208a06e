"""SimCLR pretraining's settings: what `pretrain` resolves before it trains and records after.

What the config leaves automatic is resolved here from the images, the machine and `--init`
(`resolve`: arch, image size, stem, colour strength, blur, warmup, batch, image source, decode
place), with the learning rate, the views' parameters, the fingerprint a resumed run must match
and the run.json record. `labelfew.stages.pretrain` keeps what is its own: the model, the step and
the loop around them. SimCLR: Chen et al. 2020, arXiv 2002.05709.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import timm
import torch

from labelfew.config import PretrainConfig, to_json
from labelfew.config.training import DEFAULT_EPOCHS, INIT_EPOCHS
from labelfew.data import sources
from labelfew.data.device_decode import decode_place
from labelfew.data.images import typical_image_side
from labelfew.data.survey import ImageSurvey
from labelfew.engine.init_channels import imagenet_statistics
from labelfew.engine.start import DEFAULT_ARCH, Start, fed_by, init_start, survey_options
from labelfew.engine.trainer import FitResult
from labelfew.errors import UserError
from labelfew.fileio import default_run_folder
from labelfew.models import build_backbone
from labelfew.optim import scaled_learning_rate
from labelfew.spec import IMAGENET_MEAN, IMAGENET_STD, Decoding, uses_small_stem
from labelfew.views.config import ViewConfig

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


def read_init(config: PretrainConfig, paths: list[Path]) -> Start | None:
    """`--init`'s weights as a start (None without `--init`), with the arch, size, stem and mean/std
    they bring (`labelfew.engine.start.init_start`), at their own channel count (`fed` adapts them).

    Call it before any image is opened, so that a bad init fails in one line before the first
    header is read.

    Raises:
        UserError: the init's (`init_start`): unreadable, another arch than `--arch`, ...
    """
    if config.init is None:
        return None
    return init_start(
        config.init, config.arch, config.init_prefix, config.image_size, config.small_stem, paths
    )


def survey(config: PretrainConfig, paths: list[Path]) -> ImageSurvey:
    """The images' channels, window and statistics as `--channels`/`--window` ask, from a sample
    seeded by `--seed` (`labelfew.engine.start.survey_options`)."""
    return survey_options(paths, config.channels, config.window, config.seed)


def fed(config: PretrainConfig, init: Start | None, found: ImageSurvey) -> Start:
    """What the backbone starts from (`init`, or random init), fed the images `found` describes:
    an init of another channel count adapted to theirs (`labelfew.engine.init_channels`), their
    window, and for a random init of 1 or N channels their mean and std (`labelfew.engine.start.fed_by`)."""
    assert config.arch is not None and config.image_size is not None  # resolved
    if init is not None and init.init is not None and init.channels != found.channels:
        init = init_start(init.init, config.arch, config.init_prefix, config.image_size, config.small_stem,
                          [], channels=found.channels)  # fmt: skip
    if init is None:
        mean, std = imagenet_statistics(found.channels)
        init = Start(None, config.arch, config.image_size, bool(config.small_stem), mean, std,
                     channels=found.channels)  # fmt: skip
    return fed_by(init, found)


def resolve(
    config: PretrainConfig,
    paths: list[Path],
    processes: int = 1,
    device: torch.device | None = None,
    init: Start | None = None,
    decoding: Decoding = Decoding(),
) -> PretrainConfig:
    """Fills the automatic values (arch, epochs, batch, image size, stem, colour strength, blur,
    warmup, image source, decode place, output).

    With `init` (`read_init`), its arch, image size and stem; without, `DEFAULT_ARCH` and the small
    stem at `SMALL_IMAGE_SIDE` px or less. The colour strength and blur follow the image size.

    Raises:
        UserError: no batch was given and the folder holds fewer images than a contrastive batch needs.
    """
    device = device or torch.device("cpu")
    if init is not None:
        arch, image_size, stem = init.arch, init.image_size, init.small_stem
    else:
        image_size = typical_image_side(paths) if config.image_size is None else config.image_size
        arch = config.arch or DEFAULT_ARCH
        stem = uses_small_stem(image_size) if config.small_stem is None else config.small_stem
    small = uses_small_stem(image_size)
    batch = config.batch_size or automatic_batch(config, len(paths), processes)  # given: at least 2
    epochs = config.epochs or (INIT_EPOCHS if init is not None else DEFAULT_EPOCHS)
    warmup = min(10.0, epochs / 10) if config.warmup_epochs is None else config.warmup_epochs
    augment_on = sources.augment_place(
        config.augment_on,
        config.memory_budget,
        paths,
        image_size,
        decode_on=config.decode_on,
        decoding=decoding,
    )
    return dataclasses.replace(
        config,
        arch=arch,
        augment_on=augment_on,
        decode_on=decode_place(
            config.decode_on, device, streamed=augment_on == "workers", channels=decoding.channels
        ),
        image_size=image_size,
        small_stem=stem,
        color_strength=(0.5 if small else 1.0) if config.color_strength is None else config.color_strength,
        blur=image_size > 32 if config.blur is None else config.blur,
        epochs=epochs,
        warmup_epochs=warmup,
        out=run_folder(config),
        batch_size=batch,
    )


def automatic_batch(config: PretrainConfig, image_count: int, processes: int) -> int:
    """`DEFAULT_BATCH`, or every image of a smaller folder (a multiple of the processes).

    Raises:
        UserError: fewer images than two per batch and one per process.
    """
    batch = min(DEFAULT_BATCH, image_count // processes * processes)
    if batch < max(2, processes):
        raise UserError(
            f"{config.data}: {image_count} image(s); contrastive pretraining needs at least "
            f"{max(2, processes)} (two per batch, one per process); add images"
        )
    return batch


def batch_note(config: PretrainConfig, image_count: int) -> str | None:
    """The line that says the default batch was lowered to fit a small folder (None: it was not)."""
    if config.batch_size == DEFAULT_BATCH:
        return None
    return (
        f"batch {config.batch_size}: the default {DEFAULT_BATCH} is more than the {image_count} images in "
        f"{config.data}, so each step takes all of them (pass --batch-size to choose)"
    )


def check(config: PretrainConfig, image_count: int) -> None:
    """What depends on the data or on two settings; the config checked each value when it was made.

    Raises:
        UserError: a warmup as long as the run, an unknown arch, a batch larger than the folder, or a
            queue longer than an epoch's keys.
    """
    assert config.epochs is not None  # resolved
    if config.warmup_epochs is not None and config.warmup_epochs >= config.epochs:
        raise UserError(
            f"--warmup-epochs {config.warmup_epochs:g} is not shorter than --epochs {config.epochs} (a recipe "
            f"may set it); pass --warmup-epochs {config.epochs / 10:g} (10% of the run) or more --epochs"
        )
    assert config.arch is not None and config.batch_size is not None  # resolved
    if not timm.is_model(config.arch):
        build_backbone(config.arch, small_stem=False)  # raises the UserError with close names
    if config.batch_size > image_count:
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the {image_count} images in {config.data}; "
            f"use at most {image_count}"
        )
    if config.queue > 2 * image_count:
        raise UserError(
            f"--queue {config.queue} holds more keys than an epoch makes (2 per image, {2 * image_count} for "
            f"{config.data}), so every image would be its own negative; use at most {2 * image_count}"
        )


def check_bad(config: PretrainConfig, bad: list[str], image_count: int) -> None:
    """Raises a `UserError` when more than `--max-bad-fraction` of the images cannot be decoded."""
    if len(bad) > config.max_bad_fraction * image_count:
        raise UserError(
            f"{len(bad)} of {image_count} images could not be decoded (more than --max-bad-fraction "
            f"{config.max_bad_fraction}); e.g. {bad[0]}. Fix or remove them."
        )


def learning_rate(config: PretrainConfig) -> float:
    """LARS's rule (`labelfew.optim.scaled_learning_rate`), or `--base-lr` itself for sgd and adamw
    (0.05·B/256 for sgd and 1e-3 for adamw without one)."""
    assert config.batch_size is not None  # resolved
    if config.optimizer == "lars":
        return scaled_learning_rate(config.base_lr, config.batch_size, config.lr_rule)  # type: ignore[arg-type]
    if config.base_lr is None:
        return {"sgd": 0.05 * config.batch_size / 256, "adamw": 1e-3}.get(config.optimizer, 0.1)
    return config.base_lr


def view_config(config: PretrainConfig, start: Start | None = None) -> ViewConfig:
    """The view parameters of a resolved config, normalised with `start`'s mean and std (ImageNet's
    RGB ones without one): an init is fed what it was trained on; the views take its channel count."""
    assert config.image_size is not None and config.color_strength is not None  # set by `resolve`
    mean, std = (start.mean, start.std) if start is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return ViewConfig(
        image_size=config.image_size,
        min_scale=config.min_scale,
        color_strength=float(config.color_strength),  # 0 is a valid strength: no colour distortion
        blur=config.blur,
        mean=mean,  # one value per channel: ViewConfig checks them
        std=std,
    )


def fingerprint(config: PretrainConfig, paths: list[Path], start: Start | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint.

    Everything that changes the model or its training (arch, batch, schedule, augmentations, the
    data's file list, the init's sha256) — but not where output goes, how often it checkpoints, how
    it prints, where the JPEGs are decoded (the same pixels within the decoders' rounding) or the
    init's path (its sha256 says whether the weights are the same). A run without `--init` has the
    keys of a run before `--init` existed, and one without `--queue` those of a run before the
    queue existed, so that their checkpoints still resume; with `--queue`, its settings are compared.
    The same holds for the decoding: an 8-bit RGB run has the keys of a run before `--channels`
    existed; another run compares its resolved channels and window.
    """
    ignored = {"out", "quiet", "workers", "checkpoint_every", "restart", "max_bad_fraction", "data", "logger",
               "memory_budget", "compile", "follow_links", "decode_on", "init", "channels", "window"}  # fmt: skip
    if not config.queue:
        ignored |= {"queue", "key_momentum", "key_momentum_ramp"}
    values = {key: value for key, value in to_json(config).items() if key not in ignored}
    names = [str(path.relative_to(config.data)) for path in paths]
    listing = hashlib.sha256(os.fsencode("\n".join(names)))
    # the list itself names the files that appeared or vanished when a resume is refused
    kept = {"_image_list_sha256": names} if len(names) <= LISTED_FILES else {}
    init = {"init_sha256": start.init.sha256} if start is not None and start.init is not None else {}
    decoding = {} if start is None or start.decoding == Decoding() else {"decoding": start.decoding_record()}
    return {**values, **init, **decoding, "images": len(paths), "image_list_sha256": listing.hexdigest()[:16],
            **kept}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What pretrain's run.json records besides the config and the fit's result.

    Attributes:
        images: images found in the folder.
        skipped: the files skipped (undecodable, or not images), as printable names.
        lr: the peak learning rate (reached after the warmup).
        device: the training device, described (`engine.describe_device`).
        processes: training processes.
        batchnorm: which BatchNorm (`labelfew.engine.batchnorm.batchnorm_description`).
        batch_note: why the automatic batch is smaller than the default, or None.
        start: where the backbone started (its init, when any).
        random_keys: tensors of the init left at random (a small stem over an ImageNet stem).
        decoded: files decoded on the device and on the CPU (`sources.decode_record`), or empty
            when the CPU decoded.
        survey: what the seeded sample of the images said (`labelfew.data.survey.ImageSurvey.record`).
    """

    images: int
    skipped: list[str]
    lr: float
    device: str
    processes: int
    batchnorm: str
    batch_note: str | None = None
    start: Start | None = None
    random_keys: list[str] = dataclasses.field(default_factory=list)
    decoded: dict[str, int] = dataclasses.field(default_factory=dict)
    survey: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_record(
    config: PretrainConfig, facts: RunFacts, result: FitResult, hashes: dict[str, str]
) -> dict[str, Any]:
    """pretrain's run.json: the resolved config, the files' sha256 (``hashes``: file name to sha256),
    the data, the init's lineage, the metrics and where it ran."""
    assert config.batch_size is not None  # resolved
    init = facts.start.init if facts.start is not None else None
    return {
        "stage": "pretrain",
        "config": to_json(config),
        "artifacts": {name: {"sha256": sha} for name, sha in hashes.items()},
        # the decode place is the config's `decode_on`; the counts say what the device could take
        "data": {
            "images": facts.images,
            "skipped": len(facts.skipped),
            "skipped_files": facts.skipped,
            **facts.decoded,
        },
        **({"input": {**facts.start.decoding_record(), "survey": facts.survey}} if facts.start else {}),
        **({"automatic_batch": facts.batch_note} if facts.batch_note else {}),
        **({"init": {**init.record(), "skipped": init.skipped, "random": facts.random_keys}} if init else {}),
        "metrics": {
            "final_loss": result.final_loss,
            "epoch_losses": result.epoch_losses,
            "views_per_second": result.views_per_second,
            "lr": facts.lr,
        },
        "wall_seconds": result.seconds,
        "steps": result.steps,
        "device": facts.device,
        "distributed": {
            "processes": facts.processes,
            "per_process_batch": config.batch_size // facts.processes,
            "batchnorm": facts.batchnorm,
        },
    }
