"""`to-label.html`: a contact sheet of the chosen images that is also a small labelling tool.

One self-contained file that needs no server and works offline: thumbnails are inline base64
JPEGs (at most 128 px a side, never upsampled), grouped by cluster with the path under each.
Every image has a label field offering the given classes (and accepting new ones); digits 1–9
pick class i, Tab or Enter moves to the next image. Entries persist in the browser's
localStorage under the page's own id, so a reload loses nothing. A button downloads the
filled rows as a `path,label` CSV whose paths are relative to the folder of the CSV that
`select` wrote (this page's folder), which `finetune --labels` reads as it is.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from labelfew.data.images import BadImage, load_rgb
from labelfew.fileio import atomic_write_text

THUMBNAIL_SIDE = 128


@dataclass(frozen=True)
class PageItem:
    """One image on the page.

    Attributes:
        path: as written in the CSV (relative to the page's folder, POSIX separators).
        cluster: its k-means cluster; the page groups by it.
        cluster_size: images in that cluster.
        reason: why it was chosen ("typical" or "uncertain").
        thumbnail: a `data:image/jpeg;base64,...` URI, or "" when the file cannot be decoded.
    """

    path: str
    cluster: int
    cluster_size: int
    reason: str
    thumbnail: str


def thumbnail_uri(path: Path, side: int = THUMBNAIL_SIDE, quality: int = 80) -> str:
    """A small JPEG of the image as a data URI ("" for a file that cannot be decoded)."""
    try:
        image = load_rgb(path)
    except BadImage:
        return ""
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def page_id(paths: Sequence[str]) -> str:
    """The page's localStorage id: the same selection keeps its entries, another one starts empty."""
    return hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()[:16]


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:.85em;margin:0 0 .4em;color:#555}
.hint{color:#555;max-width:60em}.legend span{margin-right:1em}
.sheet,.grid{display:flex;flex-wrap:wrap;gap:12px}.sheet{margin-top:1em}
section{border:1px solid #ddd;border-radius:4px;padding:6px}
figure{margin:0;width:150px}figure img,.missing{width:128px;height:128px;object-fit:contain;
image-rendering:pixelated;background:#eee;display:block}
figcaption{font-size:11px;word-break:break-all;margin:2px 0}
input{width:140px}input.done{background:#e8f5e9}
#bar{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd}
#count{margin:0 1.5em 0 .5em}
"""

_SCRIPT = """
const data = JSON.parse(document.getElementById('labelfew-data').textContent);
const key = 'labelfew:' + data.id;
const saved = JSON.parse(localStorage.getItem(key) || '{}');
const inputs = Array.from(document.querySelectorAll('input.label'));
const choices = document.getElementById('classes');
function classes() { return Array.from(choices.options).map(o => o.value); }
function offer(value) {
  if (value && !classes().includes(value)) {
    const option = document.createElement('option'); option.value = value; choices.appendChild(option);
    legend();
  }
}
function legend() {
  document.getElementById('legend').innerHTML = '';
  classes().slice(0, 9).forEach((name, i) => {
    const span = document.createElement('span'); span.textContent = (i + 1) + ' ' + name;
    document.getElementById('legend').appendChild(span);
  });
}
function count() {
  const filled = inputs.filter(i => i.value.trim()).length;
  document.getElementById('count').textContent = filled + ' of ' + inputs.length + ' labelled';
}
function store(input) {
  const value = input.value.trim();
  if (value) saved[input.dataset.path] = value; else delete saved[input.dataset.path];
  localStorage.setItem(key, JSON.stringify(saved));
  input.classList.toggle('done', !!value); count();
}
function next(input, step) {
  const target = inputs[inputs.indexOf(input) + step];
  if (target) { target.focus(); target.select(); }
}
inputs.forEach(input => {
  if (saved[input.dataset.path]) input.value = saved[input.dataset.path];
  input.classList.toggle('done', !!input.value); offer(input.value.trim());
  input.addEventListener('input', () => store(input));
  input.addEventListener('change', () => offer(input.value.trim()));  // a finished entry, not each keystroke
  input.addEventListener('keydown', event => {
    const known = input.value === '' || classes().includes(input.value);
    if (/^[1-9]$/.test(event.key) && known && classes().length >= Number(event.key)) {
      event.preventDefault(); input.value = classes()[Number(event.key) - 1]; store(input);
    } else if (event.key === 'Enter' || (event.key === 'Tab' && !event.shiftKey)) {
      event.preventDefault(); store(input); offer(input.value.trim()); next(input, 1);
    } else if (event.key === 'Tab') { event.preventDefault(); next(input, -1); }
  });
});
function cell(text) { return /[",\\r\\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text; }
document.getElementById('download').addEventListener('click', () => {
  const rows = inputs.filter(i => i.value.trim()).map(i => cell(i.dataset.path) + ',' + cell(i.value.trim()));
  const blob = new Blob(['path,label\\n' + rows.map(r => r + '\\n').join('')], {type: 'text/csv'});
  const link = document.createElement('a');
  link.href = URL.createObjectURL(blob); link.download = data.download; document.body.appendChild(link);
  link.click(); link.remove();
});
legend(); count();
if (inputs.length) inputs[0].focus();
"""


def render_label_page(
    items: Sequence[PageItem], classes: Sequence[str], title: str, download_name: str
) -> str:
    """The whole page as one HTML string (escaped; the data block cannot close its script tag)."""
    escape = html.escape
    data = json.dumps({"id": page_id([item.path for item in items]), "download": download_name})
    data = data.replace("</", "<\\/")  # a path holding "</script>" cannot end the data block
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        '<p class="hint">Type a label under each image, or press 1–9 for a class; Tab or Enter moves on. '
        "Entries are kept in this browser (reloading loses nothing). <b>Download labels.csv</b> and save "
        "it in this page's folder: its paths are relative to it. Then: "
        f"<code>labelfew finetune --labels {escape(download_name)}</code></p>",
        '<div id="bar"><button id="download" type="button">Download labels.csv</button> '
        '<span id="count"></span> <span class="legend" id="legend"></span></div>',
        '<datalist id="classes">'
        + "".join(f'<option value="{escape(name)}">' for name in classes)
        + "</datalist>",
    ]
    groups: dict[int, list[PageItem]] = {}
    for item in items:
        groups.setdefault(item.cluster, []).append(item)
    parts.append('<div class="sheet">')
    for cluster_id, members in groups.items():
        size = members[0].cluster_size
        parts.append(
            f'<section><h2>cluster {cluster_id} — {size} image{"s" * (size != 1)}</h2><div class="grid">'
        )
        for item in members:
            image = (
                f'<img src="{item.thumbnail}" alt="{escape(item.path)}">'
                if item.thumbnail
                else '<div class="missing">cannot be decoded</div>'
            )
            parts.append(
                f'<figure data-cluster="{cluster_id}">{image}<figcaption>{escape(item.path)} '
                f"({escape(item.reason)})</figcaption>"
                f'<input class="label" list="classes" autocomplete="off" aria-label="label of {escape(item.path)}" '
                f'data-path="{escape(item.path)}"></figure>'
            )
        parts.append("</div></section>")
    parts += [
        "</div>",
        f'<script type="application/json" id="labelfew-data">{data}</script>',
        f"<script>{_SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)


def write_label_page(
    out: Path,
    items: Sequence[PageItem],
    classes: Sequence[str],
    title: str,
    download_name: str = "labels.csv",
) -> Path:
    """Writes the page atomically and returns its path."""
    atomic_write_text(out, render_label_page(items, classes, title, download_name))
    return out
