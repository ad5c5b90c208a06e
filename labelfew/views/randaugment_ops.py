"""The pixel operations of FixMatch's RandAugment on a batch of float views, each as torchvision's.

Every function takes float views in [0, 1] of shape (n, C, H, W) and, where the operation has one,
a value per view (shape (n,)), and computes what ``torchvision.transforms.v2.functional``
computes on each float image (``tests/views/test_randaugment.py`` compares them image by image).

Channels: every operation works on RGB and on 1 channel as torchvision does on a 1-channel image
(PIL's mode "L"): Color (saturation) is the identity and Contrast blends with the image's own
mean. On N channels (C not 1 or 3), which torchvision refuses for these two, Color is the identity
and Contrast blends each channel with its own mean, as the SimCLR views' per-channel contrast; the
other operations (AutoContrast, Equalize, Posterize, Solarize, Sharpness, geometry) already work
channel by channel.
`labelfew.views.randaugment` draws the values and calls these on the views that drew each operation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as functional
from torch import Tensor

from labelfew.views.ops import grayscale


def _per_view(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def blend(first: Tensor, second: Tensor, factor: Tensor) -> Tensor:
    """``factor * first + (1 - factor) * second`` clamped to [0, 1] (torchvision's ``_blend``)."""
    factor = _per_view(factor)
    return (first * factor).add_(second * (1 - factor)).clamp_(0, 1)


def autocontrast(views: Tensor) -> Tensor:
    """Stretches each channel of each view to [0, 1]; constant channels stay (torchvision's ``autocontrast``)."""
    minimum = views.amin(dim=(-2, -1), keepdim=True)
    spread = views.amax(dim=(-2, -1), keepdim=True) - minimum
    constant = spread == 0
    minimum = minimum.masked_fill(constant, 0.0)
    spread = spread.masked_fill(constant, 1.0)
    return (views - minimum).div_(spread).clamp_(0, 1)


def brightness(views: Tensor, factor: Tensor) -> Tensor:
    """``factor * view`` clamped (torchvision's ``adjust_brightness``). factor: Shape: (n,)."""
    return (views * _per_view(factor)).clamp_(0, 1)


def saturation(views: Tensor, factor: Tensor) -> Tensor:
    """Blend with the view's grayscale: PIL's Color (torchvision's ``adjust_saturation``).

    The identity off RGB (torchvision returns a 1-channel image unchanged).
    """
    if views.shape[1] != 3:
        return views.clone()
    return blend(views, grayscale(views), factor)


def contrast(views: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean of the view's grayscale (torchvision's ``adjust_contrast``).

    Off RGB each channel blends with its own mean (1 channel: torchvision's).
    """
    if views.shape[1] != 3:
        return blend(views, views.mean(dim=(-2, -1), keepdim=True), factor)
    return blend(views, grayscale(views).mean(dim=(-3, -2, -1), keepdim=True), factor)


def posterize(views: Tensor, bits: Tensor) -> Tensor:
    """Keeps ``bits`` bits: ``floor(x * 2^bits) / 2^bits`` (torchvision's float ``posterize``)."""
    levels = _per_view(torch.exp2(bits))
    return (views * levels).floor_().clamp_(min=torch.zeros_like(levels), max=levels - 1).div_(levels)


def solarize(views: Tensor, threshold: Tensor) -> Tensor:
    """Inverts the pixels at or above ``threshold`` (torchvision's ``solarize``)."""
    return torch.where(views >= _per_view(threshold), 1 - views, views)


def sharpness(views: Tensor, factor: Tensor) -> Tensor:
    """Blend away from PIL's SMOOTH filter, borders kept (torchvision's ``adjust_sharpness``).

    The filter (``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13``: a 3 x 3 box plus 4 x the centre) is
    summed from shifted slices, several times faster on the CPU than a depthwise convolution. Views of 2 px or
    less on a side are returned unchanged, as torchvision does.
    """
    if views.shape[-2] <= 2 or views.shape[-1] <= 2:
        return views
    rows = views[..., :-2, :] + views[..., 1:-1, :] + views[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    output = views.clone()
    interior = output[..., 1:-1, 1:-1]
    blurred = box.add_(interior, alpha=4).div_(13)
    interior.add_(blurred.sub_(interior).mul_(1 - _per_view(factor)))
    return output.clamp_(0, 1)


def equalize(views: Tensor) -> Tensor:
    """Histogram equalisation of each channel on 256 levels, as PIL and torchvision's ``equalize``.

    Like torchvision, a float view is binned to uint8 (``x * (256 - 1e-3)``, truncated), equalised
    with PIL's lookup table, and returned as ``level / 255``; a channel with one level left after its
    most frequent one (``step == 0``) keeps its binned values.
    """
    levels = views.mul(256 - 1e-3).to(torch.uint8).flatten(start_dim=-2).long()
    channels = levels.shape[0] * levels.shape[1]
    offsets = torch.arange(channels, device=views.device).view(*levels.shape[:-1], 1) * 256
    histogram = torch.bincount((levels + offsets).flatten(), minlength=channels * 256)
    histogram = histogram.view(*levels.shape[:-1], 256)
    cumulative = histogram.cumsum(dim=-1)
    last = cumulative.argmax(dim=-1, keepdim=True)  # the brightest level present
    step = torch.div(levels.shape[-1] - histogram.gather(-1, last), 255, rounding_mode="floor")
    table = torch.div(cumulative[..., :-1] + step // 2, step.clamp(min=1), rounding_mode="floor").clamp_(
        0, 255
    )
    table = torch.cat([torch.zeros_like(table[..., :1]), table], dim=-1)
    equalized = torch.where(step > 0, table.gather(-1, levels), levels)
    return equalized.view(views.shape).to(views.dtype).mul_(1 / 255)


def affine(views: Tensor, theta: Tensor, fill: float) -> Tensor:
    """Nearest-neighbour affine resampling, one matrix per view, ``fill`` outside (torchvision's grid).

    The sampling grid is torchvision's ``_affine_grid``: pixel centres relative to the image centre,
    mapped by ``theta`` and divided by half the side; the fill uses a ones channel sampled alongside,
    as torchvision's ``_apply_grid_transform``.

    Args:
        views: Shape: (n, C, H, W).
        theta: From `affine_matrices`. Shape: (n, 2, 3), on the views' device.
    """
    count, channels, height, width = views.shape
    base = torch.empty(height, width, 3, dtype=views.dtype, device=views.device)
    base[..., 0] = torch.linspace((1 - width) * 0.5, (width - 1) * 0.5, width, device=views.device)
    base[..., 1] = torch.linspace((1 - height) * 0.5, (height - 1) * 0.5, height, device=views.device).view(
        -1, 1
    )
    base[..., 2] = 1
    half = torch.tensor([0.5 * width, 0.5 * height], dtype=views.dtype, device=views.device)
    scaled = theta.transpose(1, 2) / half
    grid = torch.bmm(base.view(1, height * width, 3).expand(count, -1, -1), scaled).view(
        count, height, width, 2
    )
    with_mask = torch.cat([views, torch.ones_like(views[:, :1])], dim=1)
    sampled = functional.grid_sample(
        with_mask, grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    resampled, mask = sampled[:, :channels], sampled[:, channels:]
    return resampled.masked_fill_(mask < 0.5, fill)
