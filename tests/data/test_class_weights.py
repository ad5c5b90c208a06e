"""`--class-weights` and the imbalance rules (`labelfew.data.class_weights`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from labelfew.data.class_weights import (
    auto_weights,
    class_weights,
    imbalance,
    imbalance_warning,
    read_class_weights,
)
from labelfew.errors import UserError

CLASSES = ["ant", "bee", "wasp"]


@pytest.mark.parametrize("counts", [(1756, 111, 400), (5, 5, 5), (1, 2, 97)])
def test_auto_is_sklearns_balanced_weight(counts: tuple[int, int, int]) -> None:
    labels = np.array([name for name, count in zip(CLASSES, counts, strict=True) for _ in range(count)])
    expected = compute_class_weight("balanced", classes=np.array(CLASSES), y=labels)
    weights = auto_weights(dict(zip(CLASSES, counts, strict=True)))
    assert [weights[name] for name in CLASSES] == pytest.approx(expected.tolist())
    assert sum(w * n for w, n in zip(weights.values(), counts, strict=True)) == pytest.approx(sum(counts))


def test_a_file_gives_its_weights_in_class_order(tmp_path: Path) -> None:
    path = tmp_path / "weights.csv"
    path.write_text("class,weight\nwasp,3\nant, 0.5\nbee,1e0\n")
    assert class_weights(str(path), CLASSES, {}) == [0.5, 1.0, 3.0]
    assert class_weights("none", CLASSES, {}) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("class,weight\nant,1\nbee,1\nwasp,1\nmoth,2\n", ":5: class 'moth' is not a class of the labels"),
        ("class,weight\nant,1\nbee,1\n", "no weight for class 'wasp'"),
        ("class,weight\nant,1\nbee,0\nwasp,1\n", ":3: class 'bee' has weight '0'; use a positive finite"),
        ("class,weight\nant,-2\nbee,1\nwasp,1\n", ":2: class 'ant' has weight '-2'"),
        ("class,weight\nant,inf\nbee,1\nwasp,1\n", "class 'ant' has weight 'inf'"),
        ("class,weight\nant,nan\nbee,1\nwasp,1\n", "class 'ant' has weight 'nan'"),
        ("class,weight\nant,heavy\nbee,1\nwasp,1\n", "class 'ant' has weight 'heavy'"),
        ("class,weight\nant,1\nant,2\nbee,1\nwasp,1\n", ":3: class 'ant' is given twice"),
        ("name,value\nant,1\n", "the header must be class,weight"),
    ],
)
def test_a_bad_file_names_itself_and_the_class(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "weights.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=r"--class-weights .*weights\.csv") as error:
        read_class_weights(path, CLASSES)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_the_warning_names_the_largest_and_smallest_class_from_10_times() -> None:
    assert imbalance_warning({"ant": 99, "bee": 10, "wasp": 50}, "labels.csv", "use weights") is None
    line = imbalance_warning({"ant": 100, "bee": 10, "wasp": 50}, "labels.csv", "use weights")
    assert line == "labels.csv: imbalanced classes: 'ant' has 100 images, 'bee' 10 (10×); use weights"


def test_the_balanced_headline_starts_at_1_5_times() -> None:
    assert imbalance({"ant": 14, "bee": 10})["headline"] == "top1"
    skew = imbalance({"ant": 15, "bee": 10, "wasp": 12})
    assert skew["headline"] == "balanced_accuracy" and (skew["largest"], skew["smallest"]) == ("ant", "bee")
