"""Labelled image lists: read from a CSV (`path,label`) or a class-per-folder tree, and written back.

A label CSV has a header with at least `path` and `label`; other columns are ignored. `path` is
relative to the CSV's folder, or absolute. Class names are strings; their order (sorted) is the
class index order that every artifact stores. A multi-label CSV (`path,labels` with delimited
classes, or one 0/1 column per class) is read into the same `LabeledImages`, each image's label
set encoded in its label string (`labelfew.data.multilabel`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from labelfew.data import multilabel
from labelfew.data.images import find_images, printable
from labelfew.errors import UserError
from labelfew.fileio import atomic_write_text


@dataclass(frozen=True)
class LabeledImages:
    """Image paths with their class names.

    Attributes:
        paths: absolute image paths.
        labels: the class name of each image.
        root: the folder that relative paths are written against (the CSV's folder or the tree root).
    """

    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    root: Path

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multi_label(self) -> bool:
        """Read from a multi-label CSV: each label is a set of classes (`labelfew.data.multilabel`)."""
        return multilabel.is_multi_label(self.labels)

    @property
    def class_names(self) -> list[str]:
        """Sorted unique class names: index i of a classifier means class_names[i]."""
        if self.multi_label:
            return sorted({name for label in self.labels for name in multilabel.decode(label)})
        return sorted(set(self.labels))

    def counts(self) -> dict[str, int]:
        """Number of images per class (multi-label: images with the class), in class-name order."""
        result = dict.fromkeys(self.class_names, 0)
        for label in self.labels:
            for name in multilabel.decode(label) if self.multi_label else [label]:
                result[name] += 1
        return result

    def label_indices(self, class_names: list[str]) -> list[int]:
        """Maps every label to its index in `class_names`.

        Raises:
            UserError: a label is not one of `class_names` (e.g. a class unseen at finetune time).
        """
        lookup = {name: index for index, name in enumerate(class_names)}
        if self.multi_label:
            return self._bit_masks(lookup)
        unknown = sorted(set(self.labels) - set(lookup))
        if unknown:
            shown = ", ".join(repr(name) for name in unknown[:5])
            raise UserError(
                f"{self.root}: labels {shown} are not classes of the model "
                f"(it knows {len(class_names)}: {', '.join(class_names[:10])}); "
                "evaluate on the same classes the model was fine-tuned on"
            )
        return [lookup[label] for label in self.labels]

    def _bit_masks(self, lookup: dict[str, int]) -> list[int]:
        """Multi-label `label_indices`: each image's classes as one int64 bit mask (bit c: class c),
        the form the batches carry (`labelfew.multilabel.multi_hot` unpacks it)."""
        masks = []
        for path, label in zip(self.paths, self.labels, strict=True):
            unknown = [name for name in multilabel.decode(label) if name not in lookup]
            if unknown:
                raise UserError(
                    f"{self.relative_key(path)} (in {self.root}): class {unknown[0]!r} is not a class of the "
                    f"model (it knows {len(lookup)}: {', '.join(list(lookup)[:10])})"
                )
            masks.append(sum(1 << lookup[name] for name in multilabel.decode(label)))
        return masks

    def relative_key(self, path: Path) -> str:
        """The path as written in a CSV: relative to `root` when below it, POSIX separators, a name
        that is not UTF-8 with ``\\xNN`` escapes (`labelfew.data.images.printable`)."""
        try:
            return printable(Path(os.path.relpath(path, self.root)).as_posix())
        except ValueError:  # another drive on Windows
            return printable(path.as_posix())


def read_labels(source: Path, delimiter: str = multilabel.DEFAULT_DELIMITER) -> LabeledImages:
    """Reads a label CSV or a class-per-subfolder tree (a multi-label CSV split at `delimiter`).

    Raises:
        UserError: with one sentence naming the file and the problem.
    """
    return _merge([Path(source)], delimiter)


def read_label_files(sources: Sequence[Path], delimiter: str = multilabel.DEFAULT_DELIMITER) -> LabeledImages:
    """Reads and merges several label CSVs or trees (the rounds of `select` → label → `finetune`).

    A path labelled alike in several files counts once; the root is the first source's, so that a
    second round adds to the first instead of silently replacing it.

    Raises:
        UserError: no source, a bad file, or a path labelled differently in two places (both named
            as file:row, so the user knows which one to fix).
    """
    if not sources:
        raise UserError("no label file given; pass --labels labels.csv (repeat it to merge several)")
    return _merge([Path(source) for source in sources], delimiter)


@dataclass(frozen=True)
class _Row:
    """One labelled image: its absolute path, its label, the path as written, and where it was read
    (`file.csv:LINE`, or the class folder of a tree)."""

    path: Path
    label: str
    written: str
    where: str


def _merge(sources: list[Path], delimiter: str) -> LabeledImages:
    chosen: dict[Path, _Row] = {}
    for source in sources:
        if not source.exists():
            raise UserError(
                f"{source}: no such file or folder. Pass a label CSV (path,label) or a class-per-folder tree."
            )
        for row in _read_tree(source) if source.is_dir() else _read_csv(source, delimiter):
            earlier = chosen.setdefault(row.path, row)
            if earlier.label != row.label:
                raise UserError(
                    f"{row.where}: {row.written} is labelled both {multilabel.shown(earlier.label)!r} "
                    f"({earlier.where}) and {multilabel.shown(row.label)!r} here; keep one"
                )
    rows = list(chosen.values())
    if multilabel.is_multi_label(row.label for row in rows):  # a single-label file merged in: sets of one
        rows = [
            dataclasses.replace(row, label=multilabel.encode(multilabel.decode(row.label))) for row in rows
        ]
    return LabeledImages(
        paths=tuple(row.path for row in rows),
        labels=tuple(row.label for row in rows),
        root=(sources[0] if sources[0].is_dir() else sources[0].parent).absolute(),
    )


def _read_tree(root: Path) -> list[_Row]:
    rows = []
    for class_folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        # A file linked into a class folder was labelled on purpose (a tree of links into a pool), so
        # links are followed here as before; FIFOs and devices are still never opened.
        for path in find_images(class_folder, follow_links=True):
            rows.append(
                _Row(Path(os.path.normpath(path.absolute())), class_folder.name, str(path), str(class_folder))
            )
    if not rows:
        raise UserError(
            f"{root}: no images in class subfolders. A labelled folder holds one subfolder per class "
            "(root/<class>/*.jpg), or pass a CSV with path,label columns"
        )
    return rows


def _decode(source: Path) -> str:
    try:
        data = source.read_bytes()
    except OSError as error:
        raise UserError(f"{source}: cannot be read ({error.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{source}: not UTF-8 text (byte {error.start}); save the CSV as UTF-8") from None


def _read_csv(source: Path, delimiter: str) -> list[_Row]:
    text = _decode(source)
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as error:
        raise UserError(f"{source}: not a valid CSV ({error})") from None
    header = csv.reader(io.StringIO(text))
    columns = [name.strip() for name in next(header, [])]
    kind = multilabel.csv_kind(columns, rows, delimiter)
    missing = [name for name in ("path", "label") if name not in columns]
    if kind == "single" and missing:
        raise UserError(
            f"{source}: missing column(s) {', '.join(missing)}; the header must include path,label "
            f"(found: {', '.join(columns) or 'nothing'})"
        )
    root = source.parent.absolute()
    found: list[_Row] = []
    missing_files: list[str] = []
    for line, row in enumerate(rows, start=2):
        row = {(key or "").strip(): (value or "") for key, value in row.items() if key is not None}
        raw_path, label = row.get("path", "").strip(), row.get("label", "").strip()
        if kind != "single":  # an image with no class is a valid "none of these" example
            label = multilabel.row_label(row, kind, columns, delimiter, f"{source}:{line}")
        if not raw_path or not label:
            raise UserError(f"{source}:{line}: empty path or label; every row needs both")
        path = Path(raw_path) if Path(raw_path).is_absolute() else root / raw_path
        if not path.is_file():
            missing_files.append(raw_path)
            continue
        found.append(_Row(Path(os.path.normpath(path)), label, raw_path, f"{source}:{line}"))
    if missing_files:
        shown = ", ".join(missing_files[:3])
        raise UserError(
            f"{source}: {len(missing_files)} path(s) do not exist (e.g. {shown}); "
            "paths are relative to the CSV's folder"
        )
    if not found:
        raise UserError(f"{source}: no rows; add path,label rows")
    if kind != "single":
        multilabel.require_positives([row.label for row in found], columns, kind, source)
    return found


def write_labels(labeled: LabeledImages, out: Path) -> None:
    """Writes a `path,label` CSV (paths relative to the CSV's folder), atomically.

    Raises:
        UserError: `labeled` is empty (`read_labels` refuses a CSV with no rows, so none is written).
    """
    out = Path(out)
    if len(labeled) == 0:
        raise UserError(
            f"{out}: no images to write (the subset is empty); use a larger --fraction or --per-class"
        )
    view = LabeledImages(labeled.paths, labeled.labels, root=out.parent.absolute())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "labels" if labeled.multi_label else "label"])
    for path, label in zip(labeled.paths, labeled.labels, strict=True):
        written = multilabel.shown(label) if labeled.multi_label else label
        writer.writerow([view.relative_key(path), "" if written == "(none)" else written])
    atomic_write_text(out, buffer.getvalue())


def folder_labels(paths: list[Path], root: Path, class_names: list[str]) -> list[int] | None:
    """Each image's class when an unlabeled folder is a class-per-folder tree of a model's classes
    (a benchmark's training set), else None; only for logged rates such as pseudo-label accuracy."""
    lookup = {name: index for index, name in enumerate(class_names)}
    labels = [lookup.get(path.relative_to(root).parts[0]) if len(path.relative_to(root).parts) > 1 else None
              for path in paths]  # fmt: skip
    return None if any(label is None for label in labels) else cast(list[int], labels)
