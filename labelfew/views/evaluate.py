"""The deterministic evaluation view of a uint8 batch: resize the shorter side, centre crop, normalise.

Above 64 px the shorter side is resized to ``round(S / 0.875)`` and the central ``S x S`` kept
(the standard ImageNet protocol, SimCLR's ``CROP_PROPORTION``); at 64 px or less it is resized
to ``S``, so that a small square image is used whole. Sizes and crop anchors follow
torchvision's ``Resize(int)`` and ``CenterCrop``, the resampling is Pillow's bicubic
(`labelfew.views.ops`), and only the rows and columns the crop keeps are computed. An image that
the source already stored at the evaluation side (`labelfew.data.images.load_resized`) is only
cropped: its view equals torchvision's ``eval`` transform of the photo. Any channel count C works
(``mean`` / ``std`` with C entries); each channel is resampled on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from labelfew.spec import eval_resize_side
from labelfew.views.config import check_channels, check_image_size, resized_extent, resolve_mean_std
from labelfew.views.ops import (
    bicubic_weights,
    check_images,
    full_sizes,
    normalization,
    normalize,
    one_thread_on_cpu,
    resample,
    to_device,
)


class EvalView:
    """The evaluation view of every image of a batch.

    Args:
        image_size: Output side ``S`` in pixels.
        mean: Normalisation mean, one per channel of the images (``ModelSpec.mean``); None for
            ImageNet's (RGB).
        std: Normalisation standard deviation, as many as ``mean``; None for ImageNet's.
    """

    def __init__(
        self, image_size: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> None:
        check_image_size(image_size)
        self.image_size = image_size
        self.mean, self.std = resolve_mean_std(mean, std)

    def __call__(self, images: Tensor, sizes: Tensor | None = None) -> Tensor:
        """Shape: (batch, C, H, W) uint8 with valid sizes (batch, 2) -> (batch, C, S, S) float32.

        Images already at the evaluation side (what both image sources store) are only cropped;
        the others are resampled, in one batched product.
        """
        sizes = full_sizes(images) if sizes is None else sizes.cpu()
        check_images(images, sizes)
        check_channels(images.shape[1], self.mean)
        device, size = images.device, self.image_size
        if images.shape[0] == 0:
            return torch.zeros(0, images.shape[1], size, size, device=device)
        plan = torch.tensor(
            [_resize_and_crop(height, width, size) for height, width in sizes.tolist()], dtype=torch.int64
        ).view(-1, 6)
        cropped = (plan[:, 0] == plan[:, 2]) & (plan[:, 1] == plan[:, 3])
        with torch.no_grad(), one_thread_on_cpu(device):
            if bool(cropped.all()):
                views = _centre_crops(images, plan, size)
            else:
                views = torch.empty(images.shape[0], images.shape[1], size, size, device=device)
                if bool(cropped.any()):
                    views[to_device(cropped, device)] = _centre_crops(images, plan, size, cropped)
                resized = ~cropped
                views[to_device(resized, device)] = _resized_crops(images, plan, size, resized)
            return normalize(views, *normalization(self.mean, self.std, device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


def _centre_crops(images: Tensor, plan: Tensor, size: int, where: Tensor | None = None) -> Tensor:
    """The ``size x size`` windows at each plan's crop anchor, in [0, 1] (as torchvision's ``ToDtype``).

    Shape: returns (images in ``where``, C, size, size), float32.
    """
    rows = torch.arange(images.shape[0]) if where is None else where.nonzero().flatten()
    windows = [
        images[row, :, top : top + size, left : left + size]
        for row, top, left in zip(rows.tolist(), plan[rows, 4].tolist(), plan[rows, 5].tolist(), strict=True)
    ]
    return torch.stack(windows).float().div_(255)


def _resized_crops(images: Tensor, plan: Tensor, size: int, where: Tensor) -> Tensor:
    """The centre crops of the images in ``where``, resized to the evaluation side on the way (bicubic).

    Shape: returns (images in ``where``, C, size, size), float32 in [0, 1].
    """
    rows = where.nonzero().flatten()
    heights, widths, resized_heights, resized_widths, tops, lefts = plan[rows].float().unbind(dim=1)
    zeros = torch.zeros_like(heights)
    height, width = images.shape[-2:]
    device = images.device
    row_taps = bicubic_weights(
        zeros, heights, size, height, device, resized_length=resized_heights, offset=tops
    )
    column_taps = bicubic_weights(
        zeros, widths, size, width, device, resized_length=resized_widths, offset=lefts
    )
    return resample(images, rows, row_taps, column_taps)


def _resize_and_crop(height: int, width: int, size: int) -> tuple[int, int, int, int, int, int]:
    """(height, width, resized height, resized width, crop top, crop left) of one image."""
    resized_height, resized_width = resized_extent(height, width, eval_resize_side(size))
    top = round((resized_height - size) / 2.0)
    left = round((resized_width - size) / 2.0)
    return height, width, resized_height, resized_width, top, left
