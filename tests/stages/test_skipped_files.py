"""Hostile folders and unreadable images through the stages and use commands: file names that are
not UTF-8, links out of the folder, a run folder inside its own input, undecodable labelled and
unlabeled images (counted and named in the terminal and run.json)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyRun, copy_tiny_run
from PIL import Image
from typer.testing import CliRunner

from labelfew import engine
from labelfew.cli import app
from labelfew.config import FinetuneConfig, PretrainConfig
from labelfew.errors import UserError
from labelfew.stages import finetune, pretrain

runner = CliRunner()
LATIN1 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name: surrogate escapes in Python
"""A file name that is not UTF-8, as `os.listdir` returns it."""
LATIN1_SHOWN = "caf\\xe9.png"


@pytest.fixture(autouse=True)
def _on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("labelfew.use.inference.device", lambda: torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny(tiny_pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The shared 1-epoch pretrain on 60 digits of 3 classes, a Latin-1 name among its test images."""
    tiny = copy_tiny_run(tiny_pretrained, tmp_path_factory.mktemp("skipped"))
    first = sorted((tiny["test"] / "0").iterdir())[0]
    first.rename(tiny["test"] / "0" / LATIN1)
    return tiny


def _finetune(tiny: TinyRun, **options: Any) -> Path:
    values: dict[str, Any] = {"labels": tiny["labels"], "source": tiny["run"], "epochs": 1, "batch_size": 15,
                              "workers": 0, "quiet": True, **options}  # fmt: skip
    return finetune.run(FinetuneConfig(**values))


def shows(output: str, text: str) -> bool:
    """Whether the terminal `output` holds `text`, wherever rich wrapped its lines."""
    return "".join(text.split()) in "".join(output.split())


def _broken(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # a PNG signature and nothing readable
    return path


def test_pretrain_of_a_folder_that_holds_its_own_run_resumes(
    tmp_path: Path, digits_folder: tuple[Path, Path]
) -> None:
    """`pretrain .` with the run inside the folder: the run's views.png is never an image, so the
    rerun resumes; a Latin-1 name trains; `X/up -> ..` does not read X's siblings."""
    data = tmp_path / "X"
    data.mkdir()
    for path in sorted(digits_folder[0].glob("*/*.png"))[:11]:
        shutil.copy(path, data / f"{path.parent.name}-{path.name}")
    shutil.copy(next(digits_folder[0].glob("*/*.png")), data / LATIN1)
    shutil.copytree(digits_folder[0] / "1", tmp_path / "sibling")  # what `up` would lead to
    (data / "up").symlink_to("..", target_is_directory=True)
    config = PretrainConfig(data=data, out=data / "runs" / "r", arch="test_resnet", small_stem=False, epochs=1,
                            batch_size=12, workers=0, quiet=True)  # fmt: skip
    artifact = pretrain.run(config)
    assert (artifact.parent / "views.png").is_file()
    with engine.console.capture() as captured:
        pretrain.run(dataclasses.replace(config, quiet=False))  # resumes: the same 12 images
    record = json.loads((artifact.parent / "run.json").read_text())
    assert record["data"]["images"] == 12
    assert record["data"]["skipped_files"] == [
        f"{data / 'up'}: a link out of the folder (--follow-links follows it)"
    ]
    assert shows(captured.get(), f"skipped 1 file(s): {data / 'up'}")


def test_an_undecodable_labelled_image_stops_finetune_unless_skip_bad(tiny: TinyRun) -> None:
    broken = _broken(tiny["labels"] / "0" / "zz-broken.png")
    try:
        with pytest.raises(UserError, match="--skip-bad"):
            _finetune(tiny, out=tiny["work"] / "refused")
        assert not (tiny["work"] / "refused" / "log.jsonl").exists()  # before any training
        with engine.console.capture() as captured:
            artifact = _finetune(tiny, out=tiny["work"] / "skipped", skip_bad=True, quiet=False)
    finally:
        broken.unlink()
    record = json.loads((artifact.parent / "run.json").read_text())
    assert record["data"]["skipped_files"] == [str(broken)] and record["data"]["skipped"] == 1
    assert record["labels"]["images"] == 15
    assert shows(captured.get(), f"skipped 1 file(s): {broken}")


def test_fixmatch_counts_and_names_the_unlabeled_images_it_skips(tiny: TinyRun) -> None:
    broken = _broken(tiny["unlabeled"] / "1" / "zz-broken.png")
    try:
        with engine.console.capture() as captured:
            artifact = _finetune(tiny, out=tiny["work"] / "fixmatch", method="fixmatch", unlabeled=tiny["unlabeled"],
                                 batch_size=5, mu=2, threshold=0.5, quiet=False)  # fmt: skip
    finally:
        broken.unlink()
    record = json.loads((artifact.parent / "run.json").read_text())
    assert record["data"]["skipped"] == 1 and record["data"]["skipped_files"] == [str(broken)]
    assert shows(captured.get(), f"skipped 1 file(s): {broken}")


@pytest.fixture(scope="module")
def model(tiny: TinyRun) -> Path:
    return _finetune(tiny, out=tiny["work"] / "model")


def test_use_commands_write_a_name_that_is_not_utf8_escaped(tiny: TinyRun, model: Path) -> None:
    """predict, embed, subset and select used to exit 1 with UnicodeEncodeError on such a name."""
    work = tiny["work"]
    commands = {
        "predict": ["predict", str(tiny["test"]), "--from", str(model), "--out", str(work / "p.csv"), "--workers", "0"],
        "embed": ["embed", str(tiny["test"]), "--from", str(model), "--out", str(work / "e.safetensors"),
                  "--workers", "0"],
        "subset": ["subset", str(tiny["test"]), "--per-class", "5", "--out", str(work / "s.csv")],
        "select": ["select", str(tiny["test"]), "--from", str(tiny["run"]), "--budget", "15", "--out",
                   str(work / "t.csv"), "--workers", "0"],
    }  # fmt: skip
    for name, arguments in commands.items():
        result = runner.invoke(app, arguments)
        assert result.exit_code == 0, (name, result.output, result.exception)
    for csv_file in ("p.csv", "e.csv", "s.csv", "t.csv"):
        with (work / csv_file).open(encoding="utf-8", newline="") as stream:
            paths = [row["path"] for row in csv.DictReader(stream)]
        assert any(path.endswith(LATIN1_SHOWN) for path in paths), csv_file


def test_a_fifo_named_like_an_image_is_skipped_by_predict(tiny: TinyRun, model: Path, tmp_path: Path) -> None:
    """Never opened (it would block forever), counted and named; a folder link out is followed on request."""
    folder = tmp_path / "images"
    shutil.copytree(tiny["test"] / "1", folder)
    os.mkfifo(folder / "pipe.png")
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "o.png")
    (folder / "more").symlink_to(tmp_path / "outside", target_is_directory=True)
    for flags, rows, skipped in (([], 5, 2), (["--follow-links"], 6, 1)):
        arguments = [
            "predict",
            str(folder),
            "--from",
            str(model),
            "--out",
            str(tmp_path / "p.csv"),
            "--workers",
            "0",
        ]
        result = runner.invoke(app, arguments + flags)
        assert result.exit_code == 0, result.output
        assert shows(result.output, f"skipped {skipped} file(s) (not read):")
        assert shows(result.output, f"{folder / 'pipe.png'}: not a regular file")
        with (tmp_path / "p.csv").open(encoding="utf-8", newline="") as stream:
            assert len(list(csv.DictReader(stream))) == rows
