"""Configs: defaults < recipe < command-line options, and one clear line for a bad recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from labelfew.config import (
    EvaluateConfig,
    FinetuneConfig,
    PretrainConfig,
    build_config,
    load_recipe,
    to_json,
)
from labelfew.errors import UserError


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_recipe_and_options_in_order_of_precedence(tmp_path: Path) -> None:
    recipe = load_recipe(
        _recipe(
            tmp_path, '[pretrain]\nepochs = 7\narch = "resnet50"\ntemperature = 0.2\n[finetune]\nlr = 0.3\n'
        )
    )
    config = build_config(PretrainConfig, recipe, data="images", epochs=3, temperature=None)
    assert config.epochs == 3  # option beats recipe
    assert config.arch == "resnet50"  # recipe beats default
    assert config.temperature == 0.2  # an option left at None does not override the recipe
    assert config.batch_size == PretrainConfig(data=Path("x")).batch_size  # default
    finetune = build_config(FinetuneConfig, recipe, labels="l.csv")
    assert finetune.lr == 0.3 and finetune.epochs == 60


def test_no_recipe_gives_the_defaults() -> None:
    assert load_recipe(None) == {}
    assert build_config(EvaluateConfig, {}, test=Path("t")) == EvaluateConfig(test=Path("t"))


def test_strings_become_paths_for_path_fields(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, '[finetune]\nout = "runs/x"\n'))
    config = build_config(FinetuneConfig, recipe, labels="labels.csv", source="runs/a")
    assert config.labels == Path("labels.csv")
    assert config.source == Path("runs/a")
    assert config.out == Path("runs/x")
    assert config.arch is None  # a str | None field stays as given


def test_unknown_key_names_the_section_and_the_valid_keys(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, "[pretrain]\nepochz = 3\n"))
    with pytest.raises(UserError, match=r"recipe \[pretrain\]: unknown key\(s\) \['epochz'\].*epochs"):
        build_config(PretrainConfig, recipe, data="d")
    build_config(FinetuneConfig, recipe, labels="l")  # other sections do not care


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown section\(s\) \['pretrian'\]"):
        load_recipe(_recipe(tmp_path, "[pretrian]\nepochs = 3\n"))


def test_benchmark_and_recipe_sections_are_allowed(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, '[recipe]\nname = "x"\n[benchmark]\nseeds = [0, 1]\n'))
    assert recipe["benchmark"] == {"seeds": [0, 1]}


def test_a_section_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="pretrain must be a \\[section\\] table"):
        load_recipe(_recipe(tmp_path, "pretrain = 3\n"))


@pytest.mark.parametrize(
    "text",
    ["[pretrain\nepochs = 3\n", "[pretrain]\nepochs = = 3\n", "[pretrain]\nepochs = 3\nepochs = 4\n"],
)
def test_bad_toml_names_the_file(tmp_path: Path, text: str) -> None:
    path = _recipe(tmp_path, text)
    with pytest.raises(UserError, match=f"--recipe {path}: not valid TOML"):
        load_recipe(path)


def test_non_utf8_recipe_and_missing_recipe(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[pretrain]\narch = "r\xe9snet"\n')
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(path)
    with pytest.raises(UserError, match=r"absent.toml: no such file"):
        load_recipe(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('epochs = "100"', "epochs = '100': expected int"),
        ("epochs = 1.5", "epochs = 1.5: expected int"),
        ("epochs = true", "epochs = True: expected int"),
        ("small_stem = 1", "small_stem = 1: expected bool"),
        ("arch = 18", "arch = 18: expected str"),
        ('temperature = "low"', "temperature = 'low': expected float"),
        ("out = 3", "out = 3: expected Path"),
    ],
)
def test_recipe_values_of_the_wrong_type_are_refused(tmp_path: Path, line: str, expected: str) -> None:
    recipe = load_recipe(_recipe(tmp_path, f"[pretrain]\n{line}\n"))
    with pytest.raises(UserError, match=rf"recipe \[pretrain\] {expected}"):
        build_config(PretrainConfig, recipe, data="d")


def test_integers_are_accepted_where_floats_are_expected(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, "[pretrain]\nbase_lr = 1\nwarmup_epochs = 10\n"))
    config = build_config(PretrainConfig, recipe, data="d")
    assert config.base_lr == 1 and config.warmup_epochs == 10


def test_configs_are_frozen_and_json_ready() -> None:
    config = build_config(PretrainConfig, {}, data="images", out="runs/x")
    with pytest.raises(AttributeError):
        config.epochs = 1  # type: ignore[misc]
    values = to_json(config)
    assert values["data"] == "images" and values["out"] == "runs/x"
    assert values["epochs"] == config.epochs and values["small_stem"] is None
