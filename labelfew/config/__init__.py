"""Frozen per-command configs: defaults < recipe (TOML) < command-line options.

A recipe lists only what it changes, in `[pretrain]`, `[finetune]` and `[evaluate]` tables
whose keys are the field names below. The resolved config is saved with every artifact, so
it is the recipe to rebuild the model.

Every option of every command is declared once, as a field with its type, default, help,
choices and range (`labelfew.options.option`): the training commands' in `training.py`,
`finetune.py` and `distill.py`, the others' in `commands.py`, the options several commands share in `shared.py`. The CLI is built
from these fields, and each config validates itself when it is made, so a bad value exits 2
before any image is read. Every public name is importable from `labelfew.config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from labelfew.config.commands import (
    DemoConfig,
    EmbedConfig,
    EvaluateConfig,
    ExportConfig,
    PredictConfig,
    SelectConfig,
    SimilarConfig,
    SubsetConfig,
)
from labelfew.config.distill import DistillConfig
from labelfew.config.finetune import FIXMATCH_OPTIONS, FinetuneConfig, FixMatchSettings
from labelfew.config.shared import (
    CHECKPOINT_EVERY,
    FROM,
    IMAGE_SIZE,
    INFERENCE_BATCH,
    LOGGER,
    PRECISION,
    QUIET,
    RESTART,
    SEED,
    WORKERS,
    Validated,
)
from labelfew.config.training import PretrainConfig
from labelfew.options import markdown_table, merge, read_recipe

__all__ = [
    "CHECKPOINT_EVERY",
    "COMMAND_CONFIGS",
    "FIXMATCH_OPTIONS",
    "FROM",
    "IMAGE_SIZE",
    "INFERENCE_BATCH",
    "LOGGER",
    "PRECISION",
    "QUIET",
    "RESTART",
    "SEED",
    "WORKERS",
    "DemoConfig",
    "DistillConfig",
    "EmbedConfig",
    "EvaluateConfig",
    "ExportConfig",
    "FinetuneConfig",
    "FixMatchSettings",
    "PredictConfig",
    "PretrainConfig",
    "SelectConfig",
    "SimilarConfig",
    "SubsetConfig",
    "Validated",
    "build_config",
    "command_tables",
    "load_recipe",
    "takes_recipe",
    "to_json",
]

Config = TypeVar("Config")

_SECTIONS: dict[type, str] = {
    PretrainConfig: "pretrain",
    FinetuneConfig: "finetune",
    DistillConfig: "distill",
    EvaluateConfig: "evaluate",
}

COMMAND_CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "subset": SubsetConfig,
    "select": SelectConfig,
    "finetune": FinetuneConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "demo": DemoConfig,
    "predict": PredictConfig,
    "embed": EmbedConfig,
    "similar": SimilarConfig,
    "export": ExportConfig,
}  # every command's config; the CLI and README's option tables are built from these


def takes_recipe(config_class: type) -> bool:
    """Whether a command reads a recipe section (`--recipe`): pretrain, finetune, evaluate."""
    return config_class in _SECTIONS


def command_tables() -> dict[str, str]:
    """README's option table of every command, by command name."""
    return {
        name: markdown_table(config_class, recipe=takes_recipe(config_class))
        for name, config_class in COMMAND_CONFIGS.items()
    }


def load_recipe(path: Path | None) -> dict[str, dict[str, Any]]:
    """Reads a recipe TOML file into {section: {field: value}}.

    Raises:
        UserError: missing file, TOML syntax error, or an unknown section.
    """
    return read_recipe(path, tuple(_SECTIONS.values()))


def build_config(config_class: type[Config], recipe: dict[str, dict[str, Any]], **options: Any) -> Config:
    """Defaults < the recipe's section < options that are not None; validated (see `_Validated`).

    Raises:
        UserError: an unknown recipe key, a recipe value of the wrong type, or a bad value
            (a choice or range of `labelfew.options.Option`), before any work is done.
    """
    return merge(config_class, _SECTIONS.get(config_class), recipe, options)


def to_json(config: Any) -> dict[str, Any]:
    """A config as JSON-ready values (paths as strings)."""
    return {
        key: str(value)
        if isinstance(value, Path)
        else tuple(str(each) if isinstance(each, Path) else each for each in value)
        if isinstance(value, tuple)
        else value
        for key, value in dataclasses.asdict(config).items()
    }
