"""report.html: one self-contained page (every figure embedded as base64, so it can be mailed or
attached) that links each figure to its PNG file beside it."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Shown:
    """One figure of the report: its PNG file name, heading and caption."""

    file: str
    title: str
    caption: str


def page_path(path: Path | str, run_folder: Path) -> str:
    """How the page names a file: relative to the run folder when inside it, else only its name.

    The page is meant to be mailed: absolute paths would show the sender's folders and mean nothing
    on the reader's machine.
    """
    path = Path(path)
    try:
        return path.resolve().relative_to(run_folder.resolve()).as_posix()
    except ValueError:
        return path.name


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 4px 12px; border-bottom: 1px solid #ddd; }
td.number { text-align: right; } figure { margin: 2em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption, .meta { color: #555; font-size: 0.9em; } .note { color: #8a5a00; }
"""


def render_html(result: dict[str, Any], out: Path, shown: Sequence[Shown], notes: Sequence[str]) -> str:
    """One HTML page: results table, each figure embedded (base64) and linked to its PNG file."""
    escape = html.escape
    test = result["test"]
    rows = "".join(
        f"<tr><td>{escape(row['method'])}</td><td class=number>{_percent(row['top1'])}</td>"
        f"<td class=number>{_percent(row['top5'])}</td><td class=number>{_percent(row['balanced_accuracy'])}</td></tr>"
        for row in result["rows"]
    )
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>labelfew evaluation — {escape(Path(test['path']).name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>labelfew evaluation</h1>",
        f"<p class=meta>Test set {escape(Path(test['path']).name)}: {test['images']} images, "
        f"{len(result['class_names'])} classes. Device {escape(str(result.get('device')))}.</p>",
        "<table><tr><th>method</th><th>top-1</th><th>top-5</th><th>balanced accuracy</th></tr>",
        rows,
        "</table>",
        *(f"<p class=note>{escape(note)}</p>" for note in notes),
    ]
    for item in shown:
        data = base64.b64encode((out / item.file).read_bytes()).decode("ascii")
        parts += [
            f"<figure><h2>{escape(item.title)}</h2>",
            f'<a href="{escape(item.file)}"><img src="data:image/png;base64,{data}" alt="{escape(item.title)}"></a>',
            f"<figcaption>{escape(item.caption)} File: {escape(item.file)}</figcaption></figure>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
