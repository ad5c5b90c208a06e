"""SimCLR views of a whole uint8 batch, made on the training device (GPU or CPU).

The per-image PIL path transforms one image at a time in DataLoader workers and feeds a GPU a
few thousand views/s, while a ResNet-18 at 32 px trains on tens of thousands. Here a whole batch
becomes two views per image with a fixed number of tensor operations on whatever device the
batch is on (so CI tests it on the CPU): `labelfew.views.params.sample_view_parameters` draws
every view's parameters on the host from one seeded generator, and `make_views` applies them
(`labelfew.views.ops`): crop + resize (+ flip) as two batched matrix products, colour jitter,
grayscale, blur, normalisation.

The host also learns how many views fall in each group: views are processed sorted by the
position of hue in their jitter order and by whether they are blurred, so hue and blur run on
contiguous slices holding only the views that need them; the order is restored at the end.

Why not kornia.augmentation (not a dependency): its ``ColorJitter`` draws one order of the four
adjustments per call (``torch.randperm(4)``), not per image as torchvision does, so every view of
a batch would share it; its crop resize is bilinear without anti-aliasing; and measured on the
CPU it was slower than this module (``benchmarks/RESULTS.md``).

Input: a uint8 batch padded to ``(batch_size, 3, H, W)`` with each image's valid ``(height,
width)`` at its top left (`labelfew.data.batches.Batch`). Output: float32 views normalised with
``config.mean`` / ``config.std``, shape (views, 3, S, S).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from labelfew.views.config import ViewConfig
from labelfew.views.ops import (
    check_images,
    color_jitter,
    crop_weights,
    full_sizes,
    gaussian_blur,
    grayscale,
    normalize,
    one_thread_on_cpu,
    resample,
    to_device,
)
from labelfew.views.params import ViewParameters, sample_view_parameters

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
"""Indices of the jitter adjustments, as in torchvision ColorJitter's ``fn_idx``."""
NO_HUE = 4
"""Hue 'position' of a view without colour jitter (sorts after the four real positions)."""

PairViews = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]
"""(uint8 images (B, 3, H, W), valid sizes (B, 2), generator) -> the two views of every image;
`SimCLRViews` is one, the multi-process parity test passes fixed views."""


class SimCLRViews:
    """Two independent SimCLR views of every image of a uint8 batch, made on the batch's device.

    Returns ``(first, second)`` where ``first[i]`` and ``second[i]`` are views of image ``i``, the
    positive pair of NT-Xent. The per-image reference is ``tests/reference/pil_views.TwoViews``.

    Args:
        config: View parameters.
        generator: CPU generator the parameters are drawn from when a call passes none; seed it
            for reproducible views.
    """

    def __init__(self, config: ViewConfig, generator: torch.Generator | None = None) -> None:
        self.config = config
        self.generator = generator

    def __call__(
        self, images: Tensor, sizes: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Shape: (batch_size, 3, H, W) uint8 -> two of (batch_size, 3, image_size, image_size).

        Args:
            images: The padded batch.
            sizes: Each image's valid ``(height, width)``; None means every image fills the batch.
                Shape: (batch_size, 2).
            generator: Drawn from instead of the one given at construction (the training step
                passes `labelfew.data.batches.Batch.generator`, seeded per step).
        """
        sizes = full_sizes(images) if sizes is None else sizes.cpu()
        check_images(images, sizes)
        batch_size = images.shape[0]
        source = generator if generator is not None else self.generator
        sources = torch.arange(batch_size).repeat(2)
        parameters = sample_view_parameters(2 * batch_size, sizes[sources], self.config, source)
        views = make_views(images, parameters, self.config, sources=sources)
        return views[:batch_size], views[batch_size:]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def make_views(
    images: Tensor, parameters: ViewParameters, config: ViewConfig, sources: Tensor | None = None
) -> Tensor:
    """Applies ``parameters`` to uint8 images: crop + resize, flip, jitter, grayscale, blur, normalise.

    Args:
        images: uint8 RGB images on the device to work on. Shape: (batch_size, 3, H, W).
        parameters: One row per view, from `sample_view_parameters`, whose crops lie inside
            each source image's valid extent.
        config: The same view parameters the rows were drawn with (size, blur kernel, mean, std).
        sources: Which image of ``images`` each view is made from; None means view ``i`` comes
            from image ``i`` (then ``views == batch_size``). Shape: (views,), int64, on the CPU.

    Returns:
        Normalised float32 views in the order of ``parameters``, on ``images.device``.
        Shape: (views, 3, image_size, image_size).

    Raises:
        ValueError: ``images`` is not a uint8 (batch, 3, H, W) tensor, or the sizes disagree.
    """
    check_images(images)
    view_count = len(parameters)
    if sources is None:
        if view_count != images.shape[0]:
            raise ValueError(f"{view_count} views need `sources` for a batch of {images.shape[0]} images.")
        sources = torch.arange(view_count)
    plan = _Plan.build(parameters, config, sources.to("cpu"), images.device)
    size = config.image_size
    with torch.no_grad(), one_thread_on_cpu(images.device):
        crops = plan.host_crops
        rows, columns = crop_weights(images, crops[:, 1:5], crops[:, 5].bool(), size)
        views = resample(images, crops[:, 0].long(), rows, columns)
        jittered = plan.jitter_rows
        color_jitter(views[:jittered], plan.linear[:jittered], plan.hue[:jittered], plan.hue_ranges)
        gray = grayscale(views).expand_as(views)
        views = torch.where(plan.grayscale, gray, views)
        gaussian_blur(views, plan.blur_kernels, plan.blur_ranges)
        views = normalize(views, plan.mean, plan.std)
        return views[plan.restore]  # advanced indexing: index_select is far slower on CPU


@dataclass(frozen=True)
class _Plan:
    """Per-view parameters sorted into processing order and moved to the device in one copy.

    Views are sorted by (position of hue in the jitter order, blurred), so the hue of jitter
    position ``k`` and the blur apply to contiguous row ranges, known on the host.
    """

    host_crops: Tensor  # (views, 6) on the CPU: source image, crop top, left, height, width, flip
    linear: Tensor  # (views, 4, 3): per jitter position, weights of (view, its gray, its mean gray)
    hue: Tensor  # (views, 1, 1)
    grayscale: Tensor  # (views, 1, 1, 1) bool
    blur_kernels: Tensor  # (views, kernel_size)
    jitter_rows: int  # views [0, jitter_rows) have colour jitter
    hue_ranges: tuple[tuple[int, int], ...]  # rows whose hue is at jitter position 0, 1, 2, 3
    blur_ranges: tuple[tuple[int, int], ...]  # row ranges of blurred views
    restore: Tensor  # (views,): views[restore] is in the original order
    mean: Tensor  # (1, 3, 1, 1) normalisation mean
    std: Tensor  # (1, 3, 1, 1) normalisation standard deviation

    @classmethod
    def build(
        cls, parameters: ViewParameters, config: ViewConfig, sources: Tensor, device: torch.device
    ) -> _Plan:
        order = parameters.jitter_order
        hue_position = torch.where(parameters.color_jitter, (order == HUE).long().argmax(dim=1), NO_HUE)
        group = hue_position * 2 + parameters.blur.long()
        permutation = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=2 * (NO_HUE + 1)).tolist()
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
        hue_ranges = tuple((starts[2 * k], starts[2 * k + 2]) for k in range(NO_HUE))
        blur_ranges = tuple(
            (starts[2 * k + 1], starts[2 * k + 2]) for k in range(NO_HUE + 1) if counts[2 * k + 1]
        )
        flat = torch.cat(
            [
                sources.double()[:, None],
                parameters.crop.double(),
                parameters.flip.double()[:, None],
                linear_weights(parameters).flatten(1),
                parameters.hue.double()[:, None],
                parameters.grayscale.double()[:, None],
                blur_kernels(parameters, config.blur_kernel_size),
            ],
            dim=1,
        )[permutation].float()
        host_crops = flat[:, :6]
        flat = to_device(flat, device)
        constants = to_device(torch.tensor([*config.mean, *config.std]), device)
        view_count = flat.shape[0]
        return cls(
            host_crops=host_crops,
            linear=flat[:, 6:18].reshape(view_count, 4, 3),
            hue=flat[:, 18].view(view_count, 1, 1),
            grayscale=flat[:, 19].bool().view(view_count, 1, 1, 1),
            blur_kernels=flat[:, 20:],
            jitter_rows=starts[2 * NO_HUE],
            hue_ranges=hue_ranges,
            blur_ranges=blur_ranges,
            restore=to_device(torch.argsort(permutation), device),
            mean=constants[:3].view(1, 3, 1, 1),
            std=constants[3:].view(1, 3, 1, 1),
        )


def linear_weights(parameters: ViewParameters) -> Tensor:
    """Brightness, contrast and saturation as ``a * view + b * gray(view) + c * mean(gray(view))``.

    torchvision: brightness is ``f * x``; contrast blends with the mean of the grayscale image,
    ``f * x + (1 - f) * mean``; saturation with the grayscale image, ``f * x + (1 - f) * gray``.
    Hue at a position, and every position of a view without jitter, are the identity (1, 0, 0).

    Returns:
        Shape: (views, 4 positions, 3 weights), float64.
    """
    view_count = len(parameters)
    weights = torch.zeros(view_count, 4, 3, dtype=torch.float64)
    weights[..., 0] = 1.0
    order = parameters.jitter_order
    jitter = parameters.color_jitter[:, None]
    for operation, factor, other in (
        (BRIGHTNESS, parameters.brightness, None),
        (CONTRAST, parameters.contrast, 2),
        (SATURATION, parameters.saturation, 1),
    ):
        here = (order == operation) & jitter
        factor = factor.double()[:, None].expand(-1, 4)
        weights[..., 0] = torch.where(here, factor, weights[..., 0])
        if other is not None:
            weights[..., other] = torch.where(here, 1 - factor, weights[..., other])
    return weights


def blur_kernels(parameters: ViewParameters, kernel_size: int) -> Tensor:
    """One normalised 1-D Gaussian per view (torchvision's ``_get_gaussian_kernel1d``).

    Shape: (views, kernel_size), float64.
    """
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    sigma = parameters.blur_sigma.double()[:, None]
    return torch.softmax(-0.5 * (offsets / sigma) ** 2, dim=1)
