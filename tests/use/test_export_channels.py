"""`labelfew export` of 1- and 4-channel models: the ONNX input is (batch, C, S, S) and matches
PyTorch, and timm rebuilds the model from the folder with ``in_chans = C``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from labelfew.artifacts import load_artifact, save_tensors
from labelfew.config import ExportConfig
from labelfew.models import build_model, load_model
from labelfew.spec import ModelSpec
from labelfew.use.export import run


def _artifact(folder: Path, channels: int, small_stem: bool) -> Path:
    import labelfew.stages  # noqa: F401  (registers finetune)

    spec = ModelSpec(
        "test_resnet", 32, small_stem, 96, (0.5,) * channels, (0.25,) * channels,
        class_names=("a", "b", "c"), channels=channels,
    )  # fmt: skip
    torch.manual_seed(channels)
    model = build_model(spec)
    for parameter in model.parameters():  # a trained-looking classifier, not the zero-initialised one
        parameter.data.normal_(0, 0.1)
    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    save_tensors(path, model.state_dict(), {"stage": "finetune", **spec.to_metadata()})
    return path


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the export extra")
@pytest.mark.parametrize(("channels", "small_stem"), [(1, True), (4, False)])
def test_an_exported_model_takes_its_channels_in_onnx_and_timm(
    tmp_path: Path, channels: int, small_stem: bool
) -> None:
    import onnx
    import onnxruntime

    artifact = _artifact(tmp_path / "finetune", channels, small_stem)
    out = run(ExportConfig(source=artifact, out=tmp_path / "export", format="both", quiet=True))
    graph = onnx.load(str(out / "model.onnx")).graph
    dimensions = graph.input[0].type.tensor_type.shape.dim
    assert [dimension.dim_value for dimension in dimensions[1:]] == [channels, 32, 32]
    assert dimensions[0].dim_param  # the batch stays dynamic
    images = torch.rand(5, channels, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(load_artifact(artifact)).eval()(images)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    assert abs(logits - expected.numpy()).max() < 1e-4
    settings = json.loads((out / "config.json").read_text())
    assert settings["pretrained_cfg"]["input_size"] == [channels, 32, 32]
    assert settings["labelfew"]["onnx"]["input"]["shape"] == ["batch", channels, 32, 32]
    assert settings["labelfew"]["mean"] == [0.5] * channels
    namespace: dict[str, Any] = {}
    exec("\n".join(settings["labelfew"]["rebuild"]), namespace)  # the lines config.json gives users
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](images), expected, atol=1e-5, rtol=1e-5)
    if not small_stem:
        plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(images), expected, atol=1e-5, rtol=1e-5)
