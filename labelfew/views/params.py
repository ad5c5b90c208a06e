"""The random parameters of a batch of views, drawn on the host from one seeded generator.

Every parameter has the distribution of the torchvision transform that the per-image reference
(``tests/reference/pil_views.py``) draws it from: the crop box as ``RandomResizedCrop`` (ten
attempts, then its centre-crop fallback) inside each image's own extent, the flip / jitter /
grayscale / blur coins, ``ColorJitter``'s factors and its random order of the four adjustments
(drawn per view, as torchvision draws it per image), and the blur sigma. Drawing them on the host
costs microseconds, needs no device synchronisation, and gives the same views for a seed on
every device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from labelfew.views.config import CROP_RATIO, ViewConfig

CROP_ATTEMPTS = 10
"""Tries of torchvision's RandomResizedCrop before it falls back to a centre crop."""

ImageSizes = Tensor | tuple[int, int]
"""``(height, width)`` of every view's source image, shape (views, 2), or one size for all views."""


@dataclass(frozen=True)
class ViewParameters:
    """The random parameters of a batch of views, one row per view, on the CPU.

    Attributes:
        crop: ``(top, left, height, width)`` of each crop box in input pixels, as torchvision's
            ``RandomResizedCrop`` returns them. Shape: (views, 4), int64.
        flip: Whether the view is flipped horizontally. Shape: (views,), bool.
        color_jitter: Whether the colour jitter is applied. Shape: (views,), bool.
        jitter_order: The order of the four adjustments, a permutation of
            ``(BRIGHTNESS, CONTRAST, SATURATION, HUE)``. Shape: (views, 4), int64.
        brightness: Brightness factor (1 leaves the view unchanged). Shape: (views,).
        contrast: Contrast factor. Shape: (views,).
        saturation: Saturation factor. Shape: (views,).
        hue: Hue shift in turns, in ``[-0.5, 0.5]``. Shape: (views,).
        grayscale: Whether the view is turned to grayscale. Shape: (views,), bool.
        blur: Whether the view is blurred (always False when the config's blur is off).
            Shape: (views,), bool.
        blur_sigma: Standard deviation of the blur in output pixels. Shape: (views,).
        channel_brightness: For images of C != 3 channels, the brightness factor of each channel
            (`labelfew.views.channels.channel_jitter`): 1 channel uses ``brightness``; N channels draw
            one factor per channel per view from the same range. None for RGB. Shape: (views, C).
        channel_contrast: The contrast factors, as ``channel_brightness``. Shape: (views, C).

    For C != 3 the views get no hue, saturation or grayscale (the identity on one gray channel,
    undefined on N channels): ``saturation``, ``hue`` and ``grayscale`` are drawn as for RGB (the
    generator's stream is the same) and not used.
    """

    crop: Tensor
    flip: Tensor
    color_jitter: Tensor
    jitter_order: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    grayscale: Tensor
    blur: Tensor
    blur_sigma: Tensor
    channel_brightness: Tensor | None = None
    channel_contrast: Tensor | None = None

    def __len__(self) -> int:
        return int(self.flip.shape[0])


class Draw:
    """Uniform float64 draws of one value per view (or several) from one generator."""

    def __init__(self, view_count: int, generator: torch.Generator | None) -> None:
        self.view_count = view_count
        self.generator = generator

    def uniform(self, low: float = 0.0, high: float = 1.0, columns: int | None = None) -> Tensor:
        """Shape: (views,) or (views, columns), float64."""
        shape = (self.view_count,) if columns is None else (self.view_count, columns)
        values = torch.empty(shape, dtype=torch.float64)
        return values.uniform_(low, high, generator=self.generator)


def sample_view_parameters(
    view_count: int,
    image_sizes: ImageSizes,
    config: ViewConfig,
    generator: torch.Generator | None = None,
) -> ViewParameters:
    """Draws the random parameters of ``view_count`` SimCLR views of ``config.channels`` channels.

    Args:
        view_count: Number of views.
        image_sizes: ``(height, width)`` of each view's source image (its valid extent in a
            padded batch). Shape: (views, 2), or one ``(height, width)`` for every view.
        config: View parameters (crop scale, colour strength, probabilities, blur).
        generator: A CPU generator for reproducible draws; None uses torch's global one.

    Returns:
        Parameters on the CPU, one row per view. RGB draws exactly what it drew before channels
        were a choice; N != 1, 3 channels draw their per-channel factors after everything else.
    """
    draw = Draw(view_count, generator)
    strength = config.color_strength
    factor_low, factor_high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    parameters = ViewParameters(
        crop=sample_crops(draw, image_sizes, config.min_scale),
        flip=draw.uniform() < config.flip_prob,
        color_jitter=draw.uniform() < config.color_jitter_prob,
        jitter_order=torch.argsort(torch.rand(view_count, 4, generator=generator), dim=1),
        brightness=draw.uniform(factor_low, factor_high).float(),
        contrast=draw.uniform(factor_low, factor_high).float(),
        saturation=draw.uniform(factor_low, factor_high).float(),
        hue=draw.uniform(-0.2 * strength, 0.2 * strength).float(),
        grayscale=draw.uniform() < config.grayscale_prob,
        blur=(draw.uniform() < config.blur_prob) & config.blur_enabled,
        blur_sigma=draw.uniform(*config.blur_sigma).float(),
    )
    channels = config.channels
    if channels == 3:
        return parameters
    if channels == 1:
        brightness, contrast = parameters.brightness[:, None], parameters.contrast[:, None]
    else:
        brightness = draw.uniform(factor_low, factor_high, columns=channels).float()
        contrast = draw.uniform(factor_low, factor_high, columns=channels).float()
    return dataclasses.replace(parameters, channel_brightness=brightness, channel_contrast=contrast)


def view_sizes(image_sizes: ImageSizes, view_count: int) -> tuple[Tensor, Tensor]:
    """``(heights, widths)`` as float64 tensors of shape (views,)."""
    sizes = torch.as_tensor(image_sizes, dtype=torch.float64).reshape(-1, 2).expand(view_count, 2)
    return sizes[:, 0], sizes[:, 1]


def sample_crops(draw: Draw, image_sizes: ImageSizes, min_scale: float) -> Tensor:
    """torchvision's RandomResizedCrop.make_params for every view at once, each in its own image.

    Each view tries ``CROP_ATTEMPTS`` (area fraction, log aspect ratio) pairs and keeps the first
    whose rounded box fits; a view where none fits gets torchvision's centre-crop fallback.

    Returns:
        ``(top, left, height, width)`` per view. Shape: (views, 4), int64.
    """
    height, width = (side[:, None] for side in view_sizes(image_sizes, draw.view_count))
    target_area = height * width * draw.uniform(min_scale, 1.0, columns=CROP_ATTEMPTS)
    log_ratio = draw.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), columns=CROP_ATTEMPTS)
    aspect_ratio = torch.exp(log_ratio)
    widths = torch.round(torch.sqrt(target_area * aspect_ratio))
    heights = torch.round(torch.sqrt(target_area / aspect_ratio))
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first_fit = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    crop_width = widths.gather(1, first_fit).squeeze(1)
    crop_height = heights.gather(1, first_fit).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    top = torch.minimum(torch.floor(draw.uniform() * (height - crop_height + 1)), height - crop_height)
    left = torch.minimum(torch.floor(draw.uniform() * (width - crop_width + 1)), width - crop_width)
    fallback = fallback_crops(height, width)
    found = fits.any(dim=1)
    crop = torch.stack([top, left, crop_height, crop_width], dim=1)
    return torch.where(found[:, None], crop, fallback).long()


def fallback_crops(height: Tensor, width: Tensor) -> Tensor:
    """torchvision's centre crop when ten attempts failed: the largest box within the ratio range.

    Shape: (views,) heights and widths -> (views, 4) ``(top, left, height, width)``, float64.
    """
    ratio = width / height
    low, high = min(CROP_RATIO), max(CROP_RATIO)
    crop_width = torch.where(ratio > high, torch.round(height * high), width)
    crop_height = torch.where(ratio < low, torch.round(width / low), height)
    top = torch.div(height - crop_height, 2, rounding_mode="floor")
    left = torch.div(width - crop_width, 2, rounding_mode="floor")
    return torch.stack([top, left, crop_height, crop_width], dim=1)


def sample_crop_and_flip(
    view_count: int,
    image_sizes: ImageSizes,
    min_scale: float,
    flip_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The crop boxes (views, 4) and flip coins (views,) of fine-tuning's crop + flip."""
    draw = Draw(view_count, generator)
    return sample_crops(draw, image_sizes, min_scale), draw.uniform() < flip_prob


def sample_shift_and_flip(
    view_count: int,
    extents: Tensor,
    size: int,
    padding: int,
    flip_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip`` parameters, per view.

    The window's corner is uniform over every ``size x size`` window of the image padded by
    ``padding`` on each side (``torch.randint(0, extent + 2 * padding - size + 1)``, as
    ``RandomCrop.get_params``), in the padded image's coordinates.

    Args:
        extents: ``(height, width)`` of each view's image, at least ``size``. Shape: (views, 2).

    Returns:
        ``(top, left, flip)``: shapes (views,), int64, int64 and bool.
    """
    draw = Draw(view_count, generator)
    spans = extents.to(torch.float64) + 2 * padding - size + 1
    corners = torch.floor(draw.uniform(columns=2) * spans).long()
    corners = torch.minimum(corners, spans.long() - 1)
    return corners[:, 0], corners[:, 1], draw.uniform() < flip_prob
