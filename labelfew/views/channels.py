"""The colour jitter of images that are not RGB: brightness and contrast, channel by channel.

RGB's ColorJitter (`labelfew.views.ops.color_jitter`) mixes the channels through luma (contrast,
saturation) and HSV (hue). A gray image has no hue or saturation, and an N-channel image (a
fluorescence stack, a multispectral tile) has no luma; what remains defined on each channel alone
is brightness and contrast, as torchvision computes them on a 1-channel image.
"""

from __future__ import annotations

import torch
from torch import Tensor


def channel_jitter(views: Tensor, brightness: Tensor, contrast: Tensor, brightness_first: Tensor) -> None:
    """Brightness and contrast of each channel on its own, with its own factors, in place.

    Each channel is treated as torchvision treats a 1-channel image: brightness is
    ``clamp(f * x)`` (``adjust_brightness``), contrast ``clamp(f * x + (1 - f) * mean(x))`` with the
    channel's own mean (``adjust_contrast``, whose gray image of one channel is the channel).
    A factor of 1 is the identity. For one channel this is ColorJitter restricted to brightness
    and contrast; for N > 3 channels each channel draws its own factors.

    Args:
        views: In [0, 1]. Shape: (n, C, H, W).
        brightness: Brightness factor per view and channel. Shape: (n, C).
        contrast: Contrast factor per view and channel. Shape: (n, C).
        brightness_first: Views whose brightness comes before their contrast. Shape: (n,), bool.
    """
    if views.shape[0] == 0:
        return
    scale = brightness.view(*brightness.shape, 1, 1)
    blend = contrast.view(*contrast.shape, 1, 1)

    def adjust_brightness(pixels: Tensor) -> Tensor:
        return (pixels * scale).clamp_(0, 1)

    def adjust_contrast(pixels: Tensor) -> Tensor:
        mean = pixels.mean(dim=(2, 3), keepdim=True)
        return (pixels * blend).add_(mean * (1 - blend)).clamp_(0, 1)

    first = brightness_first.view(-1, 1, 1, 1)
    views.copy_(
        torch.where(
            first, adjust_contrast(adjust_brightness(views)), adjust_brightness(adjust_contrast(views))
        )
    )
