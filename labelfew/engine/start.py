"""Where a fine-tuning stage's weights come from: a pretrain artifact, or random init.

`finetune` starts from `--from`'s pretrained backbone (or from nothing with `--scratch`);
`distill`'s student from `--from-pretrain`'s. Both refuse an `--arch` that is not the one the
backbone was pretrained as, with the same line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from labelfew.artifacts import Artifact, load_artifact, resolve_artifact
from labelfew.data.images import typical_image_side
from labelfew.errors import UserError
from labelfew.spec import IMAGENET_MEAN, IMAGENET_STD, uses_small_stem

DEFAULT_ARCH = "resnet18"
"""The architecture of a `--scratch` fine-tuning without `--arch`: SimCLR's CIFAR-10 backbone."""


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the weights come from: the pretrain artifact, or nothing (scratch)."""

    artifact: Artifact | None
    arch: str
    image_size: int
    small_stem: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


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
    source: Path | None, scratch: bool, arch: str | None, image_size: int | None, paths: Sequence[Path]
) -> Start:
    """The pretrained backbone at `source`, or with `scratch` and none there, random init.

    The image size is the backbone's unless `image_size` is given; a scratch start without a
    backbone takes it from the images (`paths`) and its stem from the size.

    Raises:
        UserError: no backbone and not `scratch`, or an `arch` the backbone was not pretrained as.
    """
    artifact: Artifact | None = None
    try:
        artifact = load_pretrained(source, arch=None)  # the arch is checked below, --scratch or not
    except UserError:
        if not scratch:
            raise
    if artifact is not None:
        _check_arch(artifact, arch, "--from")
        spec = artifact.spec
        size = spec.image_size if image_size is None else image_size
        return Start(artifact, spec.arch, size, spec.small_stem, spec.mean, spec.std)
    size = typical_image_side(list(paths)) if image_size is None else image_size
    return Start(None, arch or DEFAULT_ARCH, size, uses_small_stem(size), IMAGENET_MEAN, IMAGENET_STD)
