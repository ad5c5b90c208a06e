"""Where a distillation starts: its teacher (the run's model fine-tuned from a self-supervised or
`--init` start) and its student (the teacher's pretrained backbone, `--from-pretrain`'s, `--init`'s
weights, or random init). `labelfew.stages.distill` trains one into the other."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import timm

from labelfew.artifacts import Artifact, load_artifact
from labelfew.config import DistillConfig
from labelfew.engine.init_weights import Init, init_name, load_init
from labelfew.engine.start import init_start, load_pretrained
from labelfew.errors import UserError
from labelfew.models import Classifier, build_backbone, build_classifier
from labelfew.registry import find_models, resolve_artifact
from labelfew.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class Student:
    """Where the student starts: `kind` self (the teacher's pretrained backbone), pretrain
    (`--from-pretrain`), init (`--init`) or random (`--arch` alone), and the pretrain artifact or
    the init when there is one."""

    kind: str
    arch: str
    small_stem: bool
    artifact: Artifact | None
    init: Init | None = None

    @property
    def origin(self) -> str:
        """What the student starts from, for the run's line."""
        if self.init is not None:
            return f"init {self.init.source}"
        return str(self.artifact.path) if self.artifact is not None else "random init"

    @property
    def folder_suffix(self) -> str:
        """`-<arch>` for a student of another start than the teacher's backbone (`-<arch>-init-<name>`
        from an init), so that two students of one teacher do not share a folder."""
        if self.kind == "self":
            return ""
        return f"-{self.arch}" + (f"-init-{init_name(self.init.source)}" if self.init is not None else "")


def find_teacher(source: Path | None) -> Artifact:
    """The run's model fine-tuned from a self-supervised (or `--init`) start, not a `--scratch`
    baseline: `--from`'s file or stage folder, else the newest such finetune model of the run,
    whatever its folder is called (`labelfew.registry.find_models`).

    Raises:
        UserError: no fine-tuned model, another stage's file, or only `--scratch` baselines.
    """
    path = resolve_artifact(source, ("finetune",))
    teacher = load_artifact(path)
    if teacher.stage != "finetune":
        raise UserError(
            f"{path}: a {teacher.stage} artifact; the teacher is a fine-tuned model (finetune*/model.safetensors)"
        )
    if not teacher.spec.scratch:
        return teacher
    if source is None or (Path(source).is_dir() and path.parent != Path(source)):
        models = [model for model in find_models(path.parent.parent).models if model.stage == "finetune"]
        for candidate in sorted(models, key=lambda model: model.path.stat().st_mtime, reverse=True):
            if not candidate.spec.scratch:
                return candidate
    raise UserError(
        f"{path}: a --scratch baseline; the teacher is the model fine-tuned from the pretrained backbone "
        "(run finetune without --scratch, or pass --from its folder)"
    )


def student_start(config: DistillConfig, teacher: Artifact) -> Student:
    """Same arch: the pretrained backbone the teacher started from; another: `--from-pretrain`,
    `--init` or random.

    Raises:
        UserError: an unknown arch, an arch that differs from `--from-pretrain`'s or `--init`'s, a bad
            `--init`, or a teacher whose pretrained backbone is gone.
    """
    spec = teacher.spec
    if config.arch is not None and not timm.is_model(config.arch):
        build_backbone(config.arch, small_stem=False)  # raises the UserError with close names
    if config.init is not None:
        return _init_student(config, spec)
    if config.from_pretrain is not None:
        start = load_pretrained(config.from_pretrain, config.arch, "--from-pretrain")
        _check_channels(start, spec)
        kind = "self" if start.arch == spec.arch else "pretrain"
        return Student(kind, start.arch, _pretrained_stem(config, start), start)
    if config.arch is not None and config.arch != spec.arch:
        small_stem = spec.small_stem if config.small_stem is None else config.small_stem
        if small_stem:  # fails now, not after the images are decoded, for an arch without a ResNet stem
            build_backbone(config.arch, small_stem=True, image_size=spec.image_size)
        return Student("random", config.arch, small_stem, None)
    parent = (teacher.run_info().get("parent") or {}).get("path")
    if not parent or not Path(parent).is_file():
        also = f", --init {spec.init} (the teacher's own start)" if spec.init and not parent else ""
        raise UserError(
            f"{teacher.path}: the pretrained backbone it was fine-tuned from ({parent or 'not recorded'}) is not "
            f"there; pass --from-pretrain runs/NAME/pretrain{also} (or --arch for a random-init student)"
        )
    start = load_artifact(Path(parent), "pretrain")
    return Student("self", start.arch, _pretrained_stem(config, start), start)


def _check_channels(start: Artifact, spec: ModelSpec) -> None:
    """A `--from-pretrain` backbone of another channel count than the teacher's is refused: the
    student is fed the teacher's images."""
    if start.spec.channels != spec.channels:
        raise UserError(
            f"--from-pretrain {start.path}: pretrained on {start.spec.channels}-channel images, the teacher on "
            f"{spec.channels}; the student sees the teacher's images, so pass a backbone pretrained on them"
        )


def _init_student(config: DistillConfig, spec: ModelSpec) -> Student:
    """`--init`'s weights with their stem (`labelfew.engine.start.init_start`), at the teacher's size,
    adapted to the teacher's channels (`labelfew.engine.init_channels.adapt_init`: an RGB init summed
    into one channel, as timm does).

    Raises:
        UserError: as `init_start`, or an init normalised otherwise than the teacher (both see one view).
    """
    start = init_start(
        config.init or "",
        config.arch,
        config.init_prefix,
        spec.image_size,
        config.small_stem,
        [],
        channels=spec.channels,
    )
    assert start.init is not None
    if not _same(start.mean, spec.mean) or not _same(start.std, spec.std):
        raise UserError(
            f"--init {config.init}: its weights expect mean {start.mean} and std {start.std}, the teacher "
            f"{spec.mean} and {spec.std}; teacher and student see the same images, so use weights of the teacher's"
        )
    return Student("init", start.arch, start.small_stem, None, start.init)


def _same(values: tuple[float, ...], others: tuple[float, ...]) -> bool:
    """The same statistics to float precision (an init's adapted mean is an average: 0.4000000000000001)."""
    if len(values) != len(others):
        return False
    return all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(values, others, strict=True))


def _pretrained_stem(config: DistillConfig, start: Artifact) -> bool:
    """The pretrained start's stem; a `--small-stem` / `--no-small-stem` against it is a UserError."""
    if config.small_stem is not None and config.small_stem != start.spec.small_stem:
        raise UserError(
            f"--{'' if config.small_stem else 'no-'}small-stem: the student starts from {start.path}, pretrained "
            f"{'with' if start.spec.small_stem else 'without'} the small-image stem; leave the flag out (it is for a "
            "random-init student of another --arch)"
        )
    return start.spec.small_stem


def build_student(student: Student, spec: ModelSpec) -> Classifier:
    """The pretrained backbone (`--init`'s, or a random one) + a zero-initialised linear layer for
    the teacher's classes, taking the teacher's input channels (`spec.channels`)."""
    assert spec.class_names is not None
    model = build_classifier(
        student.arch,
        student.small_stem,
        spec.image_size,
        len(spec.class_names),
        student.artifact,
        channels=spec.channels,
    )
    if student.init is not None:
        load_init(model.backbone, student.init, student.small_stem)
    return model
