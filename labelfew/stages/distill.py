"""SimCLRv2 distillation: a fine-tuned teacher + unlabeled images -> `distill-<labels>/model.safetensors`.

SimCLRv2 (Chen et al. 2020, arXiv 2006.10029, section 2.3, eq. 2) uses the unlabeled images a
second time: the fine-tuned model (the teacher) labels them with its softmax, and a student is
trained to match it, `-sum_y P_T(y|x; t) log P_S(y|x; t)` (× t², see `distillation_step`), at t = 0.1
for the same arch and 1.0 for another by default (the paper's, section 3), optionally plus the labelled loss.
Self-distillation (the same arch, started from the pretrained backbone) improves on the teacher;
big-to-small distillation (`--arch`) gives a smaller model. Both are trained with the fine-tuning
augmentation (random resized crop + flip) and, as in the paper, pretraining's optimizer and schedule.

The teacher stays in eval mode under `no_grad`, off the optimizer, and sees the very view the
student sees (DESIGN.md trap 11: a teacher in train mode drifts its BN statistics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, cast

import torch
from accelerate.utils import set_seed
from torch import nn

from labelfew import engine
from labelfew.artifacts import Artifact, save_tensors, write_run_json
from labelfew.config import DistillConfig, to_json
from labelfew.data import sources
from labelfew.data.batches import Batch, LabelledPairBatch, WithLabelled
from labelfew.data.images import printable, require_images, skipped_note
from labelfew.data.labelled import labelled_batches, unlabeled_batches
from labelfew.data.labels import LabeledImages, folder_labels, read_labels
from labelfew.data.overlap import content_hashes
from labelfew.data.subsets import subset_hash
from labelfew.engine.counts import EpochCounts
from labelfew.engine.fine_tuning import listed, place_for_training
from labelfew.engine.init_weights import init_name
from labelfew.engine.loggers import check_loggers, open_loggers
from labelfew.engine.student import Student, build_student, find_teacher, student_start
from labelfew.errors import UserError
from labelfew.fileio import prepare_stage_folder, sha256_file
from labelfew.losses import distillation_loss
from labelfew.models import Classifier, load_model
from labelfew.optim import build_finetune_optimizer, scaled_learning_rate, warmup_cosine_fraction
from labelfew.registry import StageInfo, register_stage, stage_info
from labelfew.spec import ModelSpec
from labelfew.views.finetune import CropFlipViews


def _label(artifact: Artifact) -> str:
    """evaluate's name: "distilled" (the teacher's own start), "distilled (ARCH[, random init])",
    "distilled (ARCH, init NAME)" (a student started from `--init`)."""
    start = artifact.metadata.get("student", "self")
    if start == "self":
        return "distilled"
    init = f", init {init_name(artifact.spec.init or '')}" if start == "init" else ""
    return f"distilled ({artifact.arch}{', random init' if start == 'random' else ''}{init})"


STAGE = register_stage(
    StageInfo("distill", file="model.safetensors", folder="distill", kind="classifier", label=_label)
)

WARMUP_FRACTION = 0.1
"""Linear warmup over this part of the steps, then cosine: pretraining's 10 of 100 epochs."""
AUTO_TEMPERATURE = {"self": 0.1, "big-to-small": 1.0}
"""`--temperature auto`: SimCLRv2 (arXiv 2006.10029, section 3) self-distils at 0.1, big-to-small at 1.0."""


class Agreement(EpochCounts):
    """Per-epoch counts on the device (no host sync per step): the student's top-1 agreeing with
    the teacher's, the teacher's mean top probability (how sure its pseudo-labels are) and, when
    the unlabeled folder is a class-per-folder tree of the teacher's classes (a benchmark), the
    teacher's top-1 on those views."""

    def __init__(self, device: torch.device, has_labels: bool) -> None:
        super().__init__(("agree", "confidence", "correct", "total"), device)
        self.has_labels = has_labels

    @torch.no_grad()
    def add(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
            temperature: float) -> None:  # fmt: skip
        teacher_top = teacher_logits.argmax(dim=1)
        correct = (teacher_top == labels).sum() if labels is not None else 0
        confidence = torch.softmax(teacher_logits / temperature, dim=1).amax(dim=1).sum()
        agree = (student_logits.argmax(dim=1) == teacher_top).sum()
        self.count(agree=agree, confidence=confidence, correct=correct, total=teacher_top.shape[0])

    def epoch_metrics(self, accelerator: Any) -> dict[str, float]:
        """This epoch's rates over every process (each must call it); the counts start again."""
        agree, confidence, correct, total = self.totals(accelerator).values()
        metrics = {"agreement": agree / max(total, 1), "teacher_confidence": confidence / max(total, 1)}
        return {**metrics, "teacher_top1": correct / max(total, 1)} if self.has_labels else metrics


def distill_temperature(config: DistillConfig, teacher: Artifact, student: Student) -> float:
    """`--temperature`, or for `auto` SimCLRv2's: 0.1 when the student's arch is the teacher's, else 1.0."""
    if config.temperature != "auto":
        return float(config.temperature)
    return AUTO_TEMPERATURE["self" if student.arch == teacher.arch else "big-to-small"]


def distillation_step(teacher: nn.Module, views: CropFlipViews, temperature: float, alpha: float,
                      accelerator: Any, agreement: Agreement) -> engine.StepFunction:  # fmt: skip
    """T² × the distillation loss of one view of every unlabeled image (the teacher's logits of that same
    view); with `alpha`, + alpha × the labelled views' cross-entropy (one student pass, one BN batch).

    T² (Hinton et al., arXiv 1503.02531; SimCLRv2's eq. 2 has none): at T = 0.1 the layers LARS does not
    adapt (classifier, biases, BN) get ~20× T = 1's gradients, and a probe's self-distillation diverged
    (agreement 19%; 98% with T², 96% at T = 1). LARS's trust ratio ignores the scale; the log shows it."""
    channels_last = accelerator.device.type == "cuda"

    def step(student: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        labelled = cast(LabelledPairBatch, batch).labelled
        images = views(batch.images, batch.sizes, batch.generator())
        if labelled is not None:
            images = torch.cat([images, views(labelled.images, labelled.sizes, labelled.generator())])
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        unlabeled = len(batch)
        with torch.no_grad(), accelerator.autocast():
            teacher_logits = teacher(images[:unlabeled]).float()
        logits = student(images).float()
        loss = temperature**2 * distillation_loss(logits[:unlabeled], teacher_logits, temperature)
        agreement.add(logits[:unlabeled], teacher_logits, batch.labels, temperature)
        if labelled is not None and alpha > 0:
            assert labelled.labels is not None
            loss = loss + alpha * nn.functional.cross_entropy(logits[unlabeled:], labelled.labels)
        return loss, images.shape[0]

    return step


def labelled_images(config: DistillConfig, class_names: list[str]) -> LabeledImages | None:
    """The `--labels` images for the `--alpha` loss, or None.

    Raises:
        UserError: one of `--labels` / `--alpha` without the other, or a class the teacher lacks.
    """
    if (config.labels is None) != (config.alpha == 0):
        raise UserError("--labels and --alpha go together: pass both (e.g. --alpha 1) or neither")
    if config.labels is None:
        return None
    labeled = read_labels(config.labels)
    labeled.label_indices(class_names)  # raises on a class the teacher does not know
    return labeled


def build_batches(config: DistillConfig, paths: list[Path], known: list[int] | None, labeled: LabeledImages | None,
                  spec: ModelSpec, place: str, accelerator: Any) -> tuple[WithLabelled, list[str]]:  # fmt: skip
    """The unlabeled uint8 batches (`labelfew.data.labelled.unlabeled_batches`) with the labelled ones
    (their own order, seed + 1) attached, and the files found undecodable; --batch-size is the
    global batch of each. Both are decoded as the teacher's images were (`spec.decoding`), at its size."""
    image_size, class_names, decoding = spec.image_size, list(spec.class_names or ()), spec.decoding
    workers = engine.default_workers(config.workers)
    show = accelerator.is_main_process and not config.quiet
    unlabeled, undecodable = unlabeled_batches(
        paths, known, config.batch_size, config.seed, image_size, accelerator, root=config.unlabeled, place=place,
        memory_budget=config.memory_budget, workers=workers,
        on_progress=sources.decode_progress(engine.console) if show else None, decoding=decoding,
    )  # fmt: skip
    if labeled is None:
        return WithLabelled(unlabeled, None), undecodable
    labelled, unreadable = labelled_batches(labeled, class_names, config.batch_size, config.seed + 1, image_size,
                                            accelerator, workers, decoding=decoding)  # fmt: skip
    return WithLabelled(unlabeled, labelled), unreadable + undecodable


def default_out(teacher: Artifact, student: Student) -> Path:
    """`<run>/distill-<labels stem>` beside the teacher's `finetune-<labels stem>` (+ `-<arch>` for
    another student arch, so that two students of one teacher do not share a folder)."""
    folder, prefix = teacher.path.parent.name, stage_info("finetune").folder
    suffix = folder.removeprefix(prefix) if folder.startswith(prefix) else f"-{folder}"  # `--out ft-auto`
    return teacher.path.parent.parent / f"{STAGE.folder}{suffix}{student.folder_suffix}"


def learning_rate(config: DistillConfig, batch: int) -> float:
    """`--lr`, or pretraining's rule for the global batch (SimCLRv2 distils with pretraining's schedule)."""
    if config.lr is not None:
        return config.lr
    if config.optimizer == "lars":
        return scaled_learning_rate(None, batch, "sqrt")
    return 0.05 * batch / 256 if config.optimizer == "sgd" else 1e-3


def fingerprint(config: DistillConfig, teacher: Artifact, student: Student, paths: list[Path],
                labeled: LabeledImages | None, place: str) -> dict[str, Any]:  # fmt: skip
    """What a resumed distillation must share with the run that wrote the checkpoint."""
    ignored = {"out", "quiet", "workers", "checkpoint_every", "restart", "memory_budget", "unlabeled", "source",
               "from_pretrain", "labels", "augment_on", "logger", "follow_links", "init", "init_prefix"}  # fmt: skip
    values = {key: value for key, value in to_json(config).items() if key not in ignored}
    names = [str(path.relative_to(config.unlabeled)) for path in paths]
    listing = hashlib.sha256(os.fsencode("\n".join(names)))
    start = (
        student.init.sha256
        if student.init
        else sha256_file(student.artifact.path)
        if student.artifact
        else None
    )
    found = {"augment_on": place, "teacher_sha256": sha256_file(teacher.path), "student": student.kind,
             "student_arch": student.arch, "start_sha256": start, "images": len(paths),
             "image_list_sha256": listing.hexdigest()[:16], "_image_list_sha256": listed(names),
             "labels_sha256": subset_hash(labeled) if labeled is not None else None}  # fmt: skip
    if labeled is not None:  # the file lists (`_` keys) name what appeared or vanished in a refused resume
        found["_labels_sha256"] = listed(f"{labeled.relative_key(path)} ({label})"
                                         for path, label in zip(labeled.paths, labeled.labels, strict=True))  # fmt: skip
    if student.init is not None:
        found["init_prefix"] = student.init.prefix
    return {**values, **found}


def _prepare_models(
    config: DistillConfig, student: Student, teacher_artifact: Artifact, lr: float, accelerator: Any
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """The student (seeded, prepared for training), its optimizer, and the teacher: on the device in
    eval mode with no gradients, each process its own copy, never given to `accelerator.prepare`."""
    set_seed(config.seed)
    model, channels_last = place_for_training(build_student(student, teacher_artifact.spec), accelerator)
    teacher = load_model(teacher_artifact).to(accelerator.device).eval().requires_grad_(False)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    classifier = cast(Classifier, model).classifier
    optimizer = build_finetune_optimizer(config.optimizer, model, classifier, config.weight_decay, lr)  # type: ignore[arg-type]
    model, optimizer = accelerator.prepare(model, optimizer)
    engine.seed_augmentations(accelerator, config.seed)
    return model, optimizer, teacher


def run(config: DistillConfig) -> Path:
    """Distils the teacher into the student and writes the artifact; returns the path of model.safetensors."""
    check_loggers(config.logger)  # a missing extra fails now, before any image is read
    accelerator = engine.make_accelerator(config.precision, seed=config.seed)
    set_seed(config.seed)
    teacher_artifact = find_teacher(config.source)
    if teacher_artifact.spec.multi_label:
        raise UserError(
            f"{teacher_artifact.path}: a multi-label teacher; distill trains towards a softmax and does not "
            "support multi-label models"
        )
    student = student_start(config, teacher_artifact)
    temperature = distill_temperature(config, teacher_artifact, student)
    spec = teacher_artifact.spec
    class_names = list(spec.class_names or ())
    labeled = labelled_images(config, class_names)
    found = require_images(config.unlabeled, follow_links=config.follow_links)
    paths = found.paths
    engine.per_process_batch(config.batch_size, accelerator)
    place = sources.augment_place(config.augment_on, config.memory_budget, paths, spec.image_size,
                                  decoding=spec.decoding)  # fmt: skip
    out = engine.on_main_process(accelerator, lambda: prepare_stage_folder(
        config.out or default_out(teacher_artifact, student), config.restart, source=config.unlabeled))  # fmt: skip
    known = folder_labels(paths, config.unlabeled, class_names)
    loader, undecodable = build_batches(config, paths, known, labeled, spec, place, accelerator)
    batch = min(config.batch_size, len(paths)) // accelerator.num_processes * accelerator.num_processes
    lr = learning_rate(config, batch)
    model, optimizer, teacher = _prepare_models(config, student, teacher_artifact, lr, accelerator)
    steps = len(loader) * config.epochs
    scheduler = warmup_cosine_fraction(optimizer, steps, WARMUP_FRACTION)
    agreement = Agreement(accelerator.device, has_labels=known is not None)
    views = CropFlipViews(spec.image_size, spec.mean, spec.std)
    if accelerator.is_main_process and not config.quiet:
        _announce(config, teacher_artifact, student, len(paths), labeled, temperature, lr, accelerator)
    run_loggers = open_loggers(config.logger, out, to_json(config)) if accelerator.is_main_process else None
    trainer = engine.Trainer(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
        step=distillation_step(teacher, views, temperature, config.alpha, accelerator, agreement),
        epochs=config.epochs, description="distill", quiet=config.quiet, log_file=out / "log.jsonl",
        on_epoch_end=lambda epoch, loss: agreement.epoch_metrics(accelerator),
        checkpoint_dir=out / "checkpoints", checkpoint_minutes=config.checkpoint_every,
        fingerprint=fingerprint(config, teacher_artifact, student, paths, labeled, place), restart=config.restart,
        loggers=run_loggers,
    )  # fmt: skip
    result = trainer.fit()
    artifact = out / "model.safetensors"
    bad = found.skipped + undecodable + [printable(paths[index]) for index in result.bad_indices]
    unwrapped = accelerator.unwrap_model(model)
    record = {"lr": lr, "temperature": temperature, "augment_on": place, "images": len(paths), "skipped_files": bad,
              "device": engine.describe_device(accelerator)}  # fmt: skip
    engine.on_main_process(
        accelerator,
        lambda: _save(config, teacher_artifact, student, unwrapped, artifact, labeled, result, record),
    )
    return artifact


def _announce(config: DistillConfig, teacher: Artifact, student: Student, images: int, labeled: LabeledImages | None,
              temperature: float, lr: float, accelerator: Any) -> None:  # fmt: skip
    """The run's line, after `--init`'s (what was loaded and skipped, a stem left random)."""
    if student.init is not None:  # `labelfew.engine.init_weights.load_init` leaves that conv random
        stem = student.small_stem and not student.init.small_stem
        engine.console.print(
            student.init.summary() + ("; the small-image stem's conv starts random" if stem else "")
        )
    engine.console.print(
        f"[bold]distill[/] {teacher.path} into {student.arch} ({student.kind if student.kind != 'self' else 'the same arch'}"
        f", from {student.origin}), {images} unlabeled images"
        f"{f' + {len(labeled)} labelled (alpha {config.alpha:g})' if labeled else ''}, T {temperature:g}, "
        f"{config.epochs} epochs, {config.optimizer} lr {lr:.3g}, on {engine.describe_device(accelerator)}"
    )


def _file_record(path: Path | None) -> dict[str, str] | None:
    return None if path is None else {"path": str(path.resolve()), "sha256": sha256_file(path)}


def _labels_record(teacher: Artifact, labeled: LabeledImages | None) -> dict[str, Any]:
    """The teacher's labels (the student learnt them through its outputs, so evaluate refuses them as
    test images too), with the `--labels` images' content hashes added."""
    labels = dict(teacher.run_info().get("labels") or {})
    if labeled is not None:
        hashes = set(labels.get("content_sha256") or []) | set(content_hashes(labeled.paths))
        labels["content_sha256"] = sorted(hashes)
    return labels


def _save(config: DistillConfig, teacher: Artifact, student: Student, model: Classifier, artifact: Path,
          labeled: LabeledImages | None, result: engine.FitResult, record: dict[str, Any]) -> None:  # fmt: skip
    resolved = {
        **to_json(config),
        "arch": student.arch,
        "lr": record["lr"],
        "temperature": record["temperature"],
        "augment_on": record["augment_on"],
    }
    width = int(model.backbone.num_features)  # type: ignore[arg-type]
    # the init's lineage: `--init`'s own, or the one its pretrained start had (none from random init)
    init, init_sha256 = (student.init.source, student.init.sha256) if student.init else (
        (student.artifact.spec.init, student.artifact.spec.init_sha256) if student.artifact else (None, None))  # fmt: skip
    spec = dataclasses.replace(teacher.spec.backbone(), arch=student.arch, small_stem=student.small_stem,
                               num_features=width, class_names=teacher.spec.class_names, init=init,
                               init_sha256=init_sha256)  # fmt: skip
    metadata = {
        "stage": STAGE.name,
        **spec.to_metadata(),
        "student": student.kind,
        "config": json.dumps(resolved),
    }
    digest = save_tensors(artifact, model.state_dict(), metadata)
    keys = [key for key in ("agreement", "teacher_confidence", "teacher_top1") if result.epoch_metrics
            and key in result.epoch_metrics[-1]]  # fmt: skip
    skipped = record["skipped_files"]
    write_run_json(artifact.parent, {
        "stage": STAGE.name, "config": resolved, "parent": _file_record(teacher.path),
        "student": {"start": student.kind, "arch": student.arch,
                    "pretrain": _file_record(student.artifact.path if student.artifact else None),
                    "init": student.init.record() if student.init else None},
        "artifacts": {"model.safetensors": {"sha256": digest}},
        "labels": _labels_record(teacher, labeled),
        "distill_labels": None if labeled is None else {"path": str(config.labels), "images": len(labeled),
                                                        "subset_sha256": subset_hash(labeled)},
        "data": {"unlabeled": str(config.unlabeled.resolve()), "images": record["images"], "skipped": len(skipped),
                 "skipped_files": skipped},
        "metrics": {"final_loss": result.final_loss, "epoch_losses": result.epoch_losses,
                    **{key: [metrics.get(key) for metrics in result.epoch_metrics] for key in keys}},
        "wall_seconds": result.seconds, "steps": result.steps, "device": record["device"],
    })  # fmt: skip
    if not config.quiet:
        engine.console.print(
            f"[green]distill done[/] in {result.seconds:.0f} s, final loss {result.final_loss:.4f}{skipped_note(skipped)}"
            f"\n  artifact: {artifact}"
        )
