"""Models of 1, 3 or N input channels: timm's ``in_chans``, the small stem, and artifacts that load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from labelfew.artifacts import load_artifact, save_tensors
from labelfew.errors import UserError
from labelfew.models import build_backbone, build_model, features_model, load_model
from labelfew.spec import ModelSpec


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("small_stem", [True, False])
def test_the_backbone_takes_the_specs_channels(channels: int, small_stem: bool) -> None:
    spec = ModelSpec(
        "test_resnet", 32, small_stem, 96, (0.5,) * channels, (0.25,) * channels, channels=channels
    )
    model = build_model(spec)
    first = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    assert first.in_channels == channels
    with torch.no_grad():
        features = model.eval()(torch.rand(2, channels, 32, 32))
    assert features.shape == (2, 96) and features.isfinite().all()
    with pytest.raises(RuntimeError):
        model(torch.rand(2, channels + 1, 32, 32))


def test_an_artifact_of_one_channel_loads_with_its_weights(tmp_path: Path) -> None:
    import labelfew.stages  # noqa: F401  (registers finetune)

    spec = ModelSpec("test_resnet", 32, True, 96, (0.5,), (0.25,), class_names=("a", "b"), channels=1)
    torch.manual_seed(0)
    original = build_model(spec)
    path = tmp_path / "model.safetensors"
    save_tensors(path, original.state_dict(), {"stage": "finetune", **spec.to_metadata()})
    loaded = load_model(load_artifact(path))
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), original.eval()(images))
    assert features_model(loaded).conv1[0].in_channels == 1


def test_a_model_needs_a_channel() -> None:
    with pytest.raises(UserError, match="at least one input channel"):
        build_backbone("test_resnet", small_stem=False, channels=0)
