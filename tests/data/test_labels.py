"""Label CSVs and class-per-folder trees: what is accepted, and one clear line for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from labelfew.data.labels import LabeledImages, read_label_files, read_labels, write_labels
from labelfew.errors import UserError


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)
    return path


def _csv(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """tmp/img/{a,b,c}.png and tmp/img/sub/d.png."""
    for name in ("a", "b", "c", "sub/d"):
        _png(tmp_path / "img" / f"{name}.png")
    return tmp_path / "img"


def test_csv_with_extra_columns_in_any_order(images: Path) -> None:
    source = _csv(
        images / "labels.csv",
        'id,label,path,notes\n1,cat,a.png,x\n2,dog,sub/d.png,"quoted, comma"\n3,cat,b.png,\n',
    )
    labeled = read_labels(source)
    assert labeled.paths == (images / "a.png", images / "sub" / "d.png", images / "b.png")
    assert labeled.labels == ("cat", "dog", "cat")
    assert labeled.root == images
    assert labeled.class_names == ["cat", "dog"]
    assert labeled.counts() == {"cat": 2, "dog": 1}


def test_csv_with_bom_spaces_and_crlf(images: Path) -> None:
    source = _csv(images / "l.csv", "\ufeffpath , label\r\n a.png , cat \r\nb.png,dog\r\n\r\n")
    labeled = read_labels(source)
    assert labeled.labels == ("cat", "dog")
    assert labeled.paths == (images / "a.png", images / "b.png")


def test_csv_with_absolute_paths_elsewhere(images: Path, tmp_path: Path) -> None:
    source = _csv(tmp_path / "lists" / "l.csv", f"path,label\n{images / 'c.png'},bird\n")
    labeled = read_labels(source)
    assert labeled.paths == (images / "c.png",)
    assert labeled.relative_key(images / "c.png") == "../img/c.png"


def test_csv_paths_relative_to_the_csv_folder_not_the_working_directory(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _csv(images / "sub" / "l.csv", "path,label\nd.png,x\n../a.png,y\n")
    monkeypatch.chdir(tmp_path)
    labeled = read_labels(source)
    assert labeled.paths == (images / "sub" / "d.png", images / "a.png")  # ../ normalised away


def test_duplicate_rows_with_the_same_label_are_kept_once(images: Path) -> None:
    source = _csv(images / "l.csv", "path,label\na.png,cat\n./a.png,cat\nb.png,dog\n")
    labeled = read_labels(source)
    assert labeled.paths == (images / "a.png", images / "b.png")
    assert labeled.labels == ("cat", "dog")


def test_class_per_folder_tree(tmp_path: Path) -> None:
    for path in ("cat/1.png", "cat/nested/2.jpg", "dog/3.png", ".hidden/4.png", "dog/.5.png"):
        _png(tmp_path / path)
    (tmp_path / "README.txt").write_text("loose file")
    _png(tmp_path / "loose.png")  # not in a class folder: not labelled
    labeled = read_labels(tmp_path)
    assert labeled.labels == ("cat", "cat", "dog")
    assert labeled.paths == (tmp_path / "cat/1.png", tmp_path / "cat/nested/2.jpg", tmp_path / "dog/3.png")
    assert labeled.root == tmp_path


def test_tree_without_class_folders_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "loose.png")
    with pytest.raises(UserError, match="no images in class subfolders"):
        read_labels(tmp_path)


BAD_CSVS: dict[str, tuple[str | bytes, str]] = {
    "not_utf8": (b"path,label\na.png,caf\xe9\n", "not UTF-8"),
    "no_label_column": ("path,class\na.png,cat\n", "missing column.*label"),
    "no_path_column": ("file,label\na.png,cat\n", "missing column.*path"),
    "empty_file": ("", "missing column"),
    "header_only": ("path,label\n", "no rows"),
    "missing_images": (
        "path,label\na.png,cat\nnope.png,cat\ngone/x.png,dog\n",
        "2 path.*do not exist.*nope.png",
    ),
    "conflicting_duplicate": ("path,label\na.png,cat\nb.png,dog\na.png,dog\n", ":4: a.png is labelled both"),
    "empty_label": ("path,label\na.png,cat\nb.png,\n", ":3: empty path or label"),
    "empty_path": ("path,label\n,cat\n", ":2: empty path or label"),
    "short_row": ("path,label\na.png\n", ":2: empty path or label"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_csv_is_one_user_error_naming_the_file(images: Path, case: str) -> None:
    text, expected = BAD_CSVS[case]
    source = _csv(images / f"{case}.csv", text)
    with pytest.raises(UserError, match=expected) as caught:
        read_labels(source)
    message = str(caught.value)
    assert message.startswith(str(source)), message
    assert "\n" not in message


def test_missing_source_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"absent\.csv: no such file"):
        read_labels(tmp_path / "absent.csv")


def test_unreadable_csv_is_a_user_error(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _csv(images / "locked.csv", "path,label\na.png,cat\n")

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # chmod 0 does not stop root, who runs CI here
    with pytest.raises(UserError, match=r"locked.csv: cannot be read"):
        read_labels(source)


def test_label_indices_follow_the_given_class_order_and_refuse_unknown_labels(images: Path) -> None:
    labeled = read_labels(_csv(images / "l.csv", "path,label\na.png,dog\nb.png,cat\nc.png,dog\n"))
    assert labeled.label_indices(["cat", "dog"]) == [1, 0, 1]
    assert labeled.label_indices(["dog", "cat", "eel"]) == [0, 1, 0]
    with pytest.raises(UserError, match="'dog' are not classes of the model"):
        labeled.label_indices(["cat", "eel"])


def test_write_then_read_round_trip_with_relative_paths(images: Path, tmp_path: Path) -> None:
    original = LabeledImages(
        paths=(images / "a.png", images / "sub" / "d.png", images / "b.png"),
        labels=("cat", "dog, with comma", "cat"),
        root=images,
    )
    out = tmp_path / "subsets" / "chosen.csv"
    write_labels(original, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path,label"
    assert lines[1] == "../img/a.png,cat"
    assert lines[2] == '../img/sub/d.png,"dog, with comma"'
    again = read_labels(out)
    assert again.paths == original.paths
    assert again.labels == original.labels
    assert again.root == out.parent


def test_an_empty_set_is_not_written(tmp_path: Path) -> None:
    out = tmp_path / "empty.csv"
    with pytest.raises(UserError, match=r"empty\.csv: no images to write"):
        write_labels(LabeledImages(paths=(), labels=(), root=tmp_path), out)
    assert not out.exists()


def test_several_files_are_merged_and_agreeing_repeats_count_once(images: Path, tmp_path: Path) -> None:
    # round 2's file repeats a round-1 row (as the page's download does) and adds two
    first = _csv(images / "labels-round1.csv", "path,label\na.png,cat\nb.png,dog\n")
    second = _csv(tmp_path / "elsewhere" / "labels-round2.csv",
                  f"path,label\n{images / 'a.png'},cat\n{images / 'c.png'},dog\n{images / 'sub/d.png'},cat\n")  # fmt: skip
    merged = read_label_files([first, second])
    assert dict(zip(merged.paths, merged.labels, strict=True)) == {
        images / "a.png": "cat", images / "b.png": "dog", images / "c.png": "dog", images / "sub" / "d.png": "cat"
    }  # fmt: skip
    assert merged.root == images  # the first file's folder
    assert read_label_files([first]) == read_labels(first)


def test_a_path_labelled_differently_in_two_files_names_both_rows(images: Path) -> None:
    first = _csv(images / "one.csv", "path,label\na.png,cat\nb.png,dog\n")
    second = _csv(images / "two.csv", "path,label\nc.png,cat\nb.png,cat\n")
    with pytest.raises(UserError) as caught:
        read_label_files([first, second])
    message = str(caught.value)
    assert f"{second}:3: b.png is labelled both 'dog' ({first}:3) and 'cat'" in message
    assert "\n" not in message


def test_no_label_file_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no label file given"):
        read_label_files([])
