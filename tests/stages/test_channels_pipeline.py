"""Images as labs, clinics and factories have them, end to end as a user types the commands:
12-bit gray PNGs, DICOM files and 4-channel TIFFs through pretrain → finetune → evaluate → predict
→ export; an RGB `--init` on gray images; and the refusals (`--channels` against a backbone's own,
a resume with another window)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from medical_images import write_deep_folder, write_dicom_folder, write_multichannel_folder
from typer.testing import CliRunner

from labelfew.artifacts import load_artifact
from labelfew.cli import app
from labelfew.data.pixels import read_raw

runner = CliRunner()
ONNX = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None
PRETRAIN = ["--arch", "test_resnet", "--epochs", "1", "--batch-size", "24", "--workers", "0", "--quiet"]


def _ok(*arguments: str) -> None:
    result = runner.invoke(app, list(arguments))
    assert result.exit_code == 0, result.output


def _chain(train: Path, test: Path, run: Path, *pretrain: str) -> None:
    """pretrain → finetune → evaluate → predict → export, each as typed."""
    _ok("pretrain", str(train), "--out", str(run), *PRETRAIN, *pretrain)
    _ok("finetune", "--labels", str(train), "--from", str(run), "--epochs", "2", "--batch-size", "12",
        "--lr", "0.05", "--workers", "0", "--quiet")  # fmt: skip
    _ok("evaluate", "--test", str(test), "--from", str(run), "--workers", "0", "--quiet")
    _ok(
        "predict",
        str(test),
        "--from",
        str(run),
        "--out",
        str(run / "predictions.csv"),
        "--workers",
        "0",
        "--quiet",
    )
    _ok("export", "--from", str(run), "--format", "both" if ONNX else "safetensors", "--out", str(run / "export"),
        "--quiet")  # fmt: skip


def _exported_input(run: Path) -> list[int]:
    """The exported model's input shape (without the batch): ONNX's when the export extra is there."""
    settings = json.loads((run / "export" / "config.json").read_text())
    shape: list[int] = settings["pretrained_cfg"]["input_size"]
    if ONNX:
        import onnx

        dimensions = onnx.load(str(run / "export" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
        assert [dimension.dim_value for dimension in dimensions[1:]] == shape
    return shape


def test_twelve_bit_gray_images_train_one_channel_models_through_their_window(tmp_path: Path) -> None:
    train = write_deep_folder(tmp_path / "train", per_class=8)
    test = write_deep_folder(tmp_path / "test", per_class=4, skip=8)
    run = tmp_path / "run"
    _chain(train, test, run)
    backbone = load_artifact(run / "pretrain" / "backbone.safetensors", "pretrain").spec
    assert backbone.channels == 1 and len(backbone.mean) == len(backbone.std) == 1
    values = np.concatenate([read_raw(path).values.ravel() for path in sorted(train.rglob("*.png"))])
    assert backbone.window is not None and values.max() > 255  # deep data: windowed, never /65535
    low, high = backbone.window
    assert np.percentile(values, 0.5) - 50 <= low < high <= np.percentile(values, 99.5) + 50  # a sample's
    record = json.loads((run / "pretrain" / "run.json").read_text())["input"]
    assert record["channels"] == 1 and record["window"] == [low, high] and record["survey"]["deep"]
    model = load_artifact(next(run.glob("finetune*/model.safetensors")), "finetune").spec
    assert (model.channels, model.window, model.mean) == (1, backbone.window, backbone.mean)  # followed
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert (
        len(rows) == 12
        and {row["label"] for row in rows} <= {"0", "1", "2"}
        and not any(row["error"] for row in rows)
    )
    report = json.loads((run / "evaluate" / "report.json").read_text())
    assert {row["method"] for row in report["rows"]} >= {"kNN", "linear probe"}
    assert _exported_input(run) == [1, 32, 32]


def test_four_channel_tiffs_train_four_channel_models(tmp_path: Path) -> None:
    train = write_multichannel_folder(tmp_path / "train", channels=4, per_class=8)
    test = write_multichannel_folder(tmp_path / "test", channels=4, per_class=4, skip=8)
    run = tmp_path / "run"
    _chain(train, test, run, "--channels", "4")
    model = load_artifact(next(run.glob("finetune*/model.safetensors")), "finetune")
    assert model.spec.channels == 4 and len(model.spec.mean) == 4
    assert next(value for value in model.tensors.values() if value.ndim == 4).shape[1] == 4  # the first conv
    assert _exported_input(run) == [4, 32, 32]


def test_four_channel_tiffs_without_channels_4_are_refused_before_any_work(tmp_path: Path) -> None:
    train = write_multichannel_folder(tmp_path / "train", channels=4, per_class=8)
    for asked in ("auto", "3", "1"):
        result = runner.invoke(app, ["pretrain", str(train), "--channels", asked, "--out", str(tmp_path / "run"),
                                     *PRETRAIN])  # fmt: skip
        assert result.exit_code == 2 and "pass --channels 4" in " ".join(result.output.split()), result.output
        assert not (tmp_path / "run" / "pretrain").exists()


def test_dicom_files_bring_their_own_window(tmp_path: Path) -> None:
    train = write_dicom_folder(tmp_path / "train", per_class=8)
    _ok("pretrain", str(train), "--out", str(tmp_path / "run"), *PRETRAIN)
    spec = load_artifact(tmp_path / "run" / "pretrain" / "backbone.safetensors").spec
    assert (spec.channels, spec.window, spec.file_windows) == (1, None, True)  # every file has its own
    _ok("pretrain", str(train), "--out", str(tmp_path / "hand"), "--window", "0,4095", *PRETRAIN)
    spec = load_artifact(tmp_path / "hand" / "pretrain" / "backbone.safetensors").spec
    assert (spec.window, spec.file_windows) == ((0.0, 4095.0), False)  # by hand: for every file


def test_an_rgb_init_on_gray_images_becomes_a_one_channel_model_with_summed_weights(
    tiny_pretrained: Path, tmp_path: Path
) -> None:
    train = write_deep_folder(tmp_path / "train", per_class=6)
    out = tmp_path / "finetune"
    init = tiny_pretrained / "run" / "pretrain" / "backbone.safetensors"
    _ok("finetune", "--labels", str(train), "--init", str(init), "--epochs", "1", "--batch-size", "12",
        "--lr", "0.05", "--workers", "0", "--out", str(out), "--quiet")  # fmt: skip
    rgb = load_artifact(init)
    model = load_artifact(out / "model.safetensors", "finetune")
    assert model.spec.channels == 1 and model.spec.mean == (sum(rgb.spec.mean) / 3,)
    key = next(name for name, value in rgb.tensors.items() if value.ndim == 4)
    first = model.tensors[f"backbone.{key}"]
    assert first.shape[1] == 1
    del model  # the fine-tuned conv moved; the start is what `--init` gave it:
    from labelfew.engine.init_channels import adapt_init
    from labelfew.engine.init_weights import read_init

    adapted = adapt_init(read_init(str(init), arch=None, prefix=None), 1)
    torch.testing.assert_close(adapted.tensors[key], rgb.tensors[key].sum(dim=1, keepdim=True))


def test_channels_or_window_against_the_backbones_own_are_refused(tmp_path: Path) -> None:
    train = write_deep_folder(tmp_path / "train", per_class=8)
    run = tmp_path / "run"
    _ok("pretrain", str(train), "--out", str(run), *PRETRAIN)
    for flag, value in (("--channels", "3"), ("--window", "0,100")):
        result = runner.invoke(app, ["finetune", "--labels", str(train), "--from", str(run), flag, value,
                                     "--workers", "0", "--quiet"])  # fmt: skip
        assert result.exit_code == 2 and f"{flag} {value}: the backbone" in " ".join(result.output.split())


@pytest.mark.parametrize("changed", [["--window", "0,1000"], ["--channels", "3"]])
def test_a_resume_with_another_decoding_is_refused(tmp_path: Path, changed: list[str]) -> None:
    train = write_deep_folder(tmp_path / "train", per_class=8)
    run = tmp_path / "run"
    _ok(
        "pretrain",
        str(train),
        "--out",
        str(run),
        *PRETRAIN[:3],
        "2",
        *PRETRAIN[4:],
        "--checkpoint-every",
        "0.0001",
    )
    (run / "pretrain" / "backbone.safetensors").unlink()  # as if killed after its checkpoints
    result = runner.invoke(
        app, ["pretrain", str(train), "--out", str(run), *PRETRAIN[:3], "2", *PRETRAIN[4:], *changed]
    )
    assert result.exit_code == 2 and "decoding" in result.output, result.output
