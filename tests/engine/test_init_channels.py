"""`--init` into a model of another channel count: timm's first-conv rule and the mean/std that follow."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from labelfew.artifacts import save_tensors
from labelfew.engine.init_channels import adapt_init, channel_statistics, first_conv_key
from labelfew.engine.init_weights import Init, read_init
from labelfew.engine.start import frozen_backbone, init_start
from labelfew.errors import UserError
from labelfew.models import build_backbone, build_model
from labelfew.spec import ModelSpec

ARCH = "test_resnet"
FIRST_CONV = "conv1.0.weight"  # test_resnet's deep stem: timm's pretrained_cfg names conv1.0


def _rgb_init(mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0) -> Init:
    torch.manual_seed(seed)
    backbone = build_backbone(ARCH, small_stem=False)
    tensors = {key: value.clone() for key, value in backbone.state_dict().items()}
    for key, value in tensors.items():  # BatchNorm statistics away from (0, 1), so eval mode uses them
        if key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
    return Init(source="rgb.safetensors", sha256="0" * 64, arch=ARCH, tensors=tensors, mean=mean, std=std)


def _features(init: Init, channels: int, images: torch.Tensor) -> torch.Tensor:
    start = init_start(
        init, arch=None, prefix=None, image_size=32, small_stem=None, paths=[], channels=channels
    )
    backbone = build_backbone(ARCH, small_stem=start.small_stem, image_size=32, channels=channels)
    assert start.load_into(backbone) == []
    mean = torch.tensor(start.mean).view(1, -1, 1, 1)
    std = torch.tensor(start.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return backbone.eval()((images - mean) / std)


def test_a_one_channel_model_from_an_rgb_init_gives_the_rgb_features_on_a_gray_image() -> None:
    init = _rgb_init(mean=(0.45, 0.45, 0.45), std=(0.23, 0.23, 0.23))
    gray = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    rgb_features = _features(init, 3, gray.expand(4, 3, 32, 32))
    gray_features = _features(init, 1, gray)
    assert rgb_features.abs().max() > 0.1  # features that carry the image, not zeros
    torch.testing.assert_close(gray_features, rgb_features, atol=1e-5, rtol=1e-5)


def test_into_one_channel_the_first_conv_is_summed_over_colour_and_the_statistics_averaged() -> None:
    init = _rgb_init(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    gray = adapt_init(init, 1)
    weight = init.tensors[FIRST_CONV]
    torch.testing.assert_close(gray.tensors[FIRST_CONV], weight.sum(dim=1, keepdim=True))
    assert gray.channels == 1
    assert gray.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    assert gray.std == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))
    for key in init.tensors:  # only the first conv changes
        if key != FIRST_CONV:
            assert gray.tensors[key] is init.tensors[key]


def test_into_four_channels_the_rgb_filters_repeat_scaled_by_three_quarters() -> None:
    init = _rgb_init(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    four = adapt_init(init, 4)
    weight = init.tensors[FIRST_CONV]
    expected = torch.stack([weight[:, channel % 3] * 3 / 4 for channel in range(4)], dim=1)
    torch.testing.assert_close(four.tensors[FIRST_CONV], expected)
    assert four.mean == (0.1, 0.2, 0.3, 0.1)
    assert four.std == (0.4, 0.5, 0.6, 0.4)
    features = _features(init, 4, torch.rand(2, 4, 32, 32))
    assert features.shape == (2, int(build_backbone(ARCH, small_stem=False).num_features))


def test_statistics_and_the_first_conv_key() -> None:
    assert channel_statistics((0.5, 0.5, 0.5), 3) == (0.5, 0.5, 0.5)
    assert channel_statistics((0.3,), 3) == (0.3, 0.3, 0.3)
    assert first_conv_key("resnet18", {"conv1.weight": torch.zeros(1, 3, 7, 7)}) == "conv1.weight"
    assert first_conv_key(ARCH, _rgb_init((0.5,) * 3, (0.5,) * 3).tensors) == FIRST_CONV
    with pytest.raises(UserError, match="no first convolution"):
        first_conv_key("no_such_model_here", {"fc.weight": torch.zeros(2, 3)})


def test_an_init_without_statistics_gets_imagenets_for_its_channels() -> None:
    init = dataclasses.replace(_rgb_init((0.5,) * 3, (0.5,) * 3), mean=None, std=None)
    start = init_start(init, arch=None, prefix=None, image_size=32, small_stem=None, paths=[], channels=1)
    assert start.channels == 1
    assert start.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))


def test_a_frozen_backbone_of_a_one_channel_init_takes_one_channel() -> None:
    init = adapt_init(_rgb_init((0.5,) * 3, (0.25,) * 3), 1)
    frozen = frozen_backbone(init, paths=[], image_size=32)
    assert frozen.spec.channels == 1
    assert frozen.spec.mean == (0.5,)
    with torch.no_grad():
        assert frozen.model.eval()(torch.rand(2, 1, 32, 32)).isfinite().all()


def test_a_one_channel_labelfew_run_is_read_as_one_channel_and_adapts_to_rgb(tmp_path: Path) -> None:
    import labelfew.stages  # noqa: F401  (registers pretrain)

    spec = ModelSpec("test_resnet", 32, True, 96, (0.4,), (0.2,), channels=1)
    torch.manual_seed(3)
    backbone = build_model(spec)
    path = tmp_path / "backbone.safetensors"
    save_tensors(path, backbone.state_dict(), {"stage": "pretrain", **spec.to_metadata()})
    init = read_init(str(path))
    assert init.channels == 1 and init.mean == (0.4,)
    start = init_start(init, arch=None, prefix=None, image_size=None, small_stem=None, paths=[], channels=3)
    assert start.channels == 3 and start.mean == (0.4, 0.4, 0.4)
    weight = backbone.state_dict()[FIRST_CONV]
    torch.testing.assert_close(start.init.tensors[FIRST_CONV], weight.repeat(1, 3, 1, 1) / 3)  # type: ignore[union-attr]
