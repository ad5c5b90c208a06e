"""Labelled images that cannot be read: an error before training unless --skip-bad, then left out and named."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from labelfew.data.labelled import readable_labels
from labelfew.data.labels import LabeledImages
from labelfew.errors import UserError


def _labels(tmp_path: Path, broken: int) -> LabeledImages:
    paths = []
    for index in range(4):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (8, 8), (index, 0, 0)).save(path)
        paths.append(path)
    for index in range(broken):
        path = tmp_path / f"broken-{index}.png"
        path.write_bytes(b"not an image")
        paths.append(path)
    return LabeledImages(tuple(paths), tuple("ab"[index % 2] for index in range(len(paths))), tmp_path)


def test_readable_labels_are_returned_unchanged(tmp_path: Path) -> None:
    labeled = _labels(tmp_path, broken=0)
    assert readable_labels(labeled, skip_bad=False) == (labeled, [])


def test_an_unreadable_labelled_image_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"broken-0\.png \(and 1 more\): labelled image cannot be decoded.*--skip-bad"
    ):
        readable_labels(_labels(tmp_path, broken=2), skip_bad=False)


def test_skip_bad_leaves_them_out_and_names_them(tmp_path: Path) -> None:
    labeled = _labels(tmp_path, broken=2)
    kept, skipped = readable_labels(labeled, skip_bad=True)
    assert kept.paths == labeled.paths[:4] and kept.labels == labeled.labels[:4] and kept.root == tmp_path
    assert skipped == [str(tmp_path / "broken-0.png"), str(tmp_path / "broken-1.png")]


def test_skip_bad_still_refuses_labels_of_which_none_decode(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    labeled = LabeledImages((tmp_path / "x.png",), ("a",), tmp_path)
    with pytest.raises(UserError, match="none of the labelled images can be decoded"):
        readable_labels(labeled, skip_bad=True)
