"""Where a model's weights come from: a pretrain artifact, weights that already exist, or random init.

`finetune` starts from `--from`'s pretrained backbone (or from nothing with `--scratch`), or from
`--init SOURCE` (timm's pretrained weights, a weights file of another tool, an exported folder or
a labelfew run: `labelfew.engine.init_weights`); `distill`'s student from `--from-pretrain`'s.
They refuse an `--arch` that is not the one the backbone was pretrained as, with the same line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from labelfew.artifacts import Artifact, load_artifact
from labelfew.config.shared import parse_channels, parse_window
from labelfew.data.images import typical_image_side
from labelfew.data.survey import ImageSurvey, survey_images
from labelfew.engine.init_channels import adapt_init, imagenet_statistics
from labelfew.engine.init_weights import Init, load_init, read_init
from labelfew.errors import UserError
from labelfew.models import build_backbone
from labelfew.registry import resolve_artifact
from labelfew.spec import Decoding, ModelSpec, uses_small_stem

DEFAULT_ARCH = "resnet18"
"""The architecture of a `--scratch` fine-tuning without `--arch`: SimCLR's CIFAR-10 backbone."""


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the weights come from: the pretrain artifact, `--init`'s weights, or nothing (scratch).

    ``channels`` is the model's input channel count; ``mean`` and ``std`` have one entry per channel;
    ``window`` and ``file_windows`` say how deep images become 8 bits (`labelfew.spec.Decoding`).
    """

    artifact: Artifact | None
    arch: str
    image_size: int
    small_stem: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    init: Init | None = None
    channels: int = 3
    window: tuple[float, float] | None = None
    file_windows: bool = True

    @property
    def decoding(self) -> Decoding:
        """How the images are decoded for this start (channels and window)."""
        return Decoding(self.channels, self.window, self.file_windows)

    def decoding_record(self) -> dict[str, Any]:
        """The input a model is fed, as JSON values (lists, so that a record read back from a
        checkpoint's fingerprint.json compares equal): channels, window, file_windows, mean, std."""
        return {"channels": self.channels, "window": None if self.window is None else list(self.window),
                "file_windows": self.file_windows, "mean": list(self.mean), "std": list(self.std)}  # fmt: skip

    def spec(self, num_features: int, **fields: Any) -> ModelSpec:
        """The `ModelSpec` of a model from this start: its arch, size, stem, normalisation, channels,
        window and `init`'s lineage, with ``fields`` (head, classes, ...) on top."""
        lineage: dict[str, Any] = {}
        if self.init is not None:
            lineage = {"init": self.init.source, "init_sha256": self.init.sha256}
        return ModelSpec(
            self.arch, self.image_size, self.small_stem, num_features, self.mean, self.std,
            channels=self.channels, window=self.window, file_windows=self.file_windows,
            **{**lineage, **fields},
        )  # fmt: skip

    def load_into(self, backbone: nn.Module) -> list[str]:
        """Copies `init`'s weights into ``backbone`` (strictly); returns the keys left random."""
        return [] if self.init is None else load_init(backbone, self.init, self.small_stem)


def init_start(
    source: str | Init, arch: str | None, prefix: str | None, image_size: int | None, small_stem: bool | None,
    paths: Sequence[Path], channels: int | None = None,
) -> Start:  # fmt: skip
    """`--init SOURCE`'s weights (or an `Init` already read) as a start, with the settings they bring.

    The mean and std are the init's (timm's ``pretrained_cfg``, a labelfew artifact's spec); the
    stem is the init's: a labelfew artifact keeps its own, and other weights keep their pretrained
    stem unless `small_stem` asks for the small-image stem, whose first conv then starts random
    (`Start.load_into` returns it, the stage says so). The image size is `image_size`, else a
    labelfew artifact's, else the images' typical side (as without an init). `channels` (None: the
    init's own) adapts the init's first conv and mean/std to that many input channels
    (`labelfew.engine.init_channels.adapt_init`: summed into 1 channel, as timm does).

    Raises:
        UserError: as `labelfew.engine.init_weights.read_init`, or `small_stem` against a labelfew
            artifact's own stem.
    """
    init = source if isinstance(source, Init) else read_init(source, arch=arch, prefix=prefix)
    init = init if channels is None else adapt_init(init, channels)
    source = init.source
    if small_stem is not None and init.image_size is not None and small_stem != init.small_stem:
        raise UserError(
            f"--{'' if small_stem else 'no-'}small-stem: --init {source} was trained "
            f"{'with' if init.small_stem else 'without'} the small-image stem; leave the flag out"
        )
    size = image_size or init.image_size or typical_image_side(list(paths))
    stem = init.small_stem if init.image_size is not None else bool(small_stem)
    mean, std = (init.mean, init.std) if init.mean and init.std else imagenet_statistics(init.channels)
    return Start(None, init.arch, size, stem, mean, std, init, init.channels)


def load_pretrained(source: Path | None, arch: str | None, flag: str = "--from") -> Artifact:
    """The pretrain artifact `source` names (a run, its folder or the file).

    Raises:
        UserError: no pretrain artifact there, or `arch` given and not the one it was pretrained as.
    """
    artifact = load_artifact(resolve_artifact(source, ("pretrain",)), "pretrain")
    _check_arch(artifact, arch, flag)
    return artifact


def _check_arch(artifact: Artifact, arch: str | None, flag: str) -> None:
    if arch is not None and arch != artifact.arch:
        raise UserError(
            f"{flag} {artifact.path}: pretrained as {artifact.arch}, but --arch {arch} was asked for; "
            f"drop --arch or pretrain {arch}"
        )


def finetune_start(
    source: Path | None, scratch: bool, arch: str | None, image_size: int | None, paths: Sequence[Path],
    channels: str = "auto", window: str | None = None, seed: int = 0,
) -> Start:  # fmt: skip
    """The pretrained backbone at `source`, or with `scratch` and none there, random init.

    The image size is the backbone's unless `image_size` is given; a scratch start without a
    backbone takes it from the images (`paths`) and its stem from the size, and its channels and
    window from `--channels`/`--window` and the images (`data_start`); a backbone brings its own.

    Raises:
        UserError: no backbone and not `scratch`, an `arch` the backbone was not pretrained as, or
            `--channels`/`--window` against the backbone's own.
    """
    artifact: Artifact | None = None
    try:
        artifact = load_pretrained(source, arch=None)  # the arch is checked below, --scratch or not
    except UserError:
        if not scratch:
            raise
    if artifact is None:
        return data_start(None, arch, None, image_size, paths, channels, window, seed)
    _check_arch(artifact, arch, "--from")
    spec = artifact.spec
    _check_decoding(artifact, channels, window)
    size = spec.image_size if image_size is None else image_size
    return Start(artifact, spec.arch, size, spec.small_stem, spec.mean, spec.std, channels=spec.channels,
                 window=spec.window, file_windows=spec.file_windows)  # fmt: skip


def _check_decoding(artifact: Artifact, channels: str, window: str | None) -> None:
    """Refuses `--channels`/`--window` that differ from what the backbone at `artifact` was trained on."""
    spec = artifact.spec
    asked = parse_channels(channels)
    if asked is not None and asked != spec.channels:
        raise UserError(
            f"--channels {channels}: the backbone {artifact.path} was pretrained on {spec.channels} "
            "channel(s); drop --channels (it follows the backbone) or pretrain again"
        )
    if window is not None and parse_window(window) != spec.window:
        raise UserError(
            f"--window {window}: the backbone {artifact.path} was pretrained with window {spec.window}; "
            "drop --window (it follows the backbone) or pretrain again"
        )


def survey_options(paths: Sequence[Path], channels: str, window: str | None, seed: int) -> ImageSurvey:
    """The images' channels, window and statistics from a sample seeded by `seed`, as `--channels`
    and `--window` ask (`labelfew.data.survey.survey_images`; a window given by hand applies to
    DICOM files too).

    Raises:
        UserError: files of more than 3 channels whose counts differ (naming two), or whose count
            is not the one asked for.
    """
    surveyed = survey_images(
        paths, channels=parse_channels(channels), window=parse_window(window), file_windows=window is None,
        seed=seed,
    )  # fmt: skip
    many = surveyed.multichannel
    if many is not None and surveyed.channels != many:  # no decoder drops channels silently
        raise UserError(
            f"--channels {channels}: the images have {many} channels (--channels auto takes 1 or 3); "
            f"pass --channels {many} to train on all of them"
        )
    return surveyed


def data_start(
    init: Init | None, arch: str | None, prefix: str | None, image_size: int | None, paths: Sequence[Path],
    channels: str, window: str | None, seed: int,
) -> Start:  # fmt: skip
    """A start without a pretrain artifact — `init`'s weights (`init_start`) or random init —
    fed the images at `paths` as `--channels`/`--window` and a seeded survey of them say
    (`survey_options`, `fed_by`): an RGB init of a gray folder becomes a 1-channel model."""
    surveyed = survey_options(paths, channels, window, seed)
    if init is not None:
        start = init_start(init, arch, prefix, image_size, None, paths, channels=surveyed.channels)
    else:
        size = typical_image_side(list(paths)) if image_size is None else image_size
        mean, std = imagenet_statistics(surveyed.channels)
        start = Start(
            None, arch or DEFAULT_ARCH, size, uses_small_stem(size), mean, std, channels=surveyed.channels
        )
    return fed_by(start, surveyed)


def fed_by(start: Start, survey: ImageSurvey) -> Start:
    """`start` fed the images `survey` describes: their channels and window; a random init also
    takes their mean and std, except for 3 channels, which keep ImageNet's (every RGB figure in
    benchmarks/RESULTS.md was trained with them, and timm's backbones expect them).

    A start from weights (`--init`, a pretrain artifact) keeps the mean and std they were trained
    with; its channel count must already be the survey's (`init_start`'s ``channels``).
    """
    assert start.channels == survey.channels, "adapt the init to the survey's channels first"
    mean, std = start.mean, start.std
    if start.init is None and start.artifact is None and survey.channels != 3 and survey.mean:
        mean, std = survey.mean, survey.std
    return dataclasses.replace(
        start, mean=mean, std=std, window=survey.window, file_windows=survey.file_windows
    )


@dataclasses.dataclass(frozen=True)
class FrozenBackbone:
    """`--init`'s backbone alone, loaded, and the spec that feeds it images.

    What `evaluate`, `select` and `embed` run in place of a pretrain artifact: the inference loop
    (`labelfew.use.inference.run_model`) takes a module and a spec, so an init needs no file.
    """

    model: nn.Module
    spec: ModelSpec
    init: Init


def frozen_backbone(init: Init, paths: Sequence[Path], image_size: int | None = None) -> FrozenBackbone:
    """The backbone `init` holds, as it was trained: its own stem, mean/std and (when recorded) size.

    The image size is the init's own when it records one (a labelfew run or export: the size its
    features were learnt at), else `image_size` (evaluate passes its run's models' size, so every
    row sees the same pixels), else the typical side of `paths` (as training would choose). A
    weights file without a stem of labelfew's keeps its pretrained stem: the features are the
    init's, never a half-random small stem's.
    """
    size = init.image_size or image_size or typical_image_side(list(paths))
    start = init_start(init, arch=None, prefix=None, image_size=size, small_stem=None, paths=paths)
    backbone = build_backbone(
        start.arch, small_stem=start.small_stem, image_size=start.image_size, channels=start.channels
    )
    start.load_into(backbone)
    spec = start.spec(int(backbone.num_features))  # type: ignore[arg-type]
    return FrozenBackbone(backbone, spec, init)
