"""Fine-tuning's views of a uint8 batch on the training device: random resized crop, flip, normalise.

SimCLR fine-tunes with crops and flips only, no colour distortion (arXiv 2002.05709, appendix
B.5; the official code crops with area fraction in [0.08, 1]). The crops are drawn as for the
SimCLR views (`labelfew.views.params.sample_crops`, inside each image's own extent) and resampled
with the same bicubic weights (`labelfew.views.ops`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from labelfew.views.config import check_image_size, check_min_scale, finetune_min_scale, resolve_mean_std
from labelfew.views.ops import (
    check_images,
    crop_weights,
    full_sizes,
    normalization,
    normalize,
    one_thread_on_cpu,
    resample,
)
from labelfew.views.params import sample_crop_and_flip

FLIP_PROB = 0.5
"""Probability of a horizontal flip."""


class CropFlipViews:
    """One random resized crop (+ flip) of every image of a batch, normalised.

    Args:
        image_size: Output side ``S`` in pixels.
        mean: Normalisation mean; None for ImageNet's.
        std: Normalisation standard deviation; None for ImageNet's.
        min_scale: Smallest crop area fraction; None picks `finetune_min_scale` (0.08 above
            64 px, 0.25 at 64 px or less).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        min_scale: float | None = None,
    ) -> None:
        check_image_size(image_size)
        self.image_size = image_size
        self.min_scale = finetune_min_scale(image_size) if min_scale is None else min_scale
        check_min_scale(self.min_scale)
        self.mean, self.std = resolve_mean_std(mean, std)

    def __call__(self, images: Tensor, sizes: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Shape: (batch, 3, H, W) uint8 with valid sizes (batch, 2) -> (batch, 3, S, S) float32."""
        sizes = full_sizes(images) if sizes is None else sizes.cpu()
        check_images(images, sizes)
        crops, flips = sample_crop_and_flip(images.shape[0], sizes, self.min_scale, FLIP_PROB, generator)
        device = images.device
        with torch.no_grad(), one_thread_on_cpu(device):
            rows, columns = crop_weights(images, crops.float(), flips, self.image_size)
            views = resample(images, torch.arange(images.shape[0]), rows, columns)
            return normalize(views, *normalization(self.mean, self.std, device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, min_scale={self.min_scale})"
