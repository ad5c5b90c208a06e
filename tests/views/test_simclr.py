"""Tests for labelfew.views.simclr against the per-image PIL reference (tests/reference/pil_views.py).

Three kinds of checks:
- parameter distributions: the batched draws against the draws of the CPU path's own
  torchvision transforms (two-sample KS tests, chi-square for the jitter order, binomial
  tolerances for application rates), each paired with a deliberately shifted parameter that the
  same check must reject;
- the maths: with the same parameters, the views equal torchvision's functional ops on float
  tensors (crop + bicubic resize, flip, jitter in the drawn order, grayscale, blur, normalise);
- outputs: shapes, dtypes, determinism, pairing of the two views, and pixel statistics of views
  of real photos close to the CPU path's.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from reference.pil_views import simclr_view, simclr_view_steps
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional import pil_to_tensor

from labelfew.data.images import find_images, load_rgb
from labelfew.views.config import CROP_RATIO, ViewConfig
from labelfew.views.ops import one_thread_on_cpu
from labelfew.views.params import ViewParameters, sample_view_parameters
from labelfew.views.simclr import SimCLRViews, make_views

DRAWS = 4000
"""Draws per distribution comparison."""
SAME_P_VALUE = 1e-3
"""Distributions are accepted as equal when a test's p-value is above this."""
SHIFTED_P_VALUE = 1e-6
"""A shifted parameter must be rejected with a p-value below this."""
TOLERANCE_IN_STD = 4.0


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread for the reference computations too (the CPU path's blur, the
    statistics): on a shared 2-core machine a descheduled second OpenMP thread stalls every
    short operation (see `augment_batched.one_thread_on_cpu`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_step(config: ViewConfig, name: str) -> v2.Transform:
    """The torchvision transform the CPU path uses for step `name`."""
    transform = next(step.transform for step in simclr_view_steps(config) if step.name == name)
    assert isinstance(transform, v2.Transform)
    return transform


def torch_draws(transform: v2.Transform, count: int, image: torch.Tensor, seed: int = 0) -> list[dict]:
    """`count` parameter draws of a torchvision transform, with torch's RNG seeded and restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [transform.make_params([image]) for _ in range(count)]


def batched(
    config: ViewConfig, image_size: tuple[int, int], count: int = DRAWS, seed: int = 0
) -> ViewParameters:
    return sample_view_parameters(count, image_size, config, torch.Generator().manual_seed(seed))


def crop_features(crops: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    """Area fraction, aspect ratio and relative position of (top, left, height, width) rows."""
    top, left, crop_height, crop_width = crops.T.astype(float)
    return {
        "area": crop_height * crop_width / (height * width),
        "aspect": crop_width / crop_height,
        "top": (top + crop_height / 2) / height,
        "left": (left + crop_width / 2) / width,
    }


def cpu_crops(transform: v2.Transform, height: int, width: int) -> np.ndarray:
    draws = torch_draws(transform, DRAWS, torch.empty(3, height, width))
    return np.array([[d["top"], d["left"], d["height"], d["width"]] for d in draws])


def frequency_within_tolerance(count: int, trials: int, probability: float) -> bool:
    standard_deviation = math.sqrt(probability * (1 - probability) / trials)
    return abs(count / trials - probability) <= TOLERANCE_IN_STD * standard_deviation


# --- Parameter distributions against the CPU path ---------------------------------------------


@pytest.mark.parametrize(
    "height, width",
    [(32, 32), (375, 500), (120, 500), (500, 90)],
    ids=["square", "photo", "wide-fallback", "tall-fallback"],
)
def test_crop_distribution_matches_random_resized_crop(height: int, width: int) -> None:
    config = ViewConfig(image_size=32)
    expected = crop_features(cpu_crops(cpu_step(config, "random_resized_crop"), height, width), height, width)
    observed = crop_features(batched(config, (height, width)).crop.numpy(), height, width)
    for name in expected:
        p_value = stats.ks_2samp(expected[name], observed[name]).pvalue
        assert p_value > SAME_P_VALUE, f"{name}: KS p={p_value:.2g}"
    # Elongated images often exhaust the ten attempts; the fallback box must be as frequent.
    expected_full_height = np.mean(expected["area"] >= 0.999 * expected["area"].max())
    observed_full_height = np.mean(observed["area"] >= 0.999 * observed["area"].max())
    assert abs(expected_full_height - observed_full_height) < 0.03


def test_crops_lie_inside_the_image_and_within_the_ratio_range() -> None:
    height, width = 375, 500
    crops = batched(ViewConfig(image_size=32, min_scale=0.2), (height, width)).crop
    top, left, crop_height, crop_width = crops.unbind(dim=1)
    assert (top >= 0).all() and (left >= 0).all() and (crop_height > 0).all() and (crop_width > 0).all()
    assert (top + crop_height <= height).all() and (left + crop_width <= width).all()
    aspect = crop_width / crop_height
    rounding = 2 / crop_height.clamp(max=crop_width)  # one pixel of rounding on either side
    assert (aspect >= CROP_RATIO[0] - rounding).all() and (aspect <= CROP_RATIO[1] + rounding).all()
    area = crop_height * crop_width / (height * width)
    assert area.min() >= 0.2 * 0.95 and area.max() <= 1.0


@pytest.mark.parametrize(
    "shifted, feature",
    [
        (v2.RandomResizedCrop(32, scale=(0.16, 1.0), ratio=CROP_RATIO), "area"),
        (v2.RandomResizedCrop(32, scale=(0.08, 1.0), ratio=(0.6, 1 / 0.6)), "aspect"),
    ],
    ids=["min-scale-0.16", "ratio-0.6"],
)
def test_shifted_crop_parameters_are_detected(shifted: v2.Transform, feature: str) -> None:
    height, width = 375, 500
    expected = crop_features(cpu_crops(shifted, height, width), height, width)
    observed = crop_features(batched(ViewConfig(image_size=32), (height, width)).crop.numpy(), height, width)
    assert stats.ks_2samp(expected[feature], observed[feature]).pvalue < SHIFTED_P_VALUE


@functools.cache
def cpu_jitter_draws(strength: float) -> dict[str, np.ndarray]:
    jitter = cpu_step(ViewConfig(image_size=32, color_strength=strength), "color_jitter")
    draws = torch_draws(jitter, DRAWS, torch.empty(3, 8, 8))
    return {
        "brightness": np.array([d["brightness_factor"] for d in draws]),
        "contrast": np.array([d["contrast_factor"] for d in draws]),
        "saturation": np.array([d["saturation_factor"] for d in draws]),
        "hue": np.array([d["hue_factor"] for d in draws]),
        "order": np.array([d["fn_idx"].tolist() for d in draws]),
    }


def order_counts(orders: np.ndarray) -> np.ndarray:
    """How often each of the 24 permutations of the four adjustments occurs."""
    codes = orders @ np.array([64, 16, 4, 1])
    permutations = [np.array(order) @ np.array([64, 16, 4, 1]) for order in itertools.permutations(range(4))]
    return np.array([(codes == code).sum() for code in permutations])


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_jitter_factors_and_order_match_color_jitter(strength: float) -> None:
    expected = cpu_jitter_draws(strength)
    observed = batched(ViewConfig(image_size=32, color_strength=strength), (32, 32))
    for name in ("brightness", "contrast", "saturation", "hue"):
        values = getattr(observed, name).numpy()
        p_value = stats.ks_2samp(expected[name], values).pvalue
        assert p_value > SAME_P_VALUE, f"{name}: KS p={p_value:.2g}"
    table = np.stack([order_counts(expected["order"]), order_counts(observed.jitter_order.numpy())])
    assert table.sum() == 2 * DRAWS and (table > 0).all()
    assert stats.chi2_contingency(table).pvalue > SAME_P_VALUE


def test_shifted_jitter_strength_and_fixed_order_are_detected() -> None:
    expected = cpu_jitter_draws(1.0)
    weaker = batched(ViewConfig(image_size=32, color_strength=0.8), (32, 32))
    for name in ("brightness", "hue"):
        assert stats.ks_2samp(expected[name], getattr(weaker, name).numpy()).pvalue < SHIFTED_P_VALUE
    # One order for a whole batch (what kornia's ColorJitter draws) is rejected.
    shared_order = np.tile(np.random.default_rng(0).permutation(4), (DRAWS, 1))
    table = np.stack([order_counts(expected["order"]), order_counts(shared_order)])
    assert stats.chi2_contingency(table).pvalue < SHIFTED_P_VALUE


def test_blur_sigma_matches_gaussian_blur() -> None:
    config = ViewConfig(image_size=96, blur_sigma=(0.2, 1.5))
    draws = torch_draws(cpu_step(config, "gaussian_blur"), DRAWS, torch.empty(3, 8, 8))
    expected = np.array([d["sigma"][0] for d in draws])
    observed = batched(config, (96, 96)).blur_sigma.numpy()
    assert stats.ks_2samp(expected, observed).pvalue > SAME_P_VALUE
    shifted = batched(dataclasses.replace(config, blur_sigma=(0.2, 1.8)), (96, 96)).blur_sigma.numpy()
    assert stats.ks_2samp(expected, shifted).pvalue < SHIFTED_P_VALUE


DISTINCT = ViewConfig(
    image_size=96, flip_prob=0.35, color_jitter_prob=0.65, grayscale_prob=0.15, blur_prob=0.45
)


@pytest.mark.parametrize("config", [ViewConfig(image_size=96), DISTINCT], ids=["paper", "distinct"])
def test_application_rates_match_the_configured_probabilities(config: ViewConfig) -> None:
    parameters = batched(config, (96, 96))
    rates = {
        "flip": (parameters.flip, config.flip_prob),
        "color_jitter": (parameters.color_jitter, config.color_jitter_prob),
        "grayscale": (parameters.grayscale, config.grayscale_prob),
        "blur": (parameters.blur, config.blur_prob),
    }
    for name, (applied, probability) in rates.items():
        count = int(applied.sum())
        assert frequency_within_tolerance(count, DRAWS, probability), (
            f"{name}: {count}/{DRAWS} vs {probability}"
        )
    # The same counts fail against probabilities the config does not use.
    assert not frequency_within_tolerance(
        int(parameters.grayscale.sum()), DRAWS, config.grayscale_prob + 0.05
    )
    assert not frequency_within_tolerance(int(parameters.flip.sum()), DRAWS, config.flip_prob + 0.05)


def test_the_coins_are_independent() -> None:
    parameters = batched(ViewConfig(image_size=96), (96, 96), count=20_000)
    coins = torch.stack([parameters.flip, parameters.color_jitter, parameters.grayscale, parameters.blur])
    correlation = torch.corrcoef(coins.double())
    off_diagonal = correlation - torch.eye(4, dtype=torch.float64)
    assert off_diagonal.abs().max() < 0.03


def test_blur_off_at_32_pixels_by_default() -> None:
    assert not batched(ViewConfig(image_size=32), (32, 32)).blur.any()
    assert not batched(ViewConfig(image_size=224, blur=False), (256, 256)).blur.any()
    forced = batched(ViewConfig(image_size=32, blur=True), (32, 32)).blur
    assert frequency_within_tolerance(int(forced.sum()), DRAWS, 0.5)
    # Blur off leaves every view unblurred: the views equal those of a config without blur.
    images = torch.randint(
        0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    first = SimCLRViews(ViewConfig(image_size=32), torch.Generator().manual_seed(3))(images)
    second = SimCLRViews(ViewConfig(image_size=32, blur=False), torch.Generator().manual_seed(3))(images)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# --- The maths against torchvision's functional ops ----------------------------------------------


def reference_view(
    image: torch.Tensor, parameters: ViewParameters, index: int, config: ViewConfig
) -> torch.Tensor:
    """One view from torchvision's functional ops on float tensors, in the CPU path's order."""
    top, left, height, width = parameters.crop[index].tolist()
    size = [config.image_size, config.image_size]
    view = F.resized_crop(
        image.float() / 255,
        top,
        left,
        height,
        width,
        size,
        interpolation=v2.InterpolationMode.BICUBIC,
        antialias=True,
    ).clamp(0, 1)
    if parameters.flip[index]:
        view = F.horizontal_flip(view)
    if parameters.color_jitter[index]:
        for operation in parameters.jitter_order[index].tolist():
            if operation == 0:
                view = F.adjust_brightness(view, float(parameters.brightness[index]))
            elif operation == 1:
                view = F.adjust_contrast(view, float(parameters.contrast[index]))
            elif operation == 2:
                view = F.adjust_saturation(view, float(parameters.saturation[index]))
            else:
                view = F.adjust_hue(view, float(parameters.hue[index]))
    if parameters.grayscale[index]:
        view = F.rgb_to_grayscale(view, num_output_channels=3)
    if parameters.blur[index]:
        sigma = float(parameters.blur_sigma[index])
        view = F.gaussian_blur(view, [config.blur_kernel_size] * 2, [sigma, sigma])
    return F.normalize(view, list(config.mean), list(config.std))


@pytest.mark.parametrize("chunk", [None, 7, 1], ids=["default", "chunks-of-7", "one-by-one"])
@pytest.mark.parametrize(
    "image_size, height, width",
    [(24, 24, 24), (24, 40, 56), (48, 128, 112)],
    ids=["same-size", "non-square-upsampling", "downsampling"],
)
def test_views_equal_torchvision_functional_ops(
    image_size: int, height: int, width: int, chunk: int | None
) -> None:
    """The whole batch at once (the default), or in parts of the processing order (``chunk``)."""
    config = ViewConfig(
        image_size=image_size,
        blur=True,
        flip_prob=0.5,
        color_jitter_prob=0.7,
        grayscale_prob=0.3,
        blur_prob=0.5,
        min_scale=0.05,
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, height, width), dtype=torch.uint8, generator=generator)
    parameters = sample_view_parameters(48, (height, width), config, generator)
    views = make_views(images, parameters, config, chunk=chunk)
    expected = torch.stack([reference_view(images[i], parameters, i, config) for i in range(48)])
    torch.testing.assert_close(views, expected, atol=1e-4, rtol=0)


def test_views_made_from_sources_follow_the_source_index() -> None:
    config = ViewConfig(image_size=16, color_jitter_prob=0.5)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=generator)
    sources = torch.tensor([2, 0, 2, 1, 1])
    parameters = sample_view_parameters(5, (16, 16), config, generator)
    views = make_views(images, parameters, config, sources=sources)
    expected = torch.stack(
        [reference_view(images[s], parameters, i, config) for i, s in enumerate(sources.tolist())]
    )
    torch.testing.assert_close(views, expected, atol=1e-4, rtol=0)


def test_a_flip_mirrors_the_view() -> None:
    config = ViewConfig(image_size=32, color_jitter_prob=0, grayscale_prob=0)
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=generator)
    parameters = sample_view_parameters(16, (64, 64), config, generator)
    views = make_views(images, parameters, config)
    flipped = make_views(images, dataclasses.replace(parameters, flip=~parameters.flip), config)
    torch.testing.assert_close(flipped.flip(-1), views, atol=1e-5, rtol=0)


# --- Padded batches of images of different sizes -------------------------------------------------


def padded_batch(
    sizes: list[tuple[int, int]], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Random images of the given sizes, padded with 255 (so padding that leaked would show)."""
    generator = torch.Generator().manual_seed(seed)
    alone = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.full((len(sizes), 3, height, width), 255, dtype=torch.uint8)
    for row, image in enumerate(alone):
        images[row, :, : image.shape[1], : image.shape[2]] = image
    return images, torch.tensor(sizes), alone


def test_crops_lie_inside_each_images_own_extent() -> None:
    sizes = torch.tensor([[375, 500], [120, 500], [500, 90], [32, 32]]).repeat(500, 1)
    crops = sample_view_parameters(
        len(sizes), sizes, ViewConfig(image_size=32), torch.Generator().manual_seed(0)
    ).crop
    top, left, height, width = crops.unbind(dim=1)
    assert (top >= 0).all() and (left >= 0).all() and (height > 0).all() and (width > 0).all()
    assert (top + height <= sizes[:, 0]).all() and (left + width <= sizes[:, 1]).all()
    # The whole photo is reachable: some crops touch its far edges.
    assert ((top + height == sizes[:, 0]) & (sizes[:, 0] == 375)).any()
    assert ((left + width == sizes[:, 1]) & (sizes[:, 1] == 500)).any()


def test_views_of_a_padded_batch_equal_views_of_each_image_alone() -> None:
    config = ViewConfig(image_size=24, blur=True, color_jitter_prob=0.5)
    images, sizes, alone = padded_batch([(40, 56), (64, 30), (24, 24)])
    parameters = sample_view_parameters(3, sizes, config, torch.Generator().manual_seed(4))
    views = make_views(images, parameters, config)
    for row, image in enumerate(alone):
        own = make_views(image[None], parameters_row(parameters, row), config)
        torch.testing.assert_close(views[row : row + 1], own, atol=1e-5, rtol=0)


def parameters_row(parameters: ViewParameters, row: int) -> ViewParameters:
    return ViewParameters(
        **{
            field.name: None if value is None else value[row : row + 1]
            for field in dataclasses.fields(parameters)
            for value in [getattr(parameters, field.name)]
        }
    )


def test_two_views_refuse_sizes_outside_the_batch() -> None:
    images, sizes, _ = padded_batch([(20, 20), (16, 24)])
    with pytest.raises(ValueError, match="within the padded images"):
        SimCLRViews(ViewConfig(image_size=16))(images, sizes + 1, torch.Generator())


# --- Shapes, determinism, pairing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "image_size, height, width, blur",
    [(32, 32, 32, None), (32, 40, 30, True), (96, 110, 110, None), (8, 8, 8, True)],
)
def test_two_views_shapes_dtype_and_finiteness(
    image_size: int, height: int, width: int, blur: bool | None
) -> None:
    images = torch.randint(0, 256, (5, 3, height, width), dtype=torch.uint8)
    first, second = SimCLRViews(ViewConfig(image_size=image_size, blur=blur))(images)
    for view in (first, second):
        assert view.shape == (5, 3, image_size, image_size)
        assert view.dtype == torch.float32 and view.device == images.device
        assert torch.isfinite(view).all()
    assert not torch.equal(first, second)


def test_extreme_images_stay_finite_and_in_range() -> None:
    config = ViewConfig(image_size=16, color_strength=2.5, blur=True, mean=(0, 0, 0), std=(1, 1, 1))
    images = torch.stack(
        [
            torch.zeros(3, 16, 16, dtype=torch.uint8),
            torch.full((3, 16, 16), 255, dtype=torch.uint8),
            torch.randint(0, 2, (3, 16, 16), dtype=torch.uint8) * 255,
        ]
    )
    first, second = SimCLRViews(config, torch.Generator().manual_seed(0))(images.repeat(20, 1, 1, 1))
    for view in (first, second):
        assert torch.isfinite(view).all()
        assert view.min() >= -1e-6 and view.max() <= 1 + 1e-6


def test_seeded_generator_gives_the_same_views() -> None:
    config = ViewConfig(image_size=32, blur=True)
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    first = SimCLRViews(config, torch.Generator().manual_seed(7))(images)
    again = SimCLRViews(config, torch.Generator().manual_seed(7))(images)
    other = SimCLRViews(config, torch.Generator().manual_seed(8))(images)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_views_are_paired_with_their_image() -> None:
    """first[i] and second[i] come from image i, whatever order the views were processed in."""
    config = ViewConfig(image_size=16, color_strength=0.0, grayscale_prob=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    levels = torch.arange(40, dtype=torch.uint8) * 6
    images = levels.view(40, 1, 1, 1).expand(40, 3, 16, 16).contiguous()
    first, second = SimCLRViews(config, torch.Generator().manual_seed(0))(images)
    expected = levels.float() / 255
    torch.testing.assert_close(first.mean(dim=(1, 2, 3)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(second.mean(dim=(1, 2, 3)), expected, atol=1e-5, rtol=0)


def test_invalid_inputs_raise() -> None:
    two_views = SimCLRViews(ViewConfig(image_size=16))
    with pytest.raises(ValueError, match="uint8"):
        two_views(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="images of 1 channels, but normalisation statistics for 3"):
        two_views(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    parameters = batched(ViewConfig(image_size=16), (16, 16), count=3)
    with pytest.raises(ValueError, match="sources"):
        make_views(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), parameters, ViewConfig(image_size=16))


# --- Pixel statistics of real photos against the CPU (PIL) path ----------------------------------

STATISTICS = (
    "mean_red",
    "mean_green",
    "mean_blue",
    "std_red",
    "std_green",
    "std_blue",
    "colourfulness",
    "detail",
)


def view_statistics(views: torch.Tensor) -> torch.Tensor:
    """Per view: channel means and standard deviations, mean distance of a pixel's channels from
    their mean (colourfulness), mean absolute horizontal difference (detail). Shape: (n, 8)."""
    colourfulness = (views - views.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3))
    detail = (views[..., 1:] - views[..., :-1]).abs().mean(dim=(1, 2, 3))
    return torch.cat(
        [views.mean(dim=(2, 3)), views.std(dim=(2, 3)), colourfulness[:, None], detail[:, None]], dim=1
    )


def per_image_statistics_cpu(images: torch.Tensor, config: ViewConfig, repeats: int) -> torch.Tensor:
    view = simclr_view(config)
    photos = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.stack(
            [view_statistics(torch.stack([view(photo) for _ in range(repeats)])).mean(0) for photo in photos]
        )


def per_image_statistics_batched(images: torch.Tensor, config: ViewConfig, repeats: int) -> torch.Tensor:
    two_views = SimCLRViews(config, torch.Generator().manual_seed(0))
    statistics = [view_statistics(view) for _ in range(repeats // 2) for view in two_views(images)]
    return torch.stack(statistics).mean(0)


@pytest.fixture(scope="module")
def photos_at(hymenoptera: Path) -> dict[int, torch.Tensor]:
    """96 real photos as 32 px and 128 px central squares, the same pixels for both paths."""
    paths = find_images(hymenoptera / "train")[::2][:96]
    return {
        side: torch.stack(
            [
                pil_to_tensor(ImageOps.fit(load_rgb(path), (side, side), Image.Resampling.BICUBIC))
                for path in paths
            ]
        )
        for side in (32, 128)
    }


@pytest.mark.parametrize(
    "side, config",
    [
        (32, ViewConfig(image_size=32, color_strength=0.5)),
        (128, ViewConfig(image_size=48, blur=True)),
    ],
    ids=["cifar-like-32", "photo-48-blur"],
)
def test_view_statistics_match_the_cpu_path(
    photos_at: dict[int, torch.Tensor], side: int, config: ViewConfig
) -> None:
    """Paired by photo: each statistic's mean difference is within 4 standard errors plus a
    small allowance for the CPU path's uint8 rounding (PIL's blends truncate, see the module)."""
    images = photos_at[side]
    cpu = per_image_statistics_cpu(images, config, repeats=6)
    ours = per_image_statistics_batched(images, config, repeats=6)
    assert differences_within_tolerance(cpu, ours), describe(cpu, ours)
    # The check rejects a batched path that turned every view to grayscale ...
    gray = per_image_statistics_batched(images, dataclasses.replace(config, grayscale_prob=1.0), repeats=6)
    assert not differences_within_tolerance(cpu, gray)
    # ... or that left the views unnormalised.
    unit = dataclasses.replace(config, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert not differences_within_tolerance(cpu, per_image_statistics_batched(images, unit, repeats=6))


UINT8_ALLOWANCE = 0.03
"""Normalised units (about 1.7/255 of a pixel value): the CPU path's uint8 bias. Each of Pillow's
truncating blends (brightness, contrast, saturation) darkens a view by ~0.4/255 on average."""


def differences_within_tolerance(cpu: torch.Tensor, ours: torch.Tensor) -> bool:
    difference = cpu - ours
    standard_error = difference.std(dim=0) / math.sqrt(difference.shape[0])
    return bool((difference.mean(dim=0).abs() <= 4 * standard_error + UINT8_ALLOWANCE).all())


def describe(cpu: torch.Tensor, ours: torch.Tensor) -> str:
    difference = cpu - ours
    standard_error = difference.std(dim=0) / math.sqrt(difference.shape[0])
    return ", ".join(
        f"{name} {mean:+.3f}±{error:.3f}"
        for name, mean, error in zip(
            STATISTICS, difference.mean(dim=0).tolist(), standard_error.tolist(), strict=True
        )
    )


def test_cpu_views_use_one_thread_and_restore_the_setting() -> None:
    torch.set_num_threads(2)  # the autouse fixture restores the original count afterwards
    with one_thread_on_cpu(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    SimCLRViews(ViewConfig(image_size=8))(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert torch.get_num_threads() == 2
