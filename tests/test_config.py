"""Configs: defaults < recipe < command-line options, and one clear line for a bad recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from labelfew.config import (
    COMMAND_CONFIGS,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    PredictConfig,
    PretrainConfig,
    SubsetConfig,
    build_config,
    command_tables,
    load_recipe,
    to_json,
)
from labelfew.errors import UserError
from labelfew.options import TABLE, Option, field_options, readme_tables


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
    assert config.labels == (Path("labels.csv"),)  # a repeatable option: one path is one file
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


# One declaration per option: every field carries its help, choices and range (labelfew.options).


def test_every_field_of_every_command_is_declared_with_help() -> None:
    for name, config_class in COMMAND_CONFIGS.items():
        for item, spec, _ in field_options(config_class):
            assert isinstance(item.metadata.get("option"), Option), f"{name}: {item.name} without option()"
            assert spec.help.strip(), f"{name}: {item.name} has no help"


@pytest.mark.parametrize(
    ("config_class", "values", "expected"),
    [
        (PretrainConfig, {"optimizer": "foo"}, "--optimizer foo: use one of lars, sgd, adamw"),
        (PretrainConfig, {"lr_rule": "cube"}, "--lr-rule cube: use one of sqrt, linear"),
        (PretrainConfig, {"augment_on": "gpu"}, "--augment-on gpu: use one of auto, device, workers"),
        (PretrainConfig, {"precision": "fp8"}, "--precision fp8: use one of auto, bf16, fp16, no"),
        (PretrainConfig, {"epochs": 0}, "--epochs 0: use at least 1"),
        (PretrainConfig, {"temperature": 0.0}, "--temperature 0.0: use a positive value"),
        (PretrainConfig, {"memory_budget": 0.0}, "--memory-budget 0.0: give a positive size"),
        (PretrainConfig, {"batch_size": 1}, "--batch-size 1: a contrastive batch needs at least 2"),
        (PretrainConfig, {"min_scale": 1.5}, r"--min-scale 1.5: use a value in \(0, 1\]"),
        (PretrainConfig, {"projection_depth": 4}, r"--projection-depth 4: use 2 \(SimCLR v1\) or 3"),
        (PretrainConfig, {"key_momentum": 0.99}, "--key-momentum: only with --queue K"),
        (PretrainConfig, {"key_momentum_ramp": True}, "--key-momentum-ramp: only with --queue K"),
        (FinetuneConfig, {"optimizer": "adam"}, "--optimizer adam: use one of sgd, lars, adamw"),
        (FinetuneConfig, {"val_fraction": 1.0}, r"--val-fraction 1.0: use a value in \[0, 1\)"),
        (FinetuneConfig, {"precision": "half"}, "--precision half: use one of"),
        (EvaluateConfig, {"knn_k": 0}, "--knn-k 0: use at least 1"),
        (PredictConfig, {"top_k": 0}, "--top-k 0: use at least 1"),
        (ExportConfig, {"format": "tflite"}, "--format tflite: use one of safetensors, onnx, both"),
        (SubsetConfig, {"fraction": 0.0}, r"--fraction 0.0: out of range; use a value in \(0, 1\]"),
        (SubsetConfig, {"fraction": 0.5, "per_class": 3}, "give exactly one of --fraction or --per-class"),
    ],
)
def test_bad_choices_and_ranges_name_the_flag(config_class: type, values: dict, expected: str) -> None:
    required = {"data": "d", "labels": "l", "test": "t", "images": "i", "out": "o.csv"}
    names = {item.name for item, _, _ in field_options(config_class)}
    given = {key: value for key, value in required.items() if key in names} | values
    with pytest.raises(UserError, match=expected):
        build_config(config_class, {}, **given)


def test_recipe_values_are_validated_like_options(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, '[pretrain]\noptimizer = "adam"\n'))
    with pytest.raises(UserError, match="--optimizer adam: use one of lars, sgd, adamw"):
        build_config(PretrainConfig, recipe, data="d")


def test_the_defaults_are_valid_and_resolved_values_too() -> None:
    PretrainConfig(data=Path("d"), augment_on="device", image_size=32, warmup_epochs=0.0, small_stem=True)
    for name, config_class in COMMAND_CONFIGS.items():
        required = {item.name: "x" for item, spec, _ in field_options(config_class) if spec.help and
                    item.default is dataclasses.MISSING}  # fmt: skip
        extra = {"fraction": 0.5} if name == "subset" else {}
        build_config(config_class, {}, **required, **extra)


def test_readme_option_tables_are_the_generated_ones() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    tables = command_tables()
    found = [match[1] for match in TABLE.finditer(readme)]
    assert sorted(found) == sorted(tables), "README needs one <!-- options: NAME --> block per command"
    assert readme_tables(readme, tables) == readme, (
        "README's option tables differ from labelfew/config/; run `python -m labelfew.options README.md`"
    )


def _with_required(config_class: type, values: dict) -> dict:
    """`values` plus a placeholder for each required field (and subset's one-of pair)."""
    required = {
        item.name: "x" for item, _, _ in field_options(config_class) if item.default is dataclasses.MISSING
    }
    extra = {"fraction": 0.5} if config_class is SubsetConfig and "fraction" not in values else {}
    return {**required, **extra, **values}


FLOAT_FIELDS = [
    (name, config_class, item.name)
    for name, config_class in COMMAND_CONFIGS.items()
    for item, spec, annotation in field_options(config_class)
    if "float" in str(annotation) and not spec.infinite
]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize(
    ("command", "config_class", "field"), FLOAT_FIELDS, ids=[f"{c} {f}" for c, _, f in FLOAT_FIELDS]
)
def test_every_float_option_must_be_finite(
    command: str, config_class: type, field: str, value: float
) -> None:
    # `--lr inf` passed `above=0` and failed after the data was read (issue 22, item 10)
    flag = "--" + field.replace("_", "-") if field != "source" else "--from"
    with pytest.raises(UserError, match=rf"{flag} {value}: use a finite number"):
        build_config(config_class, {}, **_with_required(config_class, {field: value}))


SEED_FIELDS = [
    (name, config_class) for name, config_class in COMMAND_CONFIGS.items()
    if "seed" in {item.name for item in dataclasses.fields(config_class)}
]  # fmt: skip


@pytest.mark.parametrize(("command", "config_class"), SEED_FIELDS, ids=[name for name, _ in SEED_FIELDS])
def test_every_seed_is_in_numpys_range(command: str, config_class: type) -> None:
    # `--seed -1` failed in numpy after the lr search (issue 22, item 10)
    for bad in (-1, 2**32):
        with pytest.raises(UserError, match=rf"--seed {bad}: use a value from 0 to 4294967295"):
            build_config(config_class, {}, **_with_required(config_class, {"seed": bad}))
    assert (
        build_config(config_class, {}, **_with_required(config_class, {"seed": 2**32 - 1})).seed == 2**32 - 1
    )


@pytest.mark.parametrize("config_class", [PretrainConfig, FinetuneConfig])
def test_image_size_has_a_sane_maximum(config_class: type) -> None:
    # `--image-size 100000` tried to allocate 1.9 TB after reading the images (issue 22, item 10)
    with pytest.raises(UserError, match=r"--image-size 100000: use a side from 8 to 1024 px"):
        build_config(config_class, {}, **_with_required(config_class, {"image_size": 100000}))
    assert (
        build_config(config_class, {}, **_with_required(config_class, {"image_size": 1024})).image_size
        == 1024
    )


def test_a_recipe_inf_is_refused_like_an_option(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, "[pretrain]\nweight_decay = inf\n"))
    with pytest.raises(UserError, match="--weight-decay inf: use a finite number, at least 0"):
        build_config(PretrainConfig, recipe, data="d")
