"""export: timm-loadable safetensors + config.json, and ONNX that matches PyTorch on real images."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import CopyPerClass
from reference.pil_views import eval_transform
from typer.testing import CliRunner

from labelfew.artifacts import load_artifact
from labelfew.cli import app
from labelfew.config import ExportConfig, FinetuneConfig, PretrainConfig
from labelfew.data.images import find_images, load_rgb
from labelfew.data.labels import read_labels, write_labels
from labelfew.data.subsets import balanced_subset
from labelfew.models import load_model
from labelfew.stages import finetune, pretrain
from labelfew.use.export import run

runner = CliRunner()


@pytest.fixture(scope="module")
def models(
    digits_folder: tuple[Path, Path], copy_per_class: CopyPerClass, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Artifacts of every kind export handles: pretrain backbone, fine-tuned with the small-image stem,
    fine-tuned from a projection-head layer, and a scratch model at 96 px with timm's own stem."""
    train, _ = digits_folder
    work = tmp_path_factory.mktemp("export")
    pool = copy_per_class(train, work / "pool", per_class=15)
    labels = work / "labels.csv"
    write_labels(balanced_subset(read_labels(pool), per_class=3, seed=0), labels)
    folder = work / "runs" / "digits"
    pretrain.run(
        PretrainConfig(
            data=pool, out=folder, arch="test_resnet", epochs=1, batch_size=75, workers=0, quiet=True
        )
    )
    common: dict[str, Any] = {"labels": labels, "epochs": 1, "batch_size": 30, "workers": 0, "quiet": True}
    small = finetune.run(FinetuneConfig(source=folder, **common))
    head = finetune.run(
        FinetuneConfig(source=folder, from_head_layer=1, out=folder / "finetune-head", **common)
    )
    (work / "nothing").mkdir()
    plain = finetune.run(
        FinetuneConfig(
            source=work / "nothing",
            scratch=True,
            arch="test_resnet",
            image_size=96,
            out=work / "plain",
            **common,
        )
    )
    return {"work": work, "pretrain": folder / "pretrain", "small": small, "head": head, "plain": plain}


@pytest.fixture(scope="module")
def images(digits_folder: tuple[Path, Path]) -> list[Path]:
    """Seven real test images, one or two of several classes."""
    return find_images(digits_folder[1])[::64][:7]


@pytest.fixture
def onnx_runtime() -> Any:
    """onnxruntime, or a skip where the `export` extra is not installed (a failure under CI)."""
    missing = [
        name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None
    ]
    if missing:
        reason = f"{', '.join(missing)} not installed (pip install -e '.[dev]' or '.[export]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must not skip the ONNX parity tests: {reason}")
        pytest.skip(reason)
    import onnxruntime

    return onnxruntime


def batch_of(paths: list[Path], artifact_path: Path) -> torch.Tensor:
    artifact = load_artifact(artifact_path)
    transform = eval_transform(
        int(artifact.metadata["image_size"]), artifact.json_field("mean"), artifact.json_field("std")
    )
    return torch.stack([transform(load_rgb(path)) for path in paths])


def reference(artifact_path: Path, batch: torch.Tensor) -> torch.Tensor:
    artifact = load_artifact(artifact_path)
    model = load_model(artifact)
    with torch.no_grad():
        return model.eval()(batch)


def rebuilt(out: Path) -> torch.nn.Module:
    """Runs the rebuild code that config.json gives to users."""
    namespace: dict[str, Any] = {}
    exec("\n".join(json.loads((out / "config.json").read_text())["labelfew"]["rebuild"]), namespace)
    return namespace["model"]


def test_timm_loads_a_fine_tuned_model_from_the_folder(models: dict[str, Path], images: list[Path]) -> None:
    out = run(
        ExportConfig(
            source=models["plain"], out=models["work"] / "exported-plain", format="safetensors", quiet=True
        )
    )
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    batch = batch_of(images, models["plain"])
    with torch.no_grad():
        assert torch.allclose(model(batch), reference(models["plain"], batch), atol=1e-5)
    assert model.pretrained_cfg["label_names"] == [str(digit) for digit in range(10)]
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["input_size"]) == (3, 96, 96)
    assert tuple(data["mean"]) == pytest.approx((0.485, 0.456, 0.406))
    timm_transform = timm.data.create_transform(**data)  # reproduces labelfew's eval transform
    assert torch.allclose(torch.stack([timm_transform(load_rgb(path)) for path in images]), batch, atol=1e-5)
    settings = json.loads((out / "config.json").read_text())
    assert settings["architecture"] == "test_resnet" and settings["labelfew"]["small_stem"] is False
    assert not (out / "model.onnx").exists()


def test_rebuild_code_recreates_the_small_stem_model(models: dict[str, Path], images: list[Path]) -> None:
    out = run(
        ExportConfig(
            source=models["small"], out=models["work"] / "exported-small", format="safetensors", quiet=True
        )
    )
    settings = json.loads((out / "config.json").read_text())["labelfew"]
    assert settings["small_stem"] is True and settings["input_size"] == [3, 32, 32]
    assert settings["class_names"] == [str(digit) for digit in range(10)]
    assert any("maxpool" in line for line in settings["rebuild"])
    batch = batch_of(images, models["small"])
    with torch.no_grad():
        assert torch.allclose(rebuilt(out)(batch), reference(models["small"], batch), atol=1e-5)


def test_pretrain_backbone_exports_features(models: dict[str, Path], images: list[Path]) -> None:
    out = run(
        ExportConfig(
            source=models["pretrain"],
            out=models["work"] / "exported-pretrain",
            format="safetensors",
            quiet=True,
        )
    )
    settings = json.loads((out / "config.json").read_text())
    assert settings["num_classes"] == 0 and settings["labelfew"]["outputs"] == "features"
    artifact = models["pretrain"] / "backbone.safetensors"
    batch = batch_of(images, artifact)
    with torch.no_grad():
        assert torch.allclose(rebuilt(out)(batch), reference(artifact, batch), atol=1e-5)


def test_onnx_matches_pytorch_on_real_images(
    models: dict[str, Path], images: list[Path], onnx_runtime: Any
) -> None:
    import onnx

    out = run(
        ExportConfig(source=models["small"], out=models["work"] / "exported-onnx", format="onnx", quiet=True)
    )
    assert (out / "model.onnx").is_file() and not (out / "model.safetensors").exists()
    assert (
        max(
            entry.version
            for entry in onnx.load(str(out / "model.onnx")).opset_import
            if entry.domain in ("", "ai.onnx")
        )
        >= 17
    )
    session = onnx_runtime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = batch_of(images, models["small"])
    expected = reference(models["small"], batch)
    for part in (batch, batch[:1]):  # the batch dimension is dynamic
        (logits,) = session.run(["logits"], {"images": part.numpy()})
        assert abs(logits - expected[: len(part)].numpy()).max() < 1e-4
    recorded = json.loads((out / "config.json").read_text())["labelfew"]["onnx"]
    assert recorded["opset"] >= 17 and recorded["max_abs_difference_vs_pytorch"] < 1e-4


def test_head_layer_model_exports_both_formats(
    models: dict[str, Path], images: list[Path], onnx_runtime: Any
) -> None:
    result = runner.invoke(
        app, ["export", "--from", str(models["head"]), "--out", str(models["work"] / "exported-head")]
    )
    assert result.exit_code == 0, result.output
    out = models["work"] / "exported-head"
    for name in ("model.safetensors", "head.safetensors", "model.onnx", "config.json"):
        assert name in result.output and (out / name).is_file(), name
    batch = batch_of(images, models["head"])
    expected = reference(models["head"], batch)
    with torch.no_grad():
        assert torch.allclose(rebuilt(out)(batch), expected, atol=1e-5)
    session = onnx_runtime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert abs(session.run(None, {"images": batch.numpy()})[0] - expected.numpy()).max() < 1e-4


def test_export_defaults_to_the_fine_tuned_model_of_a_run(models: dict[str, Path]) -> None:
    result = runner.invoke(
        app, ["export", "--from", str(models["pretrain"].parent), "--format", "safetensors"]
    )
    assert result.exit_code == 0, result.output
    (written,) = models["pretrain"].parent.glob("*/export/config.json")
    assert written.parent.parent.name.startswith("finetune")
    assert json.loads(written.read_text())["labelfew"]["stage"] == "finetune"


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_input_gives_one_line_and_exit_code_2(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert "no finetune, distill or pretrain artifact" in one_line_error(["export"])
    assert "no such file or folder" in one_line_error(["export", "--from", str(tmp_path / "nope")])
    assert "--format tflite" in one_line_error(
        ["export", "--from", str(models["small"]), "--format", "tflite"]
    )
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert "not a readable safetensors" in one_line_error(
        ["export", "--from", "junk.safetensors", "--format", "safetensors"]
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the export extra were not installed
    assert "labelfew[export]" in one_line_error(
        ["export", "--from", str(models["small"]), "--format", "onnx"]
    )
