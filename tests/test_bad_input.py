"""Every kind of bad input gets one line naming the file or value, exit code 2, and no traceback.

Table-driven: each row builds its input in a fresh folder, runs the CLI as a user would, and checks
the one line it prints. Bad images inside an otherwise good folder are not errors: they are
skipped, counted and listed (see test_bad_images_are_skipped_and_listed).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from labelfew.artifacts import load_artifact
from labelfew.cli import app
from labelfew.data.labels import read_labels
from labelfew.errors import UserError

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _png(path: Path, side: int = 32, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.random.default_rng(len(str(path))).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(values).convert(mode).save(path)
    return path


def _labelled_tree(root: Path, per_class: int = 6) -> Path:
    for label in ("cat", "dog"):
        for index in range(per_class):
            _png(root / label / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real pretrain run (1 epoch of test_resnet) whose artifacts the rows corrupt or misuse."""
    root = tmp_path_factory.mktemp("pretrained")
    images = _labelled_tree(root / "images")
    result = runner.invoke(app, [
        "pretrain", str(images), "--arch", "test_resnet", "--no-small-stem", "--epochs", "1",
        "--batch-size", "8", "--out", str(root / "run"), "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


Row = tuple[str, Callable[[Path, Path], list[str]], str]


def _csv(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _copy_artifact(pretrained: Path, folder: Path, mangle: Callable[[bytes], bytes]) -> Path:
    folder.mkdir()
    data = (pretrained / "run" / "pretrain" / "backbone.safetensors").read_bytes()
    (folder / "backbone.safetensors").write_bytes(mangle(data))
    return folder / "backbone.safetensors"


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _embeddings(pretrained: Path) -> Path:
    """An embeddings file written by `labelfew embed` (made once), which is not a model."""
    path = pretrained / "embeddings.safetensors"
    if not path.is_file():
        args = [
            "embed",
            str(pretrained / "images"),
            "--from",
            str(pretrained / "run"),
            "--out",
            str(path),
            "--quiet",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return path


def _finetuned(pretrained: Path) -> Path:
    artifact = pretrained / "run" / "finetune-images" / "model.safetensors"
    if not artifact.is_file():
        result = runner.invoke(
            app,
            [
                "finetune",
                "--labels",
                str(pretrained / "images"),
                "--from",
                str(pretrained / "run"),
                "--epochs",
                "1",
                "--quiet",
            ],
        )
        assert result.exit_code == 0, result.output
    return artifact


ROWS: list[Row] = [
    ("missing folder", lambda t, p: ["pretrain", str(t / "nope")], "no such folder"),
    ("a file, not a folder", lambda t, p: ["pretrain", str(_csv(t / "a.txt", "x"))], "not a folder"),
    ("empty folder", lambda t, p: ["pretrain", str(t)], "no image files"),
    (
        "no decodable image",
        lambda t, p: ["pretrain", str(_csv(t / "a.jpg", "not an image").parent)],
        "could be opened",
    ),
    (
        "batch larger than the data",
        lambda t, p: ["pretrain", str(_labelled_tree(t)), "--batch-size", "64"],
        "larger than",
    ),
    (
        "unknown place for the views",
        lambda t, p: ["pretrain", str(_labelled_tree(t)), "--augment-on", "gpu", "--batch-size", "8"],
        "--augment-on gpu: use one of auto, device, workers",
    ),
    (
        "decoded images over the memory budget",
        lambda t, p: [
            "pretrain",
            str(_labelled_tree(t)),
            "--augment-on",
            "device",
            "--memory-budget",
            "0.00001",
            "--batch-size",
            "8",
        ],
        "raise --memory-budget or use --augment-on workers",
    ),
    (
        "memory budget not positive",
        lambda t, p: ["pretrain", str(_labelled_tree(t)), "--memory-budget", "0", "--batch-size", "8"],
        "--memory-budget 0.0: give a positive size",
    ),
    (
        "unknown arch",
        lambda t, p: ["pretrain", str(_labelled_tree(t)), "--arch", "resnet_nope", "--batch-size", "8"],
        "not a timm model",
    ),
    ("fp16 without a GPU", lambda t, p: ["pretrain", str(_labelled_tree(t)), "--precision", "fp16"], "fp16"),
    (
        "unknown precision",
        lambda t, p: ["pretrain", str(_labelled_tree(t)), "--precision", "fp8"],
        "--precision fp8",
    ),
    (
        "CSV missing columns",
        lambda t, p: [
            "subset",
            str(_csv(t / "l.csv", "file,y\na,b\n")),
            "--fraction",
            "0.5",
            "--out",
            str(t / "o.csv"),
        ],
        "missing column",
    ),
    (
        "CSV path that does not exist",
        lambda t, p: [
            "subset",
            str(_csv(t / "l.csv", "path,label\nmissing.png,cat\n")),
            "--fraction",
            "0.5",
            "--out",
            str(t / "o.csv"),
        ],
        "do not exist",
    ),
    (
        "CSV duplicate path, two labels",
        lambda t, p: [
            "subset",
            str(_csv(t / "l.csv", f"path,label\n{_png(t / 'a.png')},cat\n{t / 'a.png'},dog\n")),
            "--fraction",
            "0.5",
            "--out",
            str(t / "o.csv"),
        ],
        "labelled both",
    ),
    (  # repeated --labels used to keep only the last file (issue 22, item 2)
        "finetune --labels twice, one path labelled differently",
        lambda t, p: [
            "finetune",
            "--labels",
            str(_csv(t / "one.csv", f"path,label\n{_png(t / 'a.png')},cat\n{_png(t / 'b.png')},dog\n")),
            "--labels",
            str(_csv(t / "two.csv", f"path,label\n{t / 'a.png'},dog\n")),
            "--scratch",
        ],
        # the line names both rows: two.csv:2 first, then one.csv:2
        "one.csv:2) and 'dog' here; keep one",
    ),
    (
        "CSV not UTF-8",
        lambda t, p: [
            "subset",
            str(_csv(t / "l.csv", b"path,label\n\xff\xfe.png,cat\n")),
            "--fraction",
            "0.5",
            "--out",
            str(t / "o.csv"),
        ],
        "not UTF-8",
    ),
    (
        "CSV with no rows",
        lambda t, p: [
            "subset",
            str(_csv(t / "l.csv", "path,label\n")),
            "--fraction",
            "0.5",
            "--out",
            str(t / "o.csv"),
        ],
        "no rows",
    ),
    (
        "fraction 0",
        lambda t, p: ["subset", str(_labelled_tree(t)), "--fraction", "0", "--out", str(t / "o.csv")],
        "out of range",
    ),
    (
        "fraction above 1",
        lambda t, p: ["subset", str(_labelled_tree(t)), "--fraction", "1.01", "--out", str(t / "o.csv")],
        "out of range",
    ),
    (
        "fraction that empties a class",
        lambda t, p: ["subset", str(_labelled_tree(t)), "--fraction", "0.01", "--out", str(t / "o.csv")],
        "empty",
    ),
    (
        "wrong stage",
        lambda t, p: ["finetune", "--labels", str(p / "images"), "--from", str(_finetuned(p))],
        "a finetune artifact, but a pretrain",
    ),
    (
        "different arch than asked",
        lambda t, p: [
            "finetune",
            "--labels",
            str(p / "images"),
            "--from",
            str(p / "run"),
            "--arch",
            "resnet18",
        ],
        "pretrained as test_resnet",
    ),
    (
        "truncated artifact",
        lambda t, p: [
            "finetune",
            "--labels",
            str(p / "images"),
            "--from",
            str(_copy_artifact(p, t / "x", lambda b: b[: len(b) // 2])),
        ],
        "not a readable safetensors",
    ),
    (
        "random-bytes artifact",
        lambda t, p: [
            "finetune",
            "--labels",
            str(p / "images"),
            "--from",
            str(_copy_artifact(p, t / "x", lambda b: os.urandom(len(b)))),
        ],
        "not a readable safetensors",
    ),
    (
        "unseen labels at evaluation",
        lambda t, p: [
            "evaluate",
            "--test",
            str(_csv(t / "test.csv", f"path,label\n{_png(t / 'b.png')},bird\n")),
            "--from",
            str(p / "run"),
            "--bank",
            str(p / "images"),
        ],
        "not classes of the model",
    ),
    (
        "output folder not writable",
        lambda t, p: [
            "subset",
            str(_labelled_tree(t / "d")),
            "--fraction",
            "0.5",
            "--out",
            str(_csv(t / "file", "x") / "sub" / "o.csv"),
        ],
        "not writable",
    ),
    (
        # A recipe's 10 warmup epochs with a 1-epoch run used to fail deep in the schedule (exit 1).
        "warmup not shorter than the run",
        lambda t, p: [
            "pretrain",
            str(_labelled_tree(t / "d")),
            "--recipe",
            str(REPO / "recipes" / "cifar10-resnet18.toml"),
            "--epochs",
            "1",
            "--batch-size",
            "8",
        ],
        "--warmup-epochs 10 is not shorter than --epochs 1",
    ),
    (  # used to end in IsADirectoryError after the labels were read (issue 22, item 10)
        "subset --out an existing folder",
        lambda t, p: [
            "subset",
            str(_labelled_tree(t / "d")),
            "--fraction",
            "0.5",
            "--out",
            str(_folder(t / "o")),
        ],
        "a folder; name the CSV to write",
    ),
    (
        "embed --out an existing folder",
        lambda t, p: [
            "embed",
            str(p / "images"),
            "--from",
            str(p / "run"),
            "--out",
            str(_folder(t / "e.safetensors")),
        ],
        "a folder; name the embeddings file",
    ),
    (  # used to be a KeyError, exit 1 (issue 22, item 10)
        "embeddings passed to evaluate as the model",
        lambda t, p: [
            "evaluate",
            "--test",
            str(p / "images"),
            "--bank",
            str(p / "images"),
            "--from",
            str(_embeddings(p)),
        ],
        "embeddings written by `labelfew embed`, not a model; pass --from the model they came from",
    ),
    *[
        (  # issue 25: each exits 2 with one line naming the file and the class
            f"finetune --class-weights {case}",
            lambda t, p, text=text: [
                "finetune",
                "--labels",
                str(p / "images"),
                "--from",
                str(p / "run"),
                "--class-weights",
                str(_csv(t / "weights.csv", text)),
            ],
            expected,
        )
        for case, text, expected in [
            (
                "unknown class",
                "class,weight\ncat,1\ndog,1\nbird,2\n",
                "weights.csv:4: class 'bird' is not a class",
            ),
            ("missing class", "class,weight\ncat,1\n", "weights.csv: no weight for class 'dog'"),
            ("zero weight", "class,weight\ncat,0\ndog,1\n", "weights.csv:2: class 'cat' has weight '0'"),
            (
                "infinite weight",
                "class,weight\ncat,1\ndog,inf\n",
                "weights.csv:3: class 'dog' has weight 'inf'",
            ),
        ]
    ],
    (
        "finetune --class-weights no such file",
        lambda t, p: ["finetune", "--labels", str(p / "images"), "--class-weights", str(t / "nope.csv")],
        "nope.csv: use none, auto or a CSV file class,weight (no such file)",
    ),
    (
        "embeddings passed to select as the model",
        lambda t, p: ["select", str(p / "images"), "--budget", "2", "--from", str(_embeddings(p))],
        "embeddings written by `labelfew embed`, not a model",
    ),
]


@pytest.mark.parametrize(("case", "build", "expected"), ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_row(case: str, build: Callable[[Path, Path], list[str]], expected: str, tmp_path: Path,
                       pretrained: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    args = build(tmp_path, pretrained)
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}\n{result.output}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}:\n{result.output}"
    assert expected in lines[0], f"{case}: {lines[0]}"


@pytest.mark.parametrize("place", ["device", "workers"])
def test_bad_images_are_skipped_and_listed(tmp_path: Path, place: str) -> None:
    images = tmp_path / "images"
    for index in range(12):
        _png(images / f"good{index}.png")
    _png(images / "palette.png", mode="P")
    _png(images / "alpha.png", mode="RGBA")
    _png(images / "gray.png", mode="L")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(images / "sixteen.png")
    Image.new("CMYK", (32, 32), (10, 20, 30, 0)).save(images / "cmyk.jpg")
    (images / "zero.jpg").write_bytes(b"")
    (images / "text.png").write_text("hello")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (images / "loop").symlink_to(images, target_is_directory=True)
    result = runner.invoke(app, [
        "pretrain", str(images), "--arch", "test_resnet", "--no-small-stem", "--epochs", "1", "--image-size", "32",
        "--batch-size", "8", "--max-bad-fraction", "0.5", "--out", str(tmp_path / "run"), "--quiet",
        "--augment-on", place,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "pretrain" / "run.json").read_text())
    skipped = {Path(path).name for path in record["data"]["skipped_files"]}
    if place == "device":  # every file is decoded before training: all three are found
        assert skipped == {"zero.jpg", "text.png", "truncated.jpg"}
    else:  # found when a batch reaches them; drop_last may leave one unread
        assert skipped <= {"zero.jpg", "text.png", "truncated.jpg"} and skipped
    assert record["data"]["images"] == 20  # the loop is not followed twice


def test_too_many_bad_images_fail_clearly(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for index in range(8):
        _png(images / f"good{index}.png")
    for index in range(8):
        (images / f"bad{index}.jpg").write_bytes(b"\x00" * 10)
    result = runner.invoke(app, [
        "pretrain", str(images), "--arch", "test_resnet", "--no-small-stem", "--epochs", "2", "--image-size", "32",
        "--batch-size", "8", "--out", str(tmp_path / "run"), "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "could not be decoded" in result.output and "--max-bad-fraction" in result.output


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_csv_reader_fuzz_random_bytes(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.csv"
    path.write_bytes(data)
    with contextlib.suppress(UserError):
        read_labels(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.sampled_from(["a.png", "b.png", "missing.png", "", " a.png", "sub/../a.png"]),
                               st.sampled_from(["cat", "dog", "", "ü", "a,b"])), max_size=8),
       header=st.sampled_from(["path,label", "label,path", "path", "path,label,extra", "", "PATH,LABEL"]))  # fmt: skip
def test_csv_reader_fuzz_rows(rows: list[tuple[str, str]], header: str, tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        if not (tmp_path / name).exists():
            _png(tmp_path / name)
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if header:
        buffer.write(header + "\n")
    for row in rows:
        writer.writerow(row)
    path = tmp_path / "rows.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    try:
        labeled = read_labels(path)
    except UserError:
        return
    assert len(labeled.paths) == len(labeled.labels) > 0
    assert all(path.is_file() for path in labeled.paths)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), header_length=st.integers(min_value=0, max_value=2**40))
def test_artifact_loader_fuzz(data: bytes, header_length: int, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(header_length.to_bytes(8, "little") + data)
    with contextlib.suppress(UserError):
        load_artifact(path)


BEFORE_DECODING: list[tuple[str, list[str], str]] = [
    ("pretrain", ["--optimizer", "foo"], "--optimizer foo: use one of lars, sgd, adamw"),
    ("pretrain", ["--lr-rule", "cube"], "--lr-rule cube: use one of sqrt, linear"),
    ("pretrain", ["--augment-on", "gpu"], "--augment-on gpu: use one of auto, device, workers"),
    ("pretrain", ["--precision", "fp8"], "--precision fp8: use one of auto, bf16, fp16, no"),
    ("pretrain", ["--epochs", "0"], "--epochs 0: use at least 1"),
    ("pretrain", ["--memory-budget", "0"], "--memory-budget 0.0: give a positive size"),
    ("pretrain", ["--decode-on", "gpu"], "--decode-on gpu: use one of auto, cpu, device"),
    ("pretrain", ["--init", "absent.pth"], "--init absent.pth: no such file or folder"),
    ("pretrain", ["--init-prefix", "module."], "--init-prefix module.: only with --init"),
    ("finetune", ["--optimizer", "adam"], "--optimizer adam: use one of sgd, lars, adamw"),
    ("finetune", ["--precision", "fp8"], "--precision fp8: use one of"),
    ("finetune", ["--val-fraction", "1"], "--val-fraction 1.0: use a value in [0, 1)"),
    ("evaluate", ["--knn-k", "0"], "--knn-k 0: use at least 1"),
    ("predict", ["--top-k", "0"], "--top-k 0: use at least 1"),
    ("embed", ["--batch-size", "0"], "--batch-size 0: use at least 1"),
    ("similar", ["-k", "0"], "--top-k 0: use at least 1"),
    ("export", ["--format", "tflite"], "--format tflite: use one of safetensors, onnx, both"),
    ("subset", ["--fraction", "0"], "--fraction 0.0: out of range"),
    # values inside the declared range that used to fail late (issue 22, item 10)
    ("pretrain", ["--base-lr", "inf"], "--base-lr inf: use a finite number, a positive value"),
    ("pretrain", ["--weight-decay", "inf"], "--weight-decay inf: use a finite number, at least 0"),
    ("pretrain", ["--image-size", "100000"], "--image-size 100000: use a side from 8 to 1024 px"),
    ("pretrain", ["--seed", "-1"], "--seed -1: use a value from 0 to 4294967295"),
    ("finetune", ["--lr", "inf"], "--lr inf: use a finite number, a positive value"),
    ("finetune", ["--weight-decay", "nan"], "--weight-decay nan: use a finite number, at least 0"),
    ("finetune", ["--seed", "-1"], "--seed -1: use a value from 0 to 4294967295"),
    ("subset", ["--fraction", "0.5", "--seed", "4294967296"], "--seed 4294967296: use a value from 0"),
]


def _spy_on_decoding(marker: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[int]]:
    """Wraps PIL's `Image.open`, which every decode of these PNG files goes through (only JPEGs can
    take the device decoder), to append its process id to `marker`; returns a reader of those ids. A file, not a list, so that the DataLoader worker
    processes (forked: they inherit the patched module) are seen too."""
    original = Image.open

    def spy(*args: object, **kwargs: object) -> Image.Image:
        with marker.open("a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    return lambda: [int(line) for line in marker.read_text().split()] if marker.is_file() else []


def test_the_decoding_spy_sees_decodes_here_and_in_worker_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The positive control of the two tests below: the same pretrain without a bad option, its
    images decoded by 2 streaming workers."""
    images = _labelled_tree(tmp_path / "images")
    opened = _spy_on_decoding(tmp_path / "opened", monkeypatch)
    result = runner.invoke(app, ["pretrain", str(images), "--arch", "test_resnet", "--no-small-stem", "--epochs",
                                 "1", "--batch-size", "8", "--augment-on", "workers", "--workers", "2", "--out",
                                 str(tmp_path / "run"), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert os.getpid() in opened() and set(opened()) - {os.getpid()}, "no decode seen here or in a worker"


@pytest.mark.parametrize(
    ("command", "bad", "expected"), BEFORE_DECODING, ids=[f"{r[0]} {' '.join(r[1])}" for r in BEFORE_DECODING]
)
def test_a_bad_option_exits_2_before_any_image_is_decoded(command: str, bad: list[str], expected: str,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    images = _labelled_tree(tmp_path / "images")
    opened = _spy_on_decoding(tmp_path / "opened", monkeypatch)
    where = {
        "pretrain": [str(images), "--batch-size", "8"],
        "finetune": ["--labels", str(images)],
        "evaluate": ["--test", str(images), "--bank", str(images)],
        "predict": [str(images)],
        "embed": [str(images)],
        "similar": [str(images / "cat" / "0.png")],
        "export": [],
        "subset": [str(images), "--out", str(tmp_path / "o.csv")],
    }[command]
    result = runner.invoke(app, [command, *where, *bad])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert opened() == [], f"{len(opened())} image(s) opened before the bad option was refused"


def test_a_bad_recipe_value_exits_2_before_any_image_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _labelled_tree(tmp_path / "images")
    recipe = _csv(tmp_path / "r.toml", '[pretrain]\nlr_rule = "cube"\n')
    opened = _spy_on_decoding(tmp_path / "opened", monkeypatch)
    result = runner.invoke(app, ["pretrain", str(images), "--recipe", str(recipe)])
    assert result.exit_code == 2 and "--lr-rule cube: use one of sqrt, linear" in result.output, result.output
    assert opened() == []
