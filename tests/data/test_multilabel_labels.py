"""Multi-label CSVs (`path,labels` with a delimiter, one 0/1 column per class) read against
hand-written expectations, bad ones refused with exit 2 naming file and row, and the greedy cover
subset and held-out split keeping a positive of every class."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from labelfew.cli import app
from labelfew.data.labelled import held_out_split
from labelfew.data.labels import read_label_files, read_labels
from labelfew.data.multilabel import decode
from labelfew.data.subsets import cover_subset
from labelfew.errors import UserError

runner = CliRunner()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in "abcd":
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    return tmp_path


def _write(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder / name


def _sets(path: Path, **kwargs: str) -> dict[str, list[str]]:
    labeled = read_labels(path, **kwargs)
    return {Path(p).name: decode(label) for p, label in zip(labeled.paths, labeled.labels, strict=True)}


def test_delimited_and_column_files_read_to_the_same_sets(folder: Path) -> None:
    delimited = _write(folder, "d.csv", "path,labels\na.png,dent|scratch\nb.png,scratch\nc.png,\n")
    columns = _write(folder, "c.csv", "path,dent,scratch\na.png,1,1\nb.png,0,1\nc.png,0,0\n")
    expected = {"a.png": ["dent", "scratch"], "b.png": ["scratch"], "c.png": []}
    assert _sets(delimited) == expected == _sets(columns)
    labeled = read_labels(columns)
    assert labeled.multi_label and labeled.class_names == ["dent", "scratch"]
    assert labeled.counts() == {"dent": 1, "scratch": 2}
    assert labeled.label_indices(["dent", "scratch"]) == [0b11, 0b10, 0b00]


def test_a_label_column_with_the_delimiter_is_multi_label_and_plain_files_stay_single(folder: Path) -> None:
    other = _write(folder, "o.csv", "path,label\na.png,dent;scratch\nb.png,dent\n")
    assert _sets(other, delimiter=";") == {"a.png": ["dent", "scratch"], "b.png": ["dent"]}
    plain = read_labels(_write(folder, "p.csv", "path,label\na.png,dent\nb.png,scratch\n"))
    assert not plain.multi_label and plain.labels == ("dent", "scratch")
    assert plain.label_indices(plain.class_names) == [0, 1]


def test_a_single_label_round_merged_into_a_multi_label_one_becomes_sets_of_one(folder: Path) -> None:
    first = _write(folder, "1.csv", "path,labels\na.png,dent|scratch\n")
    second = _write(folder, "2.csv", "path,label\nb.png,dent\n")
    merged = read_label_files([first, second])
    assert merged.multi_label and [decode(label) for label in merged.labels] == [
        ["dent", "scratch"],
        ["dent"],
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("path,dent,scratch\na.png,1,1\nb.png,0,2\n", "m.csv:3: column 'scratch' is '2'"),
        ("path,dent,scratch\na.png,0,1\nb.png,0,1\n", "m.csv:1: class column 'dent' has no positive"),
        ("path,labels\na.png,\nb.png,\n", "m.csv: no image has any class"),
    ],
)
def test_bad_multi_label_csv_exits_2_naming_file_and_row(folder: Path, text: str, expected: str) -> None:
    path = _write(folder, "m.csv", text)
    result = runner.invoke(app, ["subset", str(path), "--out", str(folder / "out.csv"), "--per-class", "1"])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_a_class_the_model_does_not_know_is_refused_naming_the_image(folder: Path) -> None:
    labeled = read_labels(_write(folder, "t.csv", "path,labels\na.png,dent\nb.png,dent|rust\n"))
    with pytest.raises(UserError, match=r"b.png .*class 'rust' is not a class of the model"):
        labeled.label_indices(["dent", "scratch"])


def _many(folder: Path) -> Path:
    rows = ["path,labels"]
    for index in range(40):
        Image.new("RGB", (8, 8)).save(folder / f"i{index}.png")
        names = ["common"] + (["rare"] if index == 17 else []) + (["mid"] if index % 5 == 0 else [])
        rows.append(f"i{index}.png,{'|'.join(names)}")
    return _write(folder, "many.csv", "\n".join(rows) + "\n")


@pytest.mark.parametrize("seed", range(4))
def test_cover_subset_keeps_a_positive_of_every_class(folder: Path, seed: int) -> None:
    full = read_labels(_many(folder))
    small = cover_subset(full, fraction=0.05, seed=seed)
    assert small.class_names == ["common", "mid", "rare"] and len(small) == 2
    two = cover_subset(full, per_class=2, seed=seed)
    assert min(two.counts().values()) == 1 and two.counts()["mid"] >= 2  # rare has one image only
    assert cover_subset(full, fraction=0.05, seed=seed).paths == small.paths  # seeded


def test_subset_command_writes_a_multi_label_csv_that_reads_back(folder: Path) -> None:
    out = folder / "sub" / "subset.csv"
    out.parent.mkdir()
    result = runner.invoke(app, ["subset", str(_many(folder)), "--out", str(out), "--fraction", "0.1"])
    assert result.exit_code == 0, result.output
    back = read_labels(out)
    assert back.multi_label and back.class_names == ["common", "mid", "rare"] and len(back) == 4


def test_held_out_split_of_multi_label_leaves_every_class_to_train_on(folder: Path) -> None:
    full = read_labels(_many(folder))
    train, held = held_out_split(full, 0.5, seed=0)
    assert held is not None and len(held) > 10
    assert train.class_names == full.class_names and not set(train.paths) & set(held.paths)
