"""The per-image PIL SimCLR views: the distribution reference for `labelfew.views`.

labelfew makes every view on the training device, a whole batch at a time (`labelfew.views.simclr`,
`labelfew.views.finetune`, `labelfew.views.evaluate`). This module keeps the per-image path it
replaced, built from torchvision's own transforms on PIL images, so that the tests can compare
the batched parameters (KS and chi-square tests) and pixels against it. It exists only for
the tests.

The view is built from an explicit list of `ViewStep` (name, probability, transform) so that
each random operation's application can be observed and tested; `simclr_view` only composes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from labelfew.spec import EVAL_CROP_FRACTION
from labelfew.views.config import (
    CROP_RATIO,
    ViewConfig,
    check_image_size,
    check_min_scale,
    finetune_min_scale,
    resolve_mean_std,
)

INTERPOLATION = v2.InterpolationMode.BICUBIC
"""Resampling for every resize here: bicubic, as the official SimCLR code."""

Transform = Callable[[Any], Any]


class ViewStep(NamedTuple):
    """One operation of a view: ``transform`` is applied with probability ``probability``.

    ``transform`` itself is deterministic in whether it acts (it may still draw its own
    parameters, e.g. the crop box or the jitter factors); `compose_view_steps` adds the coin.
    """

    name: str
    probability: float
    transform: Transform


def simclr_view_steps(config: ViewConfig) -> list[ViewStep]:
    """The operations of one SimCLR view, in order (paper appendix A).

    Args:
        config: View parameters.

    Returns:
        Steps named ``convert_to_rgb``, ``random_resized_crop``, ``horizontal_flip``,
        ``color_jitter``, ``grayscale``, ``gaussian_blur`` (only when ``config.blur_enabled``),
        ``to_float_tensor`` and ``normalize``.
    """
    strength = config.color_strength
    crop = _random_resized_crop(config.image_size, config.min_scale)
    steps = [
        ViewStep("convert_to_rgb", 1.0, v2.RGB()),
        ViewStep("random_resized_crop", 1.0, crop),
        ViewStep("horizontal_flip", config.flip_prob, v2.RandomHorizontalFlip(p=1.0)),
        ViewStep(
            "color_jitter",
            config.color_jitter_prob,
            v2.ColorJitter(
                brightness=0.8 * strength,
                contrast=0.8 * strength,
                saturation=0.8 * strength,
                hue=0.2 * strength,
            ),
        ),
        ViewStep("grayscale", config.grayscale_prob, v2.Grayscale(num_output_channels=3)),
    ]
    if config.blur_enabled:
        blur = v2.GaussianBlur(kernel_size=config.blur_kernel_size, sigma=config.blur_sigma)
        steps.append(ViewStep("gaussian_blur", config.blur_prob, blur))
    steps += _tensor_steps(config.mean, config.std)
    return steps


def compose_view_steps(steps: Sequence[ViewStep]) -> Transform:
    """Chains steps, applying each with its probability (steps with probability 0 are dropped).

    Args:
        steps: Operations in order, e.g. from `simclr_view_steps`.

    Returns:
        A picklable transform (safe for DataLoader workers) running the steps in order.
    """
    transforms: list[Transform] = []
    for step in steps:
        if step.probability >= 1:
            transforms.append(step.transform)
        elif step.probability > 0:
            transforms.append(v2.RandomApply([step.transform], p=step.probability))
    return v2.Compose(transforms)


def simclr_view(config: ViewConfig) -> Callable[[Image.Image], Tensor]:
    """One random SimCLR view of an image (https://arxiv.org/abs/2002.05709, appendix A).

    Args:
        config: View parameters.

    Returns:
        A transform from a PIL image of any size (RGB; other modes are converted) to a
        normalised float32 tensor. Shape: (3, image_size, image_size).
    """
    return compose_view_steps(simclr_view_steps(config))


class TwoViews:
    """Two independent random views of the same image: the positive pair of NT-Xent.

    Args:
        view: Transform producing one random view, usually ``simclr_view(config)``.
    """

    def __init__(self, view: Callable[[Image.Image], Tensor]) -> None:
        self.view = view

    @classmethod
    def from_config(cls, config: ViewConfig) -> TwoViews:
        """Two SimCLR views built from ``config``."""
        return cls(simclr_view(config))

    def __call__(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        """Returns ``(view1, view2)``, each of shape (3, image_size, image_size)."""
        return self.view(image), self.view(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.view!r})"


def finetune_transform(
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    min_scale: float | None = None,
) -> Callable[[Image.Image], Tensor]:
    """Training transform for fine-tuning: random resized crop, horizontal flip, normalise.

    SimCLR fine-tunes with crops and flips only, no colour distortion (arXiv 2002.05709,
    appendix B.5; the official code crops with area fraction in [0.08, 1]).

    Args:
        image_size: Output side ``S`` in pixels.
        mean: Normalisation mean; None for ImageNet's.
        std: Normalisation standard deviation; None for ImageNet's.
        min_scale: Smallest crop area fraction. None picks 0.08 (SimCLR's value) above 64 px
            and 0.25 at 64 px or less, where an 8% crop keeps only ~9 x 9 pixels of a 32 px
            image: too little of the object for a classifier trained on a handful of labels.

    Returns:
        A transform from a PIL image to a float32 tensor. Shape: (3, image_size, image_size).
    """
    check_image_size(image_size)
    if min_scale is None:
        min_scale = finetune_min_scale(image_size)
    check_min_scale(min_scale)
    steps = [
        ViewStep("convert_to_rgb", 1.0, v2.RGB()),
        ViewStep("random_resized_crop", 1.0, _random_resized_crop(image_size, min_scale)),
        ViewStep("horizontal_flip", 0.5, v2.RandomHorizontalFlip(p=1.0)),
        *_tensor_steps(*resolve_mean_std(mean, std)),
    ]
    return compose_view_steps(steps)


def eval_transform(
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    on_tensor: bool = False,
) -> Callable[[Image.Image], Tensor]:
    """Deterministic evaluation transform: resize the shorter side, centre crop, normalise.

    Above 64 px the shorter side is resized to ``round(S / 0.875)`` and the central ``S x S``
    kept (the standard ImageNet protocol, SimCLR's ``CROP_PROPORTION``); at 64 px or less it is
    resized to ``S`` so that small images lose nothing (a square image is used whole).

    Args:
        image_size: Output side ``S`` in pixels.
        mean: Normalisation mean; None for ImageNet's.
        std: Normalisation standard deviation; None for ImageNet's.
        on_tensor: Resize the image's uint8 tensor (what `labelfew.data.images.load_resized`
            does) instead of the PIL image (within 2/255 of it).

    Returns:
        A transform from a PIL image to a float32 tensor. Shape: (3, image_size, image_size).
    """
    check_image_size(image_size)
    resize_side = image_size if image_size <= 64 else round(image_size / EVAL_CROP_FRACTION)
    resize = v2.Resize(resize_side, interpolation=INTERPOLATION, antialias=True)
    steps = [
        ViewStep("convert_to_rgb", 1.0, v2.RGB()),
        *([ViewStep("to_tensor", 1.0, v2.PILToTensor())] if on_tensor else []),
        ViewStep("resize", 1.0, resize),
        ViewStep("center_crop", 1.0, v2.CenterCrop(image_size)),
        *_tensor_steps(*resolve_mean_std(mean, std)),
    ]
    return compose_view_steps(steps)


def _random_resized_crop(image_size: int, min_scale: float) -> Transform:
    return v2.RandomResizedCrop(
        image_size,
        scale=(min_scale, 1.0),
        ratio=CROP_RATIO,
        interpolation=INTERPOLATION,
        antialias=True,
    )


def _tensor_steps(mean: Sequence[float], std: Sequence[float]) -> list[ViewStep]:
    to_float_tensor = v2.Compose([v2.ToImage(), v2.ToPureTensor(), v2.ToDtype(torch.float32, scale=True)])
    return [
        ViewStep("to_float_tensor", 1.0, to_float_tensor),
        ViewStep("normalize", 1.0, v2.Normalize(mean=list(mean), std=list(std))),
    ]
