"""Views of 1 and N channels against plain references: torchvision's functional ops on the whole
C-channel tensor (crop, flip, blur, normalise) and on each channel alone as a 1-channel image
(brightness, contrast), and the RGB views of each channel copied to three (fine-tuning, FixMatch's
weak view, evaluation)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from labelfew.views.channels import channel_jitter
from labelfew.views.config import ViewConfig
from labelfew.views.evaluate import EvalView
from labelfew.views.finetune import CropFlipViews, ShiftFlipViews
from labelfew.views.params import ViewParameters, sample_view_parameters
from labelfew.views.simclr import BRIGHTNESS, CONTRAST, SimCLRViews, make_views


def _config(channels: int, image_size: int = 24) -> ViewConfig:
    return ViewConfig(
        image_size=image_size, blur=True, min_scale=0.05, color_jitter_prob=0.7, grayscale_prob=0.5,
        mean=tuple(0.3 + 0.1 * channel for channel in range(channels)), std=(0.25,) * channels,
    )  # fmt: skip


def reference_view(
    image: torch.Tensor, parameters: ViewParameters, index: int, config: ViewConfig
) -> torch.Tensor:
    """One view of a (C, H, W) uint8 image with torchvision: resized crop, flip, then brightness and
    contrast of each channel as a 1-channel image in the view's jitter order, blur, normalise."""
    top, left, height, width = parameters.crop[index].tolist()
    view = F.resized_crop(
        image.float() / 255, top, left, height, width, [config.image_size] * 2,
        interpolation=v2.InterpolationMode.BICUBIC, antialias=True,
    ).clamp(0, 1)  # fmt: skip
    if parameters.flip[index]:
        view = F.horizontal_flip(view)
    assert parameters.channel_brightness is not None and parameters.channel_contrast is not None
    if parameters.color_jitter[index]:
        for operation in parameters.jitter_order[index].tolist():
            factors, adjust = {
                BRIGHTNESS: (parameters.channel_brightness, F.adjust_brightness),
                CONTRAST: (parameters.channel_contrast, F.adjust_contrast),
            }.get(operation, (None, None))
            if factors is not None and adjust is not None:
                view = torch.cat(
                    [
                        adjust(view[channel : channel + 1], float(factors[index, channel]))
                        for channel in range(view.shape[0])
                    ]
                )
    if parameters.blur[index]:
        sigma = float(parameters.blur_sigma[index])
        view = F.gaussian_blur(view, [config.blur_kernel_size] * 2, [sigma, sigma])
    return F.normalize(view, list(config.mean), list(config.std))


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize(
    ("image_size", "height", "width"), [(24, 40, 56), (48, 128, 112)], ids=["up", "down"]
)
def test_simclr_views_of_c_channels_equal_torchvision_channel_by_channel(
    channels: int, image_size: int, height: int, width: int
) -> None:
    config = _config(channels, image_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, channels, height, width), dtype=torch.uint8, generator=generator)
    parameters = sample_view_parameters(24, (height, width), config, generator)
    assert bool(parameters.color_jitter.any() & parameters.blur.any() & parameters.grayscale.any())
    views = make_views(images, parameters, config, chunk=7)
    assert views.shape == (24, channels, image_size, image_size)
    expected = torch.stack([reference_view(images[i], parameters, i, config) for i in range(24)])
    torch.testing.assert_close(views, expected, atol=1e-4, rtol=0)


def test_one_channel_draws_the_rgb_colour_jitters_factors_and_order() -> None:
    """The same seed gives a gray view the crop, flip, brightness, contrast and order of the RGB view."""
    rgb = sample_view_parameters(32, (40, 40), _config(3), torch.Generator().manual_seed(5))
    gray = sample_view_parameters(32, (40, 40), _config(1), torch.Generator().manual_seed(5))
    for field in (
        "crop",
        "flip",
        "color_jitter",
        "jitter_order",
        "brightness",
        "contrast",
        "blur",
        "blur_sigma",
    ):
        assert torch.equal(getattr(rgb, field), getattr(gray, field)), field
    assert gray.channel_brightness is not None and gray.channel_contrast is not None
    assert torch.equal(gray.channel_brightness[:, 0], rgb.brightness)
    assert torch.equal(gray.channel_contrast[:, 0], rgb.contrast)
    assert rgb.channel_brightness is None


def test_n_channels_draw_one_factor_per_channel_per_view_in_the_jitter_range() -> None:
    config = dataclasses.replace(_config(5), color_strength=0.5)
    parameters = sample_view_parameters(400, (40, 40), config, torch.Generator().manual_seed(2))
    assert parameters.channel_brightness is not None and parameters.channel_contrast is not None
    for factors in (parameters.channel_brightness, parameters.channel_contrast):
        assert factors.shape == (400, 5)
        assert float(factors.min()) >= 0.6 and float(factors.max()) <= 1.4  # 1 ± 0.8 s
        assert float(factors.std(dim=1).mean()) > 0.1  # the channels differ within a view
    assert not torch.equal(parameters.channel_brightness, parameters.channel_contrast)


def test_a_gray_view_never_gets_hue_saturation_or_grayscale() -> None:
    """Strength 0 makes brightness and contrast 1, blur off: what is left of a 1-channel view is its crop."""
    config = dataclasses.replace(_config(1), color_strength=0.0, blur=False, grayscale_prob=1.0)
    images = torch.randint(
        0, 256, (8, 1, 30, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    parameters = sample_view_parameters(8, (30, 30), config, torch.Generator().manual_seed(3))
    crops = dataclasses.replace(
        parameters, color_jitter=torch.zeros(8, dtype=torch.bool), grayscale=torch.zeros(8, dtype=torch.bool)
    )
    torch.testing.assert_close(make_views(images, parameters, config), make_views(images, crops, config))


def test_channel_jitter_equals_a_hand_loop() -> None:
    generator = torch.Generator().manual_seed(4)
    views = torch.rand(6, 3, 8, 8, generator=generator)
    brightness = torch.rand(6, 3, generator=generator) * 1.6 + 0.2
    contrast = torch.rand(6, 3, generator=generator) * 1.6 + 0.2
    first = torch.tensor([True, False, True, False, True, False])
    expected = views.clone()
    for view in range(6):
        for channel in range(3):
            pixels = expected[view, channel]
            steps = ["b", "c"] if first[view] else ["c", "b"]
            for step in steps:
                if step == "b":
                    pixels = (pixels * brightness[view, channel]).clamp(0, 1)
                else:
                    factor = contrast[view, channel]
                    pixels = (factor * pixels + (1 - factor) * pixels.mean()).clamp(0, 1)
            expected[view, channel] = pixels
    channel_jitter(views, brightness, contrast, first)
    torch.testing.assert_close(views, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [1, 4])
def test_simclr_pairs_of_c_channels_have_the_images_shape(channels: int) -> None:
    images = torch.randint(0, 256, (3, channels, 20, 20), dtype=torch.uint8)
    first, second = SimCLRViews(_config(channels, 16), torch.Generator().manual_seed(0))(images)
    assert first.shape == second.shape == (3, channels, 16, 16)
    with pytest.raises(
        ValueError, match=f"images of 3 channels, but normalisation statistics for {channels}"
    ):
        SimCLRViews(_config(channels, 16))(torch.zeros(2, 3, 20, 20, dtype=torch.uint8))


def _per_channel_rgb(view_of: object, images: torch.Tensor, seed: int, **call: object) -> torch.Tensor:
    """The RGB view (ImageNet-free: mean 0, std 1) of every channel copied to three, channel 0 kept."""
    parts = []
    for channel in range(images.shape[1]):
        rgb = images[:, channel : channel + 1].expand(-1, 3, -1, -1).contiguous()
        arguments = {**call, "generator": torch.Generator().manual_seed(seed)}
        parts.append(view_of(rgb, **arguments)[:, :1])  # type: ignore[operator]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize(("height", "width"), [(40, 52), (150, 170)], ids=["dense", "banded"])
def test_finetune_weak_and_eval_views_of_c_channels_are_the_rgb_views_of_each_channel(
    channels: int, height: int, width: int
) -> None:
    images = torch.randint(0, 256, (4, channels, height, width), dtype=torch.uint8)
    sizes = torch.tensor([[height, width], [height - 3, width], [height, width - 5], [height - 7, width - 2]])
    plain, rgb_plain = (
        {"mean": (0.0,) * channels, "std": (1.0,) * channels},
        {"mean": (0.0,) * 3, "std": (1.0,) * 3},
    )
    for size in (32, 72):
        crop = CropFlipViews(size, **plain)(images, sizes, torch.Generator().manual_seed(1))
        reference = _per_channel_rgb(CropFlipViews(size, **rgb_plain), images, 1, sizes=sizes)
        torch.testing.assert_close(crop, reference, atol=1e-5, rtol=0)
        weak = ShiftFlipViews(size, **plain)(images, sizes, torch.Generator().manual_seed(2))
        reference = _per_channel_rgb(ShiftFlipViews(size, **rgb_plain), images, 2, sizes=sizes)
        torch.testing.assert_close(weak, reference, atol=1e-5, rtol=0)
        evaluation = EvalView(size, **plain)(images, sizes)
        reference = torch.cat(
            [EvalView(size, **rgb_plain)(images[:, c : c + 1].expand(-1, 3, -1, -1).contiguous(), sizes)[:, :1]
             for c in range(channels)], dim=1,
        )  # fmt: skip
        torch.testing.assert_close(evaluation, reference, atol=1e-5, rtol=0)
    normalised = EvalView(32, mean=(0.5,) * channels, std=(0.25,) * channels)(images, sizes)
    torch.testing.assert_close(
        normalised, (EvalView(32, **plain)(images, sizes) - 0.5) / 0.25, atol=1e-5, rtol=0
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels", [1, 4])
def test_c_channel_views_on_a_gpu_equal_the_cpus(channels: int) -> None:
    """The device path (dense resample, channel jitter, blur, RandAugment) against the CPU's."""
    from labelfew.views.randaugment import apply_randaugment, sample_randaugment

    config = _config(channels, 48)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, channels, 128, 112), dtype=torch.uint8, generator=generator)
    parameters = sample_view_parameters(16, (128, 112), config, generator)
    on_cpu = make_views(images, parameters, config)
    torch.testing.assert_close(make_views(images.cuda(), parameters, config).cpu(), on_cpu, atol=1e-4, rtol=0)
    strong = sample_randaugment(16, 48, 48, torch.Generator().manual_seed(1))
    views = torch.rand(16, channels, 48, 48, generator=generator)
    difference = (apply_randaugment(views.cuda(), strong).cpu() - apply_randaugment(views, strong)).abs()
    assert float((difference > 1e-5).float().mean()) < 0.01  # nearest sampling may flip at exact half pixels


@pytest.mark.parametrize("channels", [1, 4])
def test_fixmatchs_weak_and_strong_views_take_c_channels(channels: int) -> None:
    from labelfew.engine.fixmatch import WeakStrongViews

    images = torch.randint(0, 256, (6, channels, 40, 40), dtype=torch.uint8)
    sizes = torch.tensor([[40, 40]] * 6)
    weak, strong = WeakStrongViews(32, (0.5,) * channels, (0.25,) * channels)(
        images, sizes, torch.Generator().manual_seed(0)
    )
    assert weak.shape == strong.shape == (6, channels, 32, 32)
    assert (
        float(weak.min()) >= -2.0 - 1e-6 and float(weak.max()) <= 2.0 + 1e-6
    )  # (x - 0.5) / 0.25, x in [0, 1]
    assert not torch.equal(weak, strong)
