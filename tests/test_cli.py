"""The CLI surface: help, version, the subset command, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labelfew import __version__
from labelfew.cli import app

runner = CliRunner()
COMMANDS = ("pretrain", "subset", "finetune", "evaluate", "demo", "predict", "embed", "similar", "export")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # ./runs of these tests is the temporary folder's


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"labelfew {__version__}"
    for command in COMMANDS:
        result = runner.invoke(app, [command, "-h"])
        assert result.exit_code == 0, command
        assert "Usage" in result.stdout


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "labelfew", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and __version__ in result.stdout


def test_subset_writes_a_balanced_csv(digits_folder: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = digits_folder
    out = tmp_path / "subset.csv"
    result = runner.invoke(app, ["subset", str(train), "--fraction", "0.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    counts = {label: sum(row["label"] == label for row in rows) for label in {row["label"] for row in rows}}
    assert len(counts) == 10 and all(13 <= count <= 14 for count in counts.values())
    assert all((tmp_path / row["path"]).is_file() for row in rows)  # paths relative to the CSV


def _one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path: Path, digits_folder: tuple[Path, Path]) -> None:
    train, test = digits_folder
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("file,class\na.png,1\n")
    assert "no such folder" in _one_line_error(["pretrain", str(tmp_path / "missing")])
    assert "no image files" in _one_line_error(["pretrain", str(tmp_path / "empty")])
    assert "larger than" in _one_line_error(["pretrain", str(train), "--batch-size", "100000"])
    assert "not a timm model" in _one_line_error(
        ["pretrain", str(train), "--arch", "resnet_nope", "--batch-size", "8"]
    )
    assert "fp16" in _one_line_error(["pretrain", str(train), "--precision", "fp16", "--batch-size", "8"])
    assert "out of range" in _one_line_error(["subset", str(train), "--fraction", "0", "--out", "x.csv"])
    assert "out of range" in _one_line_error(["subset", str(train), "--fraction", "1.5", "--out", "x.csv"])
    assert "empty" in _one_line_error(["subset", str(train), "--fraction", "0.001", "--out", "x.csv"])
    assert "missing column" in _one_line_error(
        ["subset", str(tmp_path / "bad.csv"), "--fraction", "0.5", "--out", "x.csv"]
    )
    assert "no pretrain artifact" in _one_line_error(["finetune", "--labels", str(train)])
    assert "no such file" in _one_line_error(
        ["evaluate", "--test", str(test), "--from", str(tmp_path / "m.safetensors")]
    )
    assert "not valid TOML" in _one_line_error(
        ["pretrain", str(train), "--recipe", str(tmp_path / "bad.csv")]
    )


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["pretrain", str(tmp_path / "missing"), "--debug"])
    assert result.exit_code != 0 and result.exception is not None


def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "evaluate" / "report.json").is_file()
    assert (tmp_path / "demo" / "finetune-scratch-labels-10-per-class" / "model.safetensors").is_file()
