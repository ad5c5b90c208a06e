"""Frozen per-stage configs: defaults < recipe (TOML) < command-line options.

A recipe lists only what it changes, in `[pretrain]`, `[finetune]` and `[evaluate]` tables
whose keys are the field names below. The resolved config is saved with every artifact, so
it is the recipe to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from labelfew.errors import UserError


@dataclass(frozen=True)
class PretrainConfig:
    """SimCLR pretraining. Defaults suit a folder of a few thousand images on one GPU."""

    data: Path
    out: Path | None = None
    arch: str = "resnet18"
    small_stem: bool | None = None  # None: automatic, on for images of 64 px or less
    image_size: int | None = None  # None: median side of the images, capped at 224
    epochs: int = 100
    batch_size: int = 256  # global batch: per process × processes
    optimizer: str = "lars"
    lr_rule: str = (
        "sqrt"  # sqrt: 0.075 × √B (paper appendix B.1, better for small batches); linear: 0.3 × B/256
    )
    base_lr: float | None = None  # None: 0.075 (sqrt) or 0.3 (linear); for sgd/adamw the lr itself
    weight_decay: float = 1e-6
    warmup_epochs: float | None = None  # None: 10, or 10% of the epochs for short runs
    temperature: float = 0.5  # 0.5 for CIFAR-size batches, 0.1 for batches of 4096
    projection_dim: int = 128
    projection_depth: int = 2  # 2: SimCLR v1, 3: SimCLR v2
    projection_hidden: int | None = None  # None: the backbone's num_features
    color_strength: float | None = None  # None: 0.5 for images of 64 px or less, else 1.0
    min_scale: float = 0.08
    blur: bool | None = None  # None: on above 32 px, off at 32 px and less
    precision: str = "auto"  # auto: bf16 on GPUs that support it, else no
    augment_on: str = (
        "auto"  # device: decoded in memory, batched views; workers: per image; auto: device if it fits
    )
    memory_budget: float = 4.0  # GiB of decoded images that --augment-on device may hold
    compile: bool = False  # torch.compile the model
    workers: int | None = None
    seed: int = 0
    max_bad_fraction: float = 0.01
    sync_bn: bool | None = None  # None: SyncBatchNorm with more than one CUDA process (GPU-only)
    checkpoint_every: float = 10.0  # minutes between checkpoints (also one at every epoch end)
    restart: bool = False  # ignore (and delete) this run's checkpoints instead of resuming
    quiet: bool = False


@dataclass(frozen=True)
class FinetuneConfig:
    """Supervised fine-tuning on the labelled subset (SimCLRv2 appendix: SGD, few epochs)."""

    labels: Path
    source: Path | None = None  # pretrain artifact/run folder; None: latest run
    scratch: bool = False  # same architecture, random init: the baseline
    out: Path | None = None
    epochs: int = 60  # SimCLRv2 uses 60 epochs for 1% labels and 30 for 10%
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05  # for batch 64 (SGD + momentum 0.9, cosine decay)
    weight_decay: float = 0.0
    from_head_layer: int = 0  # SimCLRv2 fine-tunes from layer 1 of a 3-layer head
    balanced: bool = False  # sample every class equally often
    label_smoothing: float = 0.0
    val_fraction: float = 0.0
    image_size: int | None = None  # None: the pretrain artifact's
    arch: str | None = None  # checked against the artifact; for scratch without one, default resnet18
    precision: str = "auto"
    workers: int | None = None
    seed: int = 0
    checkpoint_every: float = 10.0  # minutes between checkpoints (also one at every epoch end)
    restart: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class EvaluateConfig:
    """kNN, linear probe and fine-tuned accuracy on a labelled test set."""

    test: Path
    source: Path | None = None  # finetune or pretrain artifact/run folder; None: latest run
    bank: Path | None = None  # labelled images for kNN/linear probe; None: the finetune labels
    out: Path | None = None
    knn_k: int = 200
    knn_temperature: float = 0.1  # Wu et al. 2018 (arXiv 1805.01978), as in DINO's eval_knn
    probe_holdout: float = 0.2  # part of the bank used to choose the probe's C
    random_baseline: bool = False  # add a kNN row on randomly initialised features
    plots: bool = False  # PNG figures + report.html beside report.json (needs matplotlib)
    batch_size: int = 256
    workers: int | None = None
    seed: int = 0
    quiet: bool = False


Config = TypeVar("Config", PretrainConfig, FinetuneConfig, EvaluateConfig)

_SECTIONS = {PretrainConfig: "pretrain", FinetuneConfig: "finetune", EvaluateConfig: "evaluate"}


def load_recipe(path: Path | None) -> dict[str, dict[str, Any]]:
    """Reads a recipe TOML file into {section: {field: value}}.

    Raises:
        UserError: missing file, TOML syntax error, or an unknown section.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--recipe {path}: no such file (recipes are TOML files, see recipes/)")
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--recipe {path}: not valid TOML ({error})") from None
    unknown = set(recipe) - set(_SECTIONS.values()) - {"recipe", "benchmark"}  # [benchmark]: benchmarks/
    if unknown:
        raise UserError(
            f"--recipe {path}: unknown section(s) {sorted(unknown)}; use [pretrain], [finetune], [evaluate]"
        )
    not_tables = [name for name, value in recipe.items() if not isinstance(value, dict)]
    if not_tables:
        raise UserError(
            f"--recipe {path}: {', '.join(not_tables)} must be a [section] table of settings, not a value"
        )
    return recipe


def build_config(config_class: type[Config], recipe: dict[str, dict[str, Any]], **options: Any) -> Config:
    """Defaults < the recipe's section < options that are not None."""
    section = dict(recipe.get(_SECTIONS[config_class], {}))
    names = {item.name: item for item in fields(config_class)}
    unknown = set(section) - set(names)
    if unknown:
        raise UserError(
            f"recipe [{_SECTIONS[config_class]}]: unknown key(s) {sorted(unknown)}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    for key, value in section.items():
        _check_recipe_value(_SECTIONS[config_class], key, str(names[key].type), value)
    values = {**section, **{key: value for key, value in options.items() if value is not None}}
    for key, value in values.items():
        if "Path" in str(names[key].type) and isinstance(value, str):
            values[key] = Path(value)
    return config_class(**values)


_RECIPE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "Path": (str,),
}


def _check_recipe_value(section: str, key: str, annotation: str, value: Any) -> None:
    """Refuses a recipe value of the wrong TOML type (`epochs = "100"`), which would otherwise fail
    deep inside a run; annotations are strings such as `int | None` (postponed evaluation)."""
    allowed = [_RECIPE_TYPES.get(part.strip()) for part in annotation.split("|") if part.strip() != "None"]
    if any(kinds is None for kinds in allowed):
        return  # a type this check does not know: leave it to the dataclass
    kinds = tuple(kind for group in allowed if group for kind in group)
    is_bool = isinstance(value, bool)
    if not isinstance(value, kinds) or (is_bool and bool not in kinds):
        expected = " or ".join(part.strip() for part in annotation.split("|") if part.strip() != "None")
        raise UserError(f"recipe [{section}] {key} = {value!r}: expected {expected}; fix the recipe file")


def to_json(config: Any) -> dict[str, Any]:
    """A config as JSON-ready values (paths as strings)."""
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in dataclasses.asdict(config).items()
    }
