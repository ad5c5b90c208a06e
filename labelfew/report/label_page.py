"""`to-label.html`: a contact sheet of the chosen images that is also a small labelling tool.

One self-contained file that needs no server and works offline: thumbnails are inline base64
JPEGs (at most 128 px a side, never upsampled), grouped by cluster with the path under each.
Every image has a label field offering the given classes (and accepting new ones); Tab or Enter
moves to the next image. Digits 1–9 pick class i only while no class name is a number (with
classes `0…9` the digit 3 would otherwise store class "2"), and only in an empty or wholly
selected field, so typing always wins; with numeric classes the class is simply typed. Images
labelled in earlier rounds (`select --labels`) are shown with their labels, editable; changing or
clearing one is marked and confirmed before the download. Entries persist in the browser's
localStorage under the page's own id, so a reload loses nothing. A button downloads every filled
row, earlier ones included, as a `path,label` CSV named for the round (`labels-round2.csv`, so it
does not replace an earlier round's file) whose paths are relative to this page's folder, which
`finetune --labels` reads as it is.
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

from labelfew.data.images import BadImage, display_image
from labelfew.fileio import atomic_write_text
from labelfew.spec import Decoding

THUMBNAIL_SIDE = 128


@dataclass(frozen=True)
class PageItem:
    """One image on the page.

    Attributes:
        path: as written in the CSV (relative to the page's folder, POSIX separators).
        cluster: its k-means cluster; the page groups by it.
        cluster_size: images in that cluster.
        reason: why it was chosen ("typical", "uncertain", or "outlier": from a cluster of at most
            `labelfew.selection.MIN_CLUSTER_SIZE` images, once the larger clusters had none left).
        thumbnail: a `data:image/jpeg;base64,...` URI, or "" when the file cannot be decoded.
        earlier: its label from an earlier round ("" for an image to label now); such images go in
            a section of their own, their field filled in.
    """

    path: str
    cluster: int
    cluster_size: int
    reason: str
    thumbnail: str
    earlier: str = ""


def thumbnail_uri(
    path: Path, decoding: Decoding = Decoding(), side: int = THUMBNAIL_SIDE, quality: int = 80
) -> str:
    """A small JPEG of the image as the model sees it (`labelfew.data.pixels.display_image` with the
    model's `decoding`: gray as gray, deep images through its window, N channels as their first
    three) as a data URI ("" for a file that cannot be decoded)."""
    try:
        image = display_image(path, decoding)
    except BadImage:
        return ""
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def channels_note(decoding: Decoding) -> str:
    """The line a page or figure shows of images of more than 3 channels ("" for 1 or 3)."""
    if decoding.channels <= 3:
        return ""
    return f"These images have {decoding.channels} channels; pictures show the first three as red, green and blue."


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
figcaption{font-size:11px;overflow-wrap:anywhere;margin:2px 0}
input{width:140px}input.done{background:#e8f5e9}input.changed{background:#fff3cd}
.was{font-size:11px;color:#8a6d00}kbd{border:1px solid #bbb;border-radius:3px;padding:0 3px}
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
function numeric(name) { return name.trim() !== '' && !isNaN(Number(name)); }
function digitsPick() { return !classes().some(numeric); }  // a number class is typed, never a digit key
function shortcuts() {  // [keys, class] as the legend shows them and the fields obey
  if (!digitsPick()) return classes().map(name => [name, name]);
  return classes().map((name, i) => [i < 9 ? String(i + 1) : name, name]);  // past 9: typed
}
function offer(value) {
  if (value && !classes().includes(value)) {
    const option = document.createElement('option'); option.value = value; choices.appendChild(option);
    legend();
  }
}
function legend() {
  const box = document.getElementById('legend');
  box.innerHTML = digitsPick() ? '' : 'type the class: ';  // with digits, a class past the ninth shows its name alone
  shortcuts().forEach(([keys, name]) => {
    const span = document.createElement('span'); span.dataset.key = keys; span.dataset.label = name;
    const kbd = document.createElement('kbd'); kbd.textContent = keys; span.appendChild(kbd);
    if (keys !== name) span.appendChild(document.createTextNode(' ' + name));
    box.appendChild(span);
  });
}
function changed() { return inputs.filter(i => i.dataset.earlier && i.value.trim() !== i.dataset.earlier); }
function count() {
  const filled = inputs.filter(i => i.value.trim()).length;
  const edits = changed().length;
  document.getElementById('count').textContent = filled + ' of ' + inputs.length + ' labelled' +
    (edits ? ', ' + edits + ' earlier label' + (edits > 1 ? 's' : '') + ' changed' : '');
}
function mark(input) {
  const value = input.value.trim();
  const edited = !!input.dataset.earlier && value !== input.dataset.earlier;
  input.classList.toggle('done', !!value); input.classList.toggle('changed', edited);
  const note = input.parentElement.querySelector('.was');
  if (note) note.hidden = !edited;
}
function store(input) {
  saved[input.dataset.path] = input.value.trim();
  localStorage.setItem(key, JSON.stringify(saved));
  mark(input); count();
}
function next(input, step) {
  const target = inputs[inputs.indexOf(input) + step];
  if (target) { target.focus(); target.select(); }
}
inputs.forEach(input => {
  if (input.dataset.path in saved) input.value = saved[input.dataset.path];
  mark(input); offer(input.value.trim());
  input.addEventListener('input', () => store(input));
  input.addEventListener('change', () => offer(input.value.trim()));  // a finished entry, not each keystroke
  input.addEventListener('keydown', event => {
    const replaces = input.value === '' || (input.selectionStart === 0 && input.selectionEnd === input.value.length);
    const plain = !event.ctrlKey && !event.altKey && !event.metaKey;
    if (/^[1-9]$/.test(event.key) && plain && replaces && digitsPick() && classes().length >= Number(event.key)) {
      event.preventDefault(); input.value = classes()[Number(event.key) - 1]; store(input); input.select();
    } else if (event.key === 'Enter' || (event.key === 'Tab' && !event.shiftKey)) {
      event.preventDefault(); store(input); offer(input.value.trim()); next(input, 1);
    } else if (event.key === 'Tab') { event.preventDefault(); next(input, -1); }
  });
});
function cell(text) { return /[",\\r\\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text; }
document.getElementById('download').addEventListener('click', () => {
  const edits = changed();
  if (edits.length) {
    const shown = edits.slice(0, 5).map(i => i.dataset.path + ': ' + i.dataset.earlier + ' -> ' + (i.value.trim() || '(none)'));
    if (!confirm(edits.length + ' label(s) from an earlier round will be replaced:\\n' + shown.join('\\n') +
                 '\\nDownload ' + data.download + ' with these changes?')) return;
  }
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
    items: Sequence[PageItem], classes: Sequence[str], title: str, download_name: str, note: str = ""
) -> str:
    """The whole page as one HTML string (escaped; the data block cannot close its script tag).
    `note`: a line under the hint (`channels_note`).

    Images to label come first, grouped by cluster; images labelled earlier follow in a section
    of their own, so that the download holds every label and a round replaces none.
    """
    escape = html.escape
    data = json.dumps({"id": page_id([item.path for item in items]), "download": download_name})
    data = data.replace("</", "<\\/")  # a path holding "</script>" cannot end the data block
    name = escape(download_name)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        '<p class="hint">Type a label under each image (or press the key the legend shows beside a '
        "class); Tab or Enter moves on. Entries are kept in this browser (reloading loses nothing). "
        f"<b>Download {name}</b> (every label on this page, earlier rounds' included) and save it in "
        "this page's folder: its paths are relative to it. Then: "
        f"<code>labelfew finetune --labels {name}</code></p>",
        *([f'<p class="hint">{escape(note)}</p>'] if note else []),
        f'<div id="bar"><button id="download" type="button">Download {name}</button> '
        '<span id="count"></span> <span class="legend" id="legend"></span></div>',
        '<datalist id="classes">'
        + "".join(f'<option value="{escape(name)}">' for name in classes)
        + "</datalist>",
    ]
    groups: dict[int, list[PageItem]] = {}
    for item in items:
        if not item.earlier:
            groups.setdefault(item.cluster, []).append(item)
    parts.append('<div class="sheet">')
    for cluster_id, members in groups.items():
        size = members[0].cluster_size
        heading = f"cluster {cluster_id} — {size} image{'s' * (size != 1)}"
        parts += _section(heading, members)
    earlier = [item for item in items if item.earlier]
    if earlier:
        parts += _section(f"labelled earlier — {len(earlier)} (edit a label to correct it)", earlier)
    parts += [
        "</div>",
        f'<script type="application/json" id="labelfew-data">{data}</script>',
        f"<script>{_SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)


def _section(heading: str, members: Sequence[PageItem]) -> list[str]:
    """One box of figures: thumbnail, path and reason, and the label field (filled when earlier)."""
    escape = html.escape
    parts = [f'<section><h2>{escape(heading)}</h2><div class="grid">']
    for item in members:
        image = (
            f'<img src="{item.thumbnail}" alt="{escape(item.path)}">'
            if item.thumbnail
            else '<div class="missing">cannot be decoded</div>'
        )
        earlier = (
            f' value="{escape(item.earlier)}" data-earlier="{escape(item.earlier)}"' if item.earlier else ""
        )
        note = f'<div class="was" hidden>was {escape(item.earlier)}</div>' if item.earlier else ""
        parts.append(
            f'<figure data-cluster="{item.cluster}">{image}<figcaption>{escape(item.path)} '
            f"({escape(item.reason)})</figcaption>"
            f'<input class="label" list="classes" autocomplete="off" aria-label="label of {escape(item.path)}" '
            f'data-path="{escape(item.path)}"{earlier}>{note}</figure>'
        )
    parts.append("</div></section>")
    return parts


def write_label_page(
    out: Path,
    items: Sequence[PageItem],
    classes: Sequence[str],
    title: str,
    download_name: str = "labels.csv",
    note: str = "",
) -> Path:
    """Writes the page atomically and returns its path."""
    atomic_write_text(out, render_label_page(items, classes, title, download_name, note))
    return out
