"""`--init SOURCE`: weights that already exist, read, matched to a backbone's keys and checked.

SOURCE is one of
- ``timm:NAME[.TAG]``: timm's own pretrained weights (``timm:resnet50.a1_in1k``), fetched by timm
  through the Hugging Face hub cache as timm always does;
- a weights file: ``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin`` read with
  ``torch.load(weights_only=True)`` (never a full unpickle);
- a folder written by ``labelfew export``, a labelfew run or stage folder, or an artifact file.

Checkpoints of other tools nest the backbone under a prefix (``backbone.``, ``module.encoder_q.``,
``state_dict.model.``): nested dicts are flattened to dotted keys, and the prefix is the one under
which every tensor of the architecture's backbone is found. The backbone is loaded strictly; the
rest (a classifier, a projection head, a momentum encoder) is skipped and counted. Every way this
can fail is one line naming the file and the first offending keys (`labelfew.errors.UserError`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from labelfew.artifacts import Artifact, load_artifact, read_weights, weights_metadata
from labelfew.errors import UserError
from labelfew.fileio import sha256_file
from labelfew.models import build_backbone
from labelfew.registry import resolve_artifact, stage_names

TIMM_PREFIX = "timm:"
OPTIONAL = "num_batches_tracked"
"""BatchNorm's step counter: not a weight, and absent from many checkpoints."""
SHOWN = 3
"""Offending keys named in a message."""


@dataclass(frozen=True)
class Init:
    """Weights to start a backbone from, matched to its architecture.

    Attributes:
        source: SOURCE as given.
        sha256: of the weights file (for timm, of the hub cache's file when found, else of the tensors).
        arch: the timm architecture the weights are for.
        tensors: the backbone's state dict, in timm's key layout (no prefix), every key present.
        skipped: keys of the source not loaded, and why.
        prefix: the prefix the backbone was found under ("" for none).
        mean, std: the normalisation the weights were trained with (None when the source has none).
        interpolation: the resize interpolation of the weights' config, when recorded.
        small_stem: the weights have labelfew's small-image stem (a labelfew artifact only).
        image_size: the labelfew artifact's image size, else None.
        channels: input channels of the first conv (`labelfew.engine.init_channels.adapt_init`).
    """

    source: str
    sha256: str
    arch: str
    tensors: dict[str, Tensor]
    skipped: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    small_stem: bool = False
    image_size: int | None = None
    channels: int = 3

    @property
    def name(self) -> str:
        """A short name for tables: the timm name, or the file or folder name."""
        return init_name(self.source)

    def summary(self) -> str:
        """One line: what was loaded, what was skipped and why."""
        line = f"init {self.source}: {len(self.tensors)} tensors loaded"
        if self.prefix:
            line += f" from under '{self.prefix}'"
        if self.skipped:
            reasons = Counter(self.skipped.values()).most_common()
            line += "; skipped " + ", ".join(f"{count} ({why})" for why, count in reasons)
        return line

    def record(self) -> dict[str, Any]:
        """What run.json and the artifact's metadata keep of the init (its lineage)."""
        return {"source": self.source, "sha256": self.sha256, "arch": self.arch, "prefix": self.prefix,
                "tensors_loaded": len(self.tensors), "tensors_skipped": len(self.skipped)}  # fmt: skip


def init_name(source: str) -> str:
    """`Init.name` of an `--init` SOURCE, also from the source a spec records (evaluate's labels)."""
    return source.removeprefix(TIMM_PREFIX) if source.startswith(TIMM_PREFIX) else Path(source).name


@dataclass(frozen=True)
class _Read:
    """Tensors read from a source, before matching, and what the source says about itself."""

    tensors: dict[str, Tensor]
    sha256: str
    arch: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    small_stem: bool = False
    image_size: int | None = None
    channels: int = 3


def read_init(
    source: str,
    arch: str | None = None,
    prefix: str | None = None,
    timm_overlay: dict[str, Any] | None = None,
) -> Init:
    """The backbone weights SOURCE names, matched to their architecture and checked.

    Args:
        source: ``timm:NAME[.TAG]``, a weights file, an export folder, or a labelfew run/artifact.
        arch: the architecture asked for (`--arch`); needed for a file that does not record one.
        prefix: the key prefix of the backbone (`--init-prefix`); found automatically when None.
        timm_overlay: timm's ``pretrained_cfg_overlay`` for a ``timm:`` source (``dict(file=...)``
            reads a local file through timm's own loading path: the tests, an air-gapped machine).

    Raises:
        UserError: every failure, in one line naming the source and the first offending keys.
    """
    read = _read_source(source, timm_overlay)
    if arch is not None and read.arch is not None and arch != read.arch:
        raise UserError(
            f"--init {source}: weights of {read.arch}, but --arch {arch} was asked for; drop --arch"
        )
    wanted = arch or read.arch
    if wanted is None:
        raise UserError(
            f"--init {source}: the file does not say which architecture it holds; pass --arch NAME"
        )
    expected = build_backbone(wanted, small_stem=read.small_stem, channels=read.channels).state_dict()
    chosen = _choose_prefix(source, read.tensors, expected, prefix)
    tensors, skipped = _match(source, read.tensors, expected, chosen)
    return Init(
        source=source, sha256=read.sha256, arch=wanted, tensors=tensors, skipped=skipped, prefix=chosen,
        mean=read.mean, std=read.std, interpolation=read.interpolation, small_stem=read.small_stem,
        image_size=read.image_size, channels=read.channels,
    )  # fmt: skip


def load_init(backbone: nn.Module, init: Init, small_stem: bool) -> list[str]:
    """Copies ``init``'s tensors into ``backbone`` (built with ``small_stem``), strictly.

    A pretrained ImageNet stem and labelfew's small-image stem differ in the first conv: when the
    backbone has the small stem and the weights do not, that conv stays random and is returned
    (the caller says so); every other tensor must load.

    Returns:
        The keys left at their random initialisation.
    """
    state = backbone.state_dict()
    kept = {key: value for key, value in init.tensors.items() if state[key].shape == value.shape}
    random = sorted(set(init.tensors) - set(kept))
    if random and not (small_stem and not init.small_stem):
        raise UserError(
            f"--init {init.source}: shapes differ from the model's for {', '.join(random[:SHOWN])}"
        )
    backbone.load_state_dict({**state, **kept}, strict=True)
    return random


def _read_source(source: str, timm_overlay: dict[str, Any] | None) -> _Read:
    if source.startswith(TIMM_PREFIX):
        return read_timm(source.removeprefix(TIMM_PREFIX), timm_overlay)
    path = Path(source)
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return _read_export(path)
        return _read_artifact(resolve_artifact(path, stage_names(("backbone", "classifier"))))
    if not path.is_file():
        raise UserError(
            f"--init {source}: no such file or folder; pass timm:NAME[.TAG], a .safetensors/.pth file, "
            "an exported folder or a labelfew run"
        )
    return _read_file(path)


def _read_file(path: Path) -> _Read:
    """A weights file (`labelfew.artifacts.read_weights`); a labelfew artifact with its spec (read
    once, by `load_artifact`, which also checks its sha256)."""
    metadata = weights_metadata(path, f"--init {path}")
    if "stage" in metadata and "arch" in metadata:
        return _read_artifact(path)
    tensors, metadata = read_weights(path, f"--init {path}")
    return _Read(tensors, sha256_file(path), arch=metadata.get("architecture") or metadata.get("arch"))


def _read_artifact(path: Path) -> _Read:
    artifact: Artifact = load_artifact(path)
    spec = artifact.spec
    tensors = artifact.tensors
    if spec.is_classifier:
        tensors = {
            key.removeprefix("backbone."): value
            for key, value in tensors.items()
            if key.startswith("backbone.")
        }
    return _Read(
        tensors, sha256_file(path), arch=spec.arch, mean=spec.mean, std=spec.std, small_stem=spec.small_stem,
        image_size=spec.image_size, channels=spec.channels,
    )  # fmt: skip


def _read_export(folder: Path) -> _Read:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"--init {folder}: unreadable config.json ({error})") from None
    section = config.get("labelfew", {})
    spec = section.get("spec", {}) if isinstance(section, dict) else {}
    cfg = config.get("pretrained_cfg", {})
    read = _read_file(folder / "model.safetensors")
    mean, std = cfg.get("mean"), cfg.get("std")
    return _Read(
        read.tensors, read.sha256, arch=config.get("architecture") or read.arch,
        mean=tuple(mean) if mean else None, std=tuple(std) if std else None,
        interpolation=cfg.get("interpolation"), small_stem=bool(spec.get("small_stem", False)),
        image_size=spec.get("image_size"), channels=int(cfg.get("input_size", [3])[0]),
    )  # fmt: skip


def read_timm(name: str, overlay: dict[str, Any] | None) -> _Read:
    """`timm.create_model(name, pretrained=True)`'s backbone weights, with its config's normalisation.

    ``overlay`` is passed as timm's ``pretrained_cfg_overlay`` (``dict(file=...)`` reads a local file,
    the way the tests and an air-gapped machine use timm's own loading path).
    """
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise UserError(f"--init timm:{name}: {arch} is not a timm model (see timm.list_models())")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        known = ", ".join(timm.list_pretrained(f"{arch}.*")[:5]) or "none"
        raise UserError(
            f"--init timm:{name}: timm has no weights tagged {tag!r} for {arch} (some it has: {known})"
        )
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except Exception as error:  # the hub's offline / not-cached / network errors, timm's RuntimeErrors
        raise UserError(_fetch_hint(name, error)) from None
    config: dict[str, Any] = dict(model.pretrained_cfg)  # type: ignore[arg-type]
    tensors = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return _Read(
        tensors, _timm_sha256(config, tensors), arch=arch, mean=tuple(config["mean"]), std=tuple(config["std"]),
        interpolation=config.get("interpolation"), channels=int(config.get("input_size", [3])[0]),
    )  # fmt: skip


def _fetch_hint(name: str, error: Exception) -> str:
    from huggingface_hub import constants

    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"--init timm:{name}: the weights are not in the hub cache {constants.HF_HUB_CACHE} and cannot be "
        f"fetched here ({type(error).__name__}: {why[:160]}); on a machine with a network run "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` and copy that cache folder here"
    )


def _timm_sha256(config: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """The sha256 of the file timm read, when it is found; else of the tensors' bytes."""
    file = config.get("file")
    if not file and config.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            cached = try_to_load_from_cache(config["hf_hub_id"], filename)
            if isinstance(cached, str):
                file = cached
                break
    if file and Path(file).is_file():
        return sha256_file(Path(file))
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _choose_prefix(
    source: str, tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], given: str | None
) -> str:
    """The prefix under which every required key of ``expected`` is found in ``tensors``."""
    required = [key for key in expected if not key.endswith(OPTIONAL)]
    counts: Counter[str] = Counter()
    for key in tensors:
        for wanted in required:
            if key.endswith(wanted) and (len(key) == len(wanted) or key[-len(wanted) - 1] == "."):
                counts[key[: len(key) - len(wanted)]] += 1
    if given is not None:
        if not any(key.startswith(given) for key in tensors):
            found = ", ".join(f"'{p}'" for p, _ in counts.most_common(SHOWN)) or "none"
            raise UserError(
                f"--init-prefix {given!r}: no key of {source} starts with it (prefixes found: {found})"
            )
        return given
    complete = sorted(p for p, count in counts.items() if count == len(required))
    if len(complete) > 1:
        raise UserError(
            f"--init {source}: a whole backbone is found under several prefixes ({', '.join(repr(p) for p in complete[:4])}); "
            "pass --init-prefix with the one to load"
        )
    if complete:
        return complete[0]
    if not counts:
        first = ", ".join(list(tensors)[:SHOWN])
        raise UserError(
            f"--init {source}: none of its tensors belongs to this backbone (first keys: {first}); check --arch"
        )
    return counts.most_common(1)[0][0]


def _match(
    source: str, tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], prefix: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The backbone's tensors found under ``prefix``, and every other key with why it was skipped."""
    found = {key: tensors[prefix + key] for key in expected if prefix + key in tensors}
    missing = [key for key in expected if key not in found and not key.endswith(OPTIONAL)]
    if missing:
        raise UserError(
            f"--init {source}: {len(missing)} tensors of the backbone are missing under prefix '{prefix}' "
            f"(first: {', '.join(missing[:SHOWN])}); check --arch or pass --init-prefix"
        )
    _check_shapes(source, found, expected)
    for key in expected:
        found.setdefault(key, expected[key].clone())  # num_batches_tracked, when the file has none
    used = {prefix + key for key in expected}
    skipped = {
        key: "not in the backbone (classifier or head)" if key.startswith(prefix) else f"outside '{prefix}'"
        for key in tensors
        if key not in used
    }
    return found, skipped


def _check_shapes(source: str, found: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    wrong = [key for key, value in found.items() if tuple(value.shape) != tuple(expected[key].shape)]
    if not wrong:
        return
    first = wrong[0]
    have, want = tuple(found[first].shape), tuple(expected[first].shape)
    if len(have) == 4 and have[0] == want[0] and have[2:] == want[2:] and have[1] != want[1]:
        raise UserError(
            f"--init {source}: {first} takes {have[1]} input channels, this model {want[1]}; "
            "use weights for the same number of channels"
        )
    shown = ", ".join(
        f"{key} {tuple(found[key].shape)} vs {tuple(expected[key].shape)}" for key in wrong[:SHOWN]
    )
    raise UserError(
        f"--init {source}: {len(wrong)} tensors differ in shape from the backbone's ({shown}); check --arch"
    )
