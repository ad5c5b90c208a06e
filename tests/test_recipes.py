"""Every shipped recipe parses into valid configs (a typo in a key fails here, not an hour into a run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from labelfew.config import EvaluateConfig, FinetuneConfig, PretrainConfig, build_config, load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.toml"))


def test_recipes_exist() -> None:
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_builds_every_stage_config(recipe: Path) -> None:
    loaded = load_recipe(recipe)
    pretrain = build_config(PretrainConfig, loaded, data=Path("images"))
    finetune = build_config(FinetuneConfig, loaded, labels=Path("labels.csv"))
    build_config(EvaluateConfig, loaded, test=Path("test.csv"))
    assert pretrain.epochs >= 1 and pretrain.batch_size >= 2
    assert finetune.epochs >= 1
    assert pretrain.optimizer in ("lars", "sgd", "adamw")
    if finetune.from_head_layer:
        assert pretrain.projection_depth > finetune.from_head_layer
