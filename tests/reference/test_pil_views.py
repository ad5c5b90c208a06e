"""Tests of the per-image PIL reference (tests/reference/pil_views.py) and of ViewConfig: shapes, the
paper's settings, and application frequencies."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from labelfew.errors import UserError
from labelfew.views.config import IMAGENET_MEAN, IMAGENET_STD, ViewConfig, resolve_mean_std
from reference.pil_views import (
    TwoViews,
    ViewStep,
    compose_view_steps,
    eval_transform,
    finetune_transform,
    simclr_view,
    simclr_view_steps,
)

TRIALS = 2000
"""Draws per frequency check: 4 binomial standard deviations are at most 0.045 at p=0.5."""
TOLERANCE_IN_STD = 4.0


@pytest.fixture(autouse=True)
def _isolated_torch_rng() -> Iterator[None]:
    """Seeds torch (torchvision draws from it) and restores the global state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB").convert(mode)


def step_names(config: ViewConfig) -> list[str]:
    return [step.name for step in simclr_view_steps(config)]


def step_named(config: ViewConfig, name: str) -> Any:
    return next(step.transform for step in simclr_view_steps(config) if step.name == name)


# --- Frequency checking -------------------------------------------------------------------------


def frequency_within_tolerance(count: int, trials: int, probability: float) -> bool:
    """Whether ``count`` successes in ``trials`` fit ``probability`` within 4 binomial std."""
    standard_deviation = math.sqrt(probability * (1 - probability) / trials)
    return abs(count / trials - probability) <= TOLERANCE_IN_STD * standard_deviation


class Recorder:
    """Wraps a transform and counts how often it is applied."""

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform
        self.calls = 0

    def __call__(self, image: Any) -> Any:
        self.calls += 1
        return self.transform(image)


@functools.cache
def observed_application_counts(config: ViewConfig, seed: int = 0) -> dict[str, int]:
    """Draws `TRIALS` seeded views through the real composition, counting each step's uses."""
    recorders: dict[str, Recorder] = {}
    steps = []
    for step in simclr_view_steps(config):
        recorders[step.name] = Recorder(step.transform)
        steps.append(ViewStep(step.name, step.probability, recorders[step.name]))
    view = compose_view_steps(steps)
    image = random_image(20, 20)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(TRIALS):
            view(image)
    return {name: recorder.calls for name, recorder in recorders.items()}


def test_frequency_check_accepts_expected_and_rejects_wrong_counts() -> None:
    assert frequency_within_tolerance(1600, TRIALS, 0.8)
    assert frequency_within_tolerance(1630, TRIALS, 0.8)  # 3.4 standard deviations
    assert not frequency_within_tolerance(1000, TRIALS, 0.8)  # p = 0.5 observed
    assert not frequency_within_tolerance(1500, TRIALS, 0.8)  # p = 0.75 observed
    assert frequency_within_tolerance(0, TRIALS, 0.0)
    assert not frequency_within_tolerance(1, TRIALS, 0.0)
    assert frequency_within_tolerance(TRIALS, TRIALS, 1.0)


PAPER_CONFIG = ViewConfig(image_size=16, blur=True)
DISTINCT_PROBABILITIES: dict[str, Any] = {
    "flip_prob": 0.35,
    "color_jitter_prob": 0.65,
    "grayscale_prob": 0.15,
    "blur_prob": 0.45,
}


@pytest.mark.parametrize(
    "config",
    [
        PAPER_CONFIG,  # the paper's probabilities
        ViewConfig(image_size=16, blur=True, **DISTINCT_PROBABILITIES),  # catches swapped fields
    ],
    ids=["paper", "distinct"],
)
def test_each_step_is_applied_with_its_configured_probability(config: ViewConfig) -> None:
    expected = {
        "convert_to_rgb": 1.0,
        "random_resized_crop": 1.0,
        "horizontal_flip": config.flip_prob,
        "color_jitter": config.color_jitter_prob,
        "grayscale": config.grayscale_prob,
        "gaussian_blur": config.blur_prob,
        "to_float_tensor": 1.0,
        "normalize": 1.0,
    }
    counts = observed_application_counts(config)
    assert counts.keys() == expected.keys()
    for name, probability in expected.items():
        assert frequency_within_tolerance(counts[name], TRIALS, probability), (
            f"{name}: applied {counts[name]}/{TRIALS}, configured {probability}"
        )


def test_wrong_probability_is_detected() -> None:
    """The same observations fail the check against probabilities the pipeline does not use."""
    counts = observed_application_counts(PAPER_CONFIG)  # flip 0.5, jitter 0.8, grayscale 0.2
    assert frequency_within_tolerance(counts["horizontal_flip"], TRIALS, 0.5)
    assert not frequency_within_tolerance(counts["horizontal_flip"], TRIALS, 0.8)
    assert not frequency_within_tolerance(counts["color_jitter"], TRIALS, 0.5)
    assert not frequency_within_tolerance(counts["grayscale"], TRIALS, 0.3)
    assert not frequency_within_tolerance(counts["gaussian_blur"], TRIALS, 0.6)


def test_flip_and_grayscale_frequencies_seen_in_the_output_pixels() -> None:
    """Black-box check on simclr_view itself: flips and grayscale read off the pixels."""
    config = ViewConfig(
        image_size=16,
        min_scale=1.0,  # whole image: the left/right halves stay readable
        color_strength=0.0,  # identity jitter: only grayscale makes channels equal
        flip_prob=0.3,
        grayscale_prob=0.6,
        blur=False,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8, 0] = 255  # red left half, black right half
    image = Image.fromarray(pixels)
    view = simclr_view(config)
    flips = grays = 0
    for _ in range(TRIALS):
        output = view(image)
        flips += int(output[:, :, 8:].sum() > output[:, :, :8].sum())
        grays += int((output[0] - output[1]).abs().max() < 0.05)
    assert frequency_within_tolerance(flips, TRIALS, 0.3), flips
    assert frequency_within_tolerance(grays, TRIALS, 0.6), grays


# --- The paper's settings -----------------------------------------------------------------------


def test_simclr_view_composes_its_steps() -> None:
    config = ViewConfig(image_size=32, blur=True)
    image = random_image(50, 40)
    torch.manual_seed(1)
    expected = compose_view_steps(simclr_view_steps(config))(image)
    torch.manual_seed(1)
    assert torch.equal(simclr_view(config)(image), expected)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_color_jitter_matches_paper(strength: float) -> None:
    jitter = step_named(ViewConfig(image_size=32, color_strength=strength), "color_jitter")
    assert isinstance(jitter, v2.ColorJitter)
    for factor_range in (jitter.brightness, jitter.contrast, jitter.saturation):
        assert factor_range == pytest.approx((max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength))
    assert jitter.hue == pytest.approx((-0.2 * strength, 0.2 * strength))


def test_crop_matches_paper() -> None:
    crop = step_named(ViewConfig(image_size=96, min_scale=0.2), "random_resized_crop")
    assert isinstance(crop, v2.RandomResizedCrop)
    assert crop.size == (96, 96)
    assert crop.scale == (0.2, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == v2.InterpolationMode.BICUBIC


def test_blur_off_at_32_pixels_by_default_and_on_above() -> None:
    assert not ViewConfig(image_size=32).blur_enabled
    assert "gaussian_blur" not in step_names(ViewConfig(image_size=32))
    for size in (96, 224):
        assert "gaussian_blur" in step_names(ViewConfig(image_size=size))
    assert "gaussian_blur" in step_names(ViewConfig(image_size=32, blur=True))
    assert "gaussian_blur" not in step_names(ViewConfig(image_size=224, blur=False))


@pytest.mark.parametrize("size", [32, 96, 224])
def test_blur_step_uses_kernel_and_sigma_from_config(size: int) -> None:
    config = ViewConfig(image_size=size, blur=True, blur_sigma=(0.2, 1.5))
    blur = step_named(config, "gaussian_blur")
    assert isinstance(blur, v2.GaussianBlur)
    assert blur.kernel_size == (config.blur_kernel_size, config.blur_kernel_size)
    assert blur.sigma == pytest.approx([0.2, 1.5])


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_side() -> None:
    assert [ViewConfig(image_size=size).blur_kernel_size for size in (32, 96, 224)] == [3, 9, 23]
    for size in range(8, 513):
        kernel = ViewConfig(image_size=size).blur_kernel_size
        assert kernel % 2 == 1 and kernel >= 3
        if size >= 30:
            assert abs(kernel - 0.1 * size) <= 1.0, size


# --- Shapes, inputs, determinism ----------------------------------------------------------------


@pytest.mark.parametrize("image_size", [32, 96])
@pytest.mark.parametrize("width, height", [(1, 1), (5, 3), (20, 31), (32, 32), (300, 200)])
def test_view_shape_dtype_and_finiteness(image_size: int, width: int, height: int) -> None:
    output = simclr_view(ViewConfig(image_size=image_size))(random_image(width, height))
    assert type(output) is torch.Tensor
    assert output.shape == (3, image_size, image_size)
    assert output.dtype == torch.float32
    assert torch.isfinite(output).all()


def test_view_at_224_from_a_non_square_image() -> None:
    output = simclr_view(ViewConfig(image_size=224))(random_image(250, 180))
    assert output.shape == (3, 224, 224) and torch.isfinite(output).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_modes_give_three_channels(mode: str) -> None:
    image = random_image(40, 30, mode=mode)
    assert simclr_view(ViewConfig(image_size=32))(image).shape == (3, 32, 32)
    assert eval_transform(32)(image).shape == (3, 32, 32)


def test_two_views_differ_and_survive_pickling() -> None:
    two_views = TwoViews.from_config(ViewConfig(image_size=32))
    first, second = pickle.loads(pickle.dumps(two_views))(random_image(48, 48))
    assert first.shape == second.shape == (3, 32, 32)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("image_size, width, height", [(224, 500, 375), (32, 40, 30), (96, 50, 90)])
def test_eval_transform_is_deterministic(image_size: int, width: int, height: int) -> None:
    transform = eval_transform(image_size)
    image = random_image(width, height)
    torch.manual_seed(1)
    first = transform(image)
    torch.manual_seed(2)
    second = transform(image)
    assert first.shape == (3, image_size, image_size) and first.dtype == torch.float32
    assert torch.equal(first, second)


def test_eval_transform_keeps_a_small_square_image_whole() -> None:
    image = random_image(32, 32)
    unit = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (unit - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(eval_transform(32)(image), expected)


def test_eval_transform_center_crops_87_5_percent_above_64_pixels() -> None:
    pixels = np.zeros((256, 256, 3), dtype=np.uint8)
    pixels[16:240, 16:240] = 255  # white square exactly where a 224 crop of 256 falls
    output = eval_transform(224, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(pixels))
    assert output.min() > 0.99


@pytest.mark.parametrize("image_size", [32, 128])
def test_finetune_transform_shape_and_randomness(image_size: int) -> None:
    transform = finetune_transform(image_size)
    image = random_image(150, 100)
    first, second = transform(image), transform(image)
    assert first.shape == (3, image_size, image_size) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert not torch.equal(first, second)


# --- Configuration ------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    config = ViewConfig(image_size=32, color_strength=0.5, blur_sigma=(0.2, 1.0))
    restored = ViewConfig(**json.loads(json.dumps(dataclasses.asdict(config))))
    assert restored == config
    assert hash(restored) == hash(config)
    assert restored.mean == IMAGENET_MEAN and isinstance(restored.blur_sigma, tuple)


@pytest.mark.parametrize(
    "changes",
    [
        {"image_size": 4},
        {"image_size": 32.0},
        {"min_scale": 0.0},
        {"min_scale": 1.5},
        {"color_strength": -0.1},
        {"color_strength": 3.0},
        {"flip_prob": 1.2},
        {"grayscale_prob": -0.1},
        {"blur_sigma": (2.0, 0.1)},
        {"blur_sigma": (0.0, 1.0)},
        {"mean": (0.5, 0.5)},
        {"std": (0.2, 0.0, 0.2)},
    ],
)
def test_invalid_config_raises_user_error(changes: dict[str, Any]) -> None:
    with pytest.raises(UserError):
        ViewConfig(**{"image_size": 32, **changes})


def test_resolve_mean_std() -> None:
    assert resolve_mean_std(None, None) == (IMAGENET_MEAN, IMAGENET_STD)
    assert resolve_mean_std([0.5, 0.5, 0.5], [1, 1, 1]) == ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
    with pytest.raises(UserError):
        resolve_mean_std([0.5, 0.5], None)
    with pytest.raises(UserError):
        resolve_mean_std(None, (0.2, -1.0, 0.2))
