"""The colour and blur ops of the views against torchvision's functional ops, and their work-saving paths.

`labelfew.views.ops` computes hue with pairwise maximum/minimum and a floor-based ``mod 6``, blurs
by shifted sums over only the taps a kernel needs, and skips the gray term of brightness and the
views whose hue shift is 0: each must give torchvision's values (float32 rounding), and making
views one at a time must give the views of the whole batch at once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from labelfew.views.config import ViewConfig
from labelfew.views.ops import adjust_hue, blur_radius, gaussian_blur
from labelfew.views.params import sample_view_parameters
from labelfew.views.simclr import blur_kernels, make_views


def test_hue_equals_torchvision_with_ties_and_grays() -> None:
    generator = torch.Generator().manual_seed(0)
    views = torch.rand(12, 3, 20, 24, generator=generator)
    views[:, :, :6] = (views[:, :, :6] * 3).round() / 3  # channels that tie, and pure grays
    views[0, :, 6:8] = 0.0
    shift = torch.linspace(-0.5, 0.5, 12).view(12, 1, 1)
    expected = torch.stack([F.adjust_hue(views[i], float(shift[i])) for i in range(12)])
    torch.testing.assert_close(adjust_hue(views, shift), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.1, 0.4, 1.0, 2.0, 5.0])
def test_trimmed_blur_equals_torchvision_gaussian_blur(sigma: float) -> None:
    """Taps under 1e-9 of the centre are left out: the views differ by float rounding only (two
    float32 sums of up to 23 products of values <= 1, each rounding by <= 6e-8: 3e-6 at most)."""
    generator = torch.Generator().manual_seed(1)
    views = torch.rand(2, 3, 40, 36, generator=generator)
    parameters = dataclasses.replace(
        sample_view_parameters(2, (40, 36), ViewConfig(image_size=32), generator),
        blur_sigma=torch.full((2,), sigma),
    )
    kernels = blur_kernels(parameters, 23)
    radius = blur_radius(kernels)
    assert radius[0] == {0.1: 0, 0.4: 2, 1.0: 6, 2.0: 11, 5.0: 11}[sigma]  # sigma * sqrt(2 ln 1e9)
    expected = torch.stack([F.gaussian_blur(view, [23, 23], [sigma, sigma]) for view in views])
    gaussian_blur(views, kernels.float(), ((0, 2, radius[0]),))
    torch.testing.assert_close(views, expected, atol=3e-6, rtol=0)


@pytest.mark.parametrize("color_strength", [0.0, 1.0])
def test_views_one_by_one_equal_the_whole_batch(color_strength: float) -> None:
    """Strength 0 draws hue shifts of 0 (hue skipped) and identity factors (jitter skipped)."""
    config = ViewConfig(image_size=40, color_strength=color_strength, blur=True)
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (20, 3, 50, 60), dtype=torch.uint8, generator=generator)
    parameters = sample_view_parameters(20, (50, 60), config, generator)
    whole = make_views(images, parameters, config, chunk=20)
    torch.testing.assert_close(make_views(images, parameters, config, chunk=1), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(make_views(images, parameters, config, chunk=6), whole, atol=1e-6, rtol=0)
    if color_strength == 0:
        plain = dataclasses.replace(parameters, color_jitter=torch.zeros(20, dtype=torch.bool))
        torch.testing.assert_close(make_views(images, plain, config, chunk=1), whole, atol=0, rtol=0)
