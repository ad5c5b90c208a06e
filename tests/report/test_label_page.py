"""`to-label.html` in a real browser: thumbnails, keyboard labelling, reload, download, finetune."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from browser import Chromium
from conftest import CopyPerClass
from typer.testing import CliRunner

from labelfew.cli import app
from labelfew.data.labels import read_labels
from labelfew.report.label_page import PageItem, render_label_page, thumbnail_uri, write_label_page

CLASSES = ("ant", "bee", "wasp")


@pytest.fixture
def page(
    digits_folder: tuple[Path, Path], copy_per_class: CopyPerClass, tmp_path: Path
) -> tuple[Path, list[str]]:
    """A page of 6 digit images in 3 clusters, written where `select` writes it; (page, paths)."""
    pool = copy_per_class(digits_folder[0], tmp_path / "work" / "pool", per_class=1)
    images = sorted(pool.rglob("*.png"))[:6]
    paths = [image.relative_to(tmp_path / "work").as_posix() for image in images]
    items = [
        PageItem(path, cluster=index // 2, cluster_size=40, reason="typical", thumbnail=thumbnail_uri(image))
        for index, (path, image) in enumerate(zip(paths, images, strict=True))
    ]
    return write_label_page(tmp_path / "work" / "to-label.html", items, CLASSES, "6 images"), paths


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    chromium = Chromium(profile=tmp_path / "profile", downloads=tmp_path / "downloads")
    yield chromium
    chromium.close()


def values(browser: Chromium) -> list[str]:
    return browser.evaluate("Array.from(document.querySelectorAll('input.label')).map(i => i.value)")


def test_label_page_in_chromium(browser: Chromium, page: tuple[Path, list[str]], tmp_path: Path) -> None:
    html, paths = page
    browser.open(html)
    # In a fresh headless profile the first reload after a page's first load lost its localStorage
    # writes in 3 of 10 runs (measured; the same page kept them in 10 of 10 once reloaded first).
    browser.reload()
    loaded = browser.evaluate(
        "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length"
    )
    assert loaded == 6
    captions = browser.evaluate("Array.from(document.querySelectorAll('figcaption')).map(c => c.textContent)")
    assert [caption.split(" ")[0] for caption in captions] == paths
    assert browser.evaluate("document.querySelectorAll('h2').length") == 3  # grouped by cluster

    browser.press("2")  # the first field has the focus: digit 2 is the second class
    browser.press("Enter")
    browser.type_text("moth")  # a class not offered: accepted, and offered from now on
    browser.press("Tab")
    browser.press("1")
    browser.press("Enter")
    browser.type_text("x")
    browser.press("3")  # after free text a digit is just a character
    expected = ["bee", "moth", "ant", "x3", "", ""]
    assert values(browser) == expected
    assert "moth" in browser.evaluate(
        "Array.from(document.querySelectorAll('#classes option')).map(o => o.value)"
    )

    browser.reload()
    assert values(browser) == expected

    browser.evaluate("document.getElementById('download').click()")
    name = browser.wait_for_download()
    assert name == "labels.csv"
    with (tmp_path / "downloads" / name).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["path", "label"],
        *[[path, label] for path, label in zip(paths, expected, strict=True) if label],
    ]

    # saved beside the page, as it says, the CSV is what `finetune --labels` reads
    labels_csv = html.parent / "labels.csv"
    shutil.copy(tmp_path / "downloads" / name, labels_csv)
    assert read_labels(labels_csv).labels == ("bee", "moth", "ant", "x3")
    result = CliRunner().invoke(
        app,
        ["finetune", "--labels", str(labels_csv), "--scratch", "--arch", "test_resnet", "--epochs", "1",
         "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "tuned"), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tuned" / "model.safetensors").is_file()


def test_paths_are_escaped_and_the_data_block_cannot_be_closed() -> None:
    item = PageItem('a/<img onerror=x>"</script>.png', 0, 1, "typical", "")
    text = render_label_page([item], ["<i>"], "t", "labels.csv")
    assert "</script>.png" not in text and "<img onerror" not in text and '<option value="&lt;i&gt;">' in text
    assert "cannot be decoded" in text  # a file without a thumbnail still gets its field


def _fields_page(folder: Path, classes: Sequence[str], earlier: dict[str, str] | None = None) -> Path:
    """A page of 12 images to label (no thumbnails needed for keys) and `earlier` labelled ones."""
    items = [PageItem(f"new/{index}.png", index % 3, 4, "typical", "") for index in range(12)]
    items += [
        PageItem(path, -1, 0, "labelled earlier", "", earlier=label)
        for path, label in (earlier or {}).items()
    ]
    return write_label_page(folder / "to-label.html", items, classes, "t", "labels-round2.csv")


@pytest.mark.parametrize(
    "classes",
    [
        [str(digit) for digit in range(10)],
        [str(number) for number in range(1, 13)],
        list(CLASSES),
        [f"class {letter}" for letter in "abcdefghijk"],  # digits pick the first 9, the rest are typed
    ],
    ids=["0-9", "1-12", "names", "11 names"],
)
def test_every_key_stores_the_label_shown_beside_it(
    browser: Chromium, tmp_path: Path, classes: list[str]
) -> None:
    browser.open(_fields_page(tmp_path, classes))
    legend = browser.evaluate(
        "Array.from(document.querySelectorAll('#legend span')).map(s => [s.dataset.key, s.dataset.label,"
        " s.textContent])"
    )
    # every class is in the legend once, and what is shown beside it names it
    assert sorted(label for _, label, _ in legend) == sorted(classes)
    assert all(text.startswith(keys) and text.rstrip().endswith(label) for keys, label, text in legend)
    for index, (keys, _, _) in enumerate(legend):
        browser.evaluate(f"document.querySelectorAll('input.label')[{index}].focus()")
        for key in keys:  # a digit as a key press (the shortcut's path), other text as typed
            browser.press(key) if key.isdigit() else browser.type_text(key)
        browser.press("Enter")
    stored = values(browser)[: len(legend)]
    assert stored == [label for _, label, _ in legend]
    if classes[0] == "0":  # the keys of numeric classes are their names: 3 stores "3", not the third class
        assert dict((keys, label) for keys, label, _ in legend)["3"] == "3"


def test_earlier_labels_are_shown_editable_and_a_change_is_confirmed(
    browser: Chromium, tmp_path: Path
) -> None:
    earlier = {"old/a.png": "bee", "old/b.png": "ant"}
    browser.open(_fields_page(tmp_path, CLASSES, earlier))
    assert values(browser)[12:] == ["bee", "ant"]  # carried, shown in their fields
    browser.evaluate("document.querySelectorAll('input.label')[11].focus()")
    browser.press("1")  # "ant" for the last new image
    browser.press("Enter")  # moves to the first earlier image, its label selected: a key replaces it
    browser.press("3")
    assert values(browser)[11:] == ["ant", "wasp", "ant"]
    assert browser.evaluate("document.querySelectorAll('input.label')[12].classList.contains('changed')")
    assert "1 earlier label changed" in browser.evaluate("document.getElementById('count').textContent")

    browser.evaluate("window.confirm = message => { window.asked = message; return false; }")
    browser.evaluate("document.getElementById('download').click()")
    assert "old/a.png: bee -> wasp" in browser.evaluate("window.asked")
    assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").iterdir())
    browser.evaluate("window.confirm = () => true")
    browser.evaluate("document.getElementById('download').click()")
    name = browser.wait_for_download()
    assert name == "labels-round2.csv"  # not labels.csv: the round-1 file beside it stays
    with (tmp_path / "downloads" / name).open(newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [
            ["path", "label"], ["new/11.png", "ant"], ["old/a.png", "wasp"], ["old/b.png", "ant"]
        ]  # fmt: skip


def test_a_caption_breaks_long_paths_but_never_inside_the_reason(browser: Chromium, tmp_path: Path) -> None:
    # `word-break: break-all` split the reason wherever the line ended: "(typi" / "cal)" (issue 22, item 13)
    items = [
        PageItem(f"{'d/' * length}x.png", cluster=0, cluster_size=40, reason="typical", thumbnail="")
        for length in range(1, 25)  # every position of the reason on its line
    ]
    html = write_label_page(tmp_path / "to-label.html", items, CLASSES, "captions")
    browser.open(html)
    lines_of_reason = browser.evaluate("""Array.from(document.querySelectorAll('figcaption')).map(caption => {
        const node = caption.firstChild, start = node.textContent.indexOf('(typical)');
        const range = document.createRange();
        range.setStart(node, start);
        range.setEnd(node, start + '(typical)'.length);
        return new Set(Array.from(range.getClientRects()).map(rect => Math.round(rect.top))).size;
    })""")
    assert lines_of_reason == [1] * len(items)
    widths = browser.evaluate("Array.from(document.querySelectorAll('figcaption')).map(c => c.scrollWidth)")
    assert max(widths) <= 150  # a path longer than the cell still wraps inside it
