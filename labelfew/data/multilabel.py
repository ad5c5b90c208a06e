"""Multi-label CSVs: how a label file is recognised as multi-label, its rows read, and the label
set of an image encoded in the one `label` string that `LabeledImages` keeps per image.

A CSV is multi-label when
- its header has a `labels` column (`path,labels`): each value is the image's classes joined by
  `--label-delimiter` (default ``|``), an empty value an image of none of the classes;
- its header has `label` and some value holds the delimiter (``cat|dog``);
- its header has `path`, no `label`/`labels`, and two or more other columns: one column per class,
  the header names the classes and every value is 0 or 1.

An image with no class (all zeros, an empty `labels`) is kept: in multi-label it is a valid
"none of these" example. A class must have a positive in the file (a column of zeros is refused).

Encoding: a label set is its sorted class names each followed by `SEPARATOR` (the ASCII unit
separator, which no class name may hold), and the empty set is `SEPARATOR` alone. So every
multi-label image's label holds `SEPARATOR` and no single-label one does: `is_multi_label` tells
the two apart, and every subset or split of a `LabeledImages` keeps its kind for free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from labelfew.errors import UserError
from labelfew.multilabel import MAX_CLASSES

if TYPE_CHECKING:
    from labelfew.config import FinetuneConfig

SEPARATOR = "\x1f"
"""Ends every class name of an encoded label set (see the module docstring)."""
DEFAULT_DELIMITER = "|"
"""`--label-delimiter`'s default: `path,labels` rows such as ``a.jpg,scratch|dent``."""
CLASS_COLUMN_VALUES = {"0": False, "1": True}


def encode(names: Iterable[str]) -> str:
    """The label string of an image with classes `names` (SEPARATOR alone for none)."""
    kept = sorted({name for name in names if name})
    return "".join(name + SEPARATOR for name in kept) or SEPARATOR


def decode(label: str) -> list[str]:
    """The sorted class names of an encoded label set (a single label: itself)."""
    return [name for name in label.split(SEPARATOR) if name]


def is_multi_label(labels: Iterable[str]) -> bool:
    """Whether labels were read from a multi-label file (any of them is an encoded set)."""
    return any(SEPARATOR in label for label in labels)


def shown(label: str) -> str:
    """A label as a user wrote it: ``cat|dog`` for a set, ``(none)`` for the empty set."""
    return DEFAULT_DELIMITER.join(decode(label)) or "(none)" if SEPARATOR in label else label


def csv_kind(columns: Sequence[str], rows: Sequence[Mapping[str, str]], delimiter: str) -> str:
    """ "single", "delimited" (a `labels` or `label` column of delimited sets) or "columns" (0/1 per class).

    Raises:
        UserError: an empty `--label-delimiter`.
    """
    if not delimiter:
        raise UserError("--label-delimiter: give at least one character, e.g. '|'")
    if "labels" in columns:
        return "delimited"
    if "label" in columns:
        found = any(delimiter in (row.get("label") or "") for row in rows)
        return "delimited" if found else "single"
    return "columns" if "path" in columns and len(class_columns(columns)) >= 2 else "single"


def class_columns(columns: Sequence[str]) -> list[str]:
    """The class columns of a one-column-per-class CSV: every column but `path`."""
    return [name for name in columns if name and name != "path"]


def row_label(row: Mapping[str, str], kind: str, columns: Sequence[str], delimiter: str, where: str) -> str:
    """The encoded label set of one CSV row (`where` is `file.csv:LINE`).

    Raises:
        UserError: a class column value that is neither 0 nor 1, or a class name holding SEPARATOR.
    """
    if kind == "columns":
        names = []
        for name in class_columns(columns):
            value = (row.get(name) or "").strip()
            if value not in CLASS_COLUMN_VALUES:
                raise UserError(f"{where}: column {name!r} is {value!r}; a class column holds 0 or 1")
            if CLASS_COLUMN_VALUES[value]:
                names.append(name)
    else:
        text = row.get("labels", row.get("label")) or ""
        names = [name.strip() for name in text.split(delimiter) if name.strip()]
    for name in names:
        if SEPARATOR in name:
            raise UserError(f"{where}: class {name!r} holds a control character (\\x1f); rename it")
    return encode(names)


def require_positives(labels: Sequence[str], columns: Sequence[str], kind: str, source: object) -> None:
    """Refuses a class column with no positive, or a multi-label file where no image has a class.

    Raises:
        UserError: naming the file and the class.
    """
    present = {name for label in labels for name in decode(label)}
    if kind == "columns":
        empty = [name for name in class_columns(columns) if name not in present]
        if empty:
            raise UserError(
                f"{source}:1: class column {empty[0]!r} has no positive (no row with 1); "
                "drop the column or label an image of it"
            )
    if not present:
        raise UserError(f"{source}: no image has any class; a multi-label CSV needs positives")


def refuse_options(config: FinetuneConfig, class_names: list[str]) -> None:
    """What multi-label labels cannot train with, refused before any image is decoded.

    Raises:
        UserError: FixMatch (its pseudo-label is a softmax's argmax), the linear head (trained with a
            softmax's cross-entropy), `--balanced` (an image holds several classes), label
            smoothing, class weights (per class of a softmax), or more than `MAX_CLASSES` classes
            (the batches carry each image's classes as one int64 bit mask).
    """
    shown = ", ".join(str(path) for path in config.labels)
    refused = next((flag for flag, used in (
        ("--method fixmatch", config.method == "fixmatch"), ("--method linear", config.method == "linear"),
        ("--balanced", config.balanced), ("--label-smoothing", config.label_smoothing > 0),
        ("--class-weights", config.class_weights != "none")) if used), None)  # fmt: skip
    if refused is not None:
        raise UserError(f"{shown}: multi-label labels; {refused} does not support them, drop it")
    if len(class_names) > MAX_CLASSES:
        raise UserError(
            f"{shown}: {len(class_names)} classes; a multi-label model takes at most {MAX_CLASSES}"
        )


def require_one_kind(kinds: Mapping[str, bool], plots: bool) -> None:
    """evaluate's check that the test labels, the bank and every model are all multi-label or all
    single-label (`kinds`: a name for each, whether it is multi-label), and no `--plots` for
    multi-label (the figures are accuracy and confusion).

    Raises:
        UserError: one line naming both kinds, or `--plots`.
    """
    if len(set(kinds.values())) > 1:
        multi = ", ".join(name for name, kind in kinds.items() if kind)
        single = ", ".join(name for name, kind in kinds.items() if not kind)
        raise UserError(f"{multi}: multi-label, but {single}: single-label; evaluate like with like")
    if plots and any(kinds.values()):
        raise UserError(
            "--plots: the figures are single-label (accuracy, confusion); drop it for multi-label"
        )
