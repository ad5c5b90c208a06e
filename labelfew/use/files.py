"""What the use commands share besides the inference loop: finding the input images, writing
CSVs with paths as label CSVs write them, and printing paths and skipped files."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from labelfew.data.images import printable
from labelfew.fileio import atomic_write_text

console = Console()  # results go to stdout; progress goes to engine.console (stderr)


def relative_path(path: Path, folder: Path) -> str:
    """`path` relative to `folder` (POSIX separators), as label CSVs write paths; a name that is not
    UTF-8 is written with ``\\xNN`` escapes (`labelfew.data.images.printable`), never a crash."""
    try:
        return printable(Path(os.path.relpath(path.absolute(), folder.absolute())).as_posix())
    except ValueError:  # another drive on Windows
        return printable(path.absolute().as_posix())


def shown(path: Path) -> str:
    """A path as the user typed it would look: relative to the current folder when inside it
    (`labelfew.data.images.printable`, so any file name prints)."""
    try:
        return printable(path.absolute().relative_to(Path.cwd()).as_posix())
    except ValueError:
        return printable(path.absolute())


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
        console.print(
            f"[yellow]{len(errors)} file(s) could not be decoded[/] ({where}): {escape(names)}{more}"
        )


def report_skipped(skipped: list[str]) -> None:
    """One line counting and naming (up to three) what the folder holds that was never read:
    FIFOs, devices, broken links, links out of the folder (`labelfew.data.images.scan_images`)."""
    if skipped:
        more = ", …" if len(skipped) > 3 else ""
        console.print(
            f"[yellow]skipped {len(skipped)} file(s)[/] (not read): {escape(', '.join(skipped[:3]))}{more}"
        )
