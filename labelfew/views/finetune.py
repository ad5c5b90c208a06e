"""Fine-tuning's views of a uint8 batch on the training device: random resized crop, flip, normalise;
and FixMatch's weak view: flip and a small translation, at the scale the image is stored at.

Every view takes C-channel images (1, 3 or N; ``mean`` / ``std`` with C entries): crops, flips and
shifts move pixels and never mix channels.

SimCLR fine-tunes with crops and flips only, no colour distortion (arXiv 2002.05709, appendix
B.5; the official code crops with area fraction in [0.08, 1]). The crops are drawn as for the
SimCLR views (`labelfew.views.params.sample_crops`, inside each image's own extent) and resampled
with the same bicubic weights (`labelfew.views.ops`).

FixMatch's weak augmentation (arXiv 2001.07685, section 2.3) is "flip-and-shift": the official
code (google-research/fixmatch ``libml/augment.py``, ``augment_mirror`` and ``augment_shift``)
flips and then takes a random ``S x S`` window of the image reflect-padded by 4 px at 32 px, 12 at
96 (1/8 of the side), at the image's own scale; USB (microsoft/Semi-supervised-learning) uses
``RandomCrop(S, padding=S/8, padding_mode="reflect")`` + flip for CIFAR, and for ImageNet
``Resize(S / 0.875)``, ``RandomCrop(S)`` (no padding) + flip. `ShiftFlipViews` takes the window
of the image at the side the sources store it at (`labelfew.spec.eval_resize_side`): up to 64 px
that is ``S`` (a 32 px image pixel for pixel), reflect-padded by ``S // 8``, as the official CIFAR
code; above it is ``round(S / 0.875)`` and the window moves within the image, as USB's ImageNet
(at most 1/16 of the side from the centre along the shorter side). A stored image's pixels are
copied, never resampled; an image not at that side (one smaller than it) is resized to it first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from labelfew.spec import eval_resize_side
from labelfew.views.config import (
    check_channels,
    check_image_size,
    check_min_scale,
    finetune_min_scale,
    resized_extent,
    resolve_mean_std,
)
from labelfew.views.ops import (
    check_images,
    crop_weights,
    full_sizes,
    gather_windows,
    normalization,
    normalize,
    one_thread_on_cpu,
    reflect,
    resample,
    resized_pixel_weights,
    to_device,
)
from labelfew.views.params import sample_crop_and_flip, sample_shift_and_flip

FLIP_PROB = 0.5
"""Probability of a horizontal flip."""
SHIFT_FRACTION = 0.125
"""FixMatch's reflect padding as a fraction of the side, up to 64 px: 4 px at 32 px (the official code)."""


class CropFlipViews:
    """One random resized crop (+ flip) of every image of a batch, normalised.

    Args:
        image_size: Output side ``S`` in pixels.
        mean: Normalisation mean, one per channel of the images (``ModelSpec.mean``); None for
            ImageNet's (RGB).
        std: Normalisation standard deviation, as many as ``mean``; None for ImageNet's.
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
        """Shape: (batch, C, H, W) uint8 with valid sizes (batch, 2) -> (batch, C, S, S) float32."""
        sizes = full_sizes(images) if sizes is None else sizes.cpu()
        check_images(images, sizes)
        check_channels(images.shape[1], self.mean)
        crops, flips = sample_crop_and_flip(images.shape[0], sizes, self.min_scale, FLIP_PROB, generator)
        device = images.device
        with torch.no_grad(), one_thread_on_cpu(device):
            rows, columns = crop_weights(images, crops.float(), flips, self.image_size)
            views = resample(images, torch.arange(images.shape[0]), rows, columns)
            return normalize(views, *normalization(self.mean, self.std, device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, min_scale={self.min_scale})"


class ShiftFlipViews:
    """FixMatch's weak view of every image of a batch, normalised: a flip and a random ``S x S``
    window of the image at its stored side (torchvision's ``Resize(side)`` where it is not there,
    ``RandomCrop(S, padding, padding_mode="reflect")`` and ``RandomHorizontalFlip``), with
    ``padding = S // 8`` up to 64 px and 0 above (the module's docstring says why).

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
        self.side = eval_resize_side(image_size)
        self.padding = int(image_size * SHIFT_FRACTION) if self.side == image_size else 0
        self.mean, self.std = resolve_mean_std(mean, std)

    def __call__(self, images: Tensor, sizes: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Shape: (batch, C, H, W) uint8 with valid sizes (batch, 2) -> (batch, C, S, S) float32."""
        sizes = full_sizes(images) if sizes is None else sizes.cpu()
        check_images(images, sizes)
        check_channels(images.shape[1], self.mean)
        count, size, device = images.shape[0], self.image_size, images.device
        extents = torch.tensor([resized_extent(h, w, self.side) for h, w in sizes.tolist()]).view(-1, 2)
        top, left, flip = sample_shift_and_flip(count, extents, size, self.padding, FLIP_PROB, generator)
        steps = torch.arange(size)
        rows = reflect(top.view(-1, 1) - self.padding + steps, extents[:, 0])
        columns = left.view(-1, 1) - self.padding + torch.where(flip.view(-1, 1), size - 1 - steps, steps)
        columns = reflect(columns, extents[:, 1])
        with torch.no_grad(), one_thread_on_cpu(device):
            stored = (extents == sizes).all(dim=1)
            if bool(stored.all()):
                views = gather_windows(images, rows, columns)
            else:
                views = torch.empty(count, images.shape[1], size, size, device=device)
                kept, resized = stored.nonzero().flatten(), (~stored).nonzero().flatten()
                on_device = to_device(kept, device)
                views[on_device] = gather_windows(images[on_device], rows[kept], columns[kept])
                views[to_device(resized, device)] = _resized_windows(
                    images, resized, sizes, extents, rows, columns
                )
            return normalize(views, *normalization(self.mean, self.std, device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, padding={self.padding})"


def _resized_windows(images: Tensor, where: Tensor, sizes: Tensor, extents: Tensor, rows: Tensor,
                     columns: Tensor) -> Tensor:  # fmt: skip
    """The windows of the images in ``where`` (not stored at the side), each resized to its extent
    first: Pillow's bicubic as the other views (`labelfew.views.ops`), only the picked pixels computed.

    Shape: returns (images in ``where``, C, S, S), float32 in [0, 1].
    """
    height, width = images.shape[-2:]
    row_weights, column_weights = [], []
    for view in where.tolist():
        source_height, source_width = sizes[view].tolist()
        resized_height, resized_width = extents[view].tolist()
        row_weights.append(resized_pixel_weights(source_height, resized_height, height, rows[view]))
        column_weights.append(resized_pixel_weights(source_width, resized_width, width, columns[view]))
    device = images.device
    row_matrix = to_device(torch.stack(row_weights), device).unsqueeze(1)
    column_matrix = to_device(torch.stack(column_weights), device).transpose(1, 2).unsqueeze(1)
    pixels = images[to_device(where, device)].float()
    return (row_matrix @ pixels @ column_matrix).mul_(1 / 255).clamp_(0, 1)
