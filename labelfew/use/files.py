"""What the use commands share besides the inference loop: finding the input images, writing
CSVs with paths as label CSVs write them, and printing paths and skipped files."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from labelfew.fileio import atomic_write_text

console = Console()  # results go to stdout; progress goes to engine.console (stderr)


def relative_path(path: Path, folder: Path) -> str:
    """`path` relative to `folder` (POSIX separators), as label CSVs write paths."""
    try:
        return Path(os.path.relpath(path.absolute(), folder.absolute())).as_posix()
    except ValueError:  # another drive on Windows
        return path.absolute().as_posix()


def shown(path: Path) -> str:
    """A path as the user typed it would look: relative to the current folder when inside it."""
    try:
        return path.absolute().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path.absolute())


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Writes a CSV atomically (a killed run never leaves half a file)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def report_bad(paths: list[Path], errors: dict[int, str], where: str) -> None:
    """One line naming up to three undecodable files and saying where they went."""
    if errors:
        names = ", ".join(shown(paths[index]) for index in sorted(errors)[:3])
        more = ", …" if len(errors) > 3 else ""
        console.print(f"[yellow]{len(errors)} file(s) could not be decoded[/] ({where}): {names}{more}")
