"""`--override SECTION.KEY=VALUE` of the benchmark scripts, nested tables included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from label_efficiency import apply_overrides


def test_an_override_sets_a_nested_table_and_leaves_the_recipe_alone() -> None:
    recipe = {"benchmark": {"fixmatch": {"threshold": 0.8, "epochs": 40}}, "pretrain": {"epochs": 50}}
    changed = apply_overrides(recipe, ["benchmark.fixmatch.threshold=0.95", "pretrain.lr_rule=sqrt"])
    assert changed == {
        "benchmark": {"fixmatch": {"threshold": 0.95, "epochs": 40}},
        "pretrain": {"epochs": 50, "lr_rule": "sqrt"},
    }
    assert recipe["benchmark"]["fixmatch"]["threshold"] == 0.8  # a deep copy


@pytest.mark.parametrize("item", ["threshold=0.9", "pretrain.=1", ".epochs=3", "pretrain.epochs="])
def test_a_malformed_override_says_how_to_write_it(item: str) -> None:
    with pytest.raises(SystemExit, match=r"SECTION\.KEY=VALUE"):
        apply_overrides({}, [item])
