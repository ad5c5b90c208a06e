"""SimCLR views of a whole uint8 batch, made on the training device (GPU or CPU).

The per-image PIL path transforms one image at a time in DataLoader workers and feeds a GPU a
few thousand views/s, while a ResNet-18 at 32 px trains on tens of thousands. Here a whole batch
becomes two views per image with a fixed number of tensor operations on whatever device the
batch is on (so CI tests it on the CPU): `labelfew.views.params.sample_view_parameters` draws
every view's parameters on the host from one seeded generator, and `make_views` applies them
(`labelfew.views.ops`): crop + resize (+ flip) as two batched matrix products, colour jitter,
grayscale, blur, normalisation.

The host also learns how many views fall in each group: views are processed sorted by the
position of hue in their jitter order, grayscale and blur, so hue, grayscale and blur run on
contiguous slices holding only the views that need them; the order is restored at the end. Made
in parts (``chunk``), each op does only what the part needs (no gray image for brightness alone, no
hue for a shift of 0, only the blur taps its widest sigma needs); any split gives the same views up
to float rounding, and the same batch gives the same views bit for bit.

Why not kornia.augmentation (not a dependency): its ``ColorJitter`` draws one order of the four
adjustments per call (``torch.randperm(4)``), not per image as torchvision does, so every view of
a batch would share it; its crop resize is bilinear without anti-aliasing; and measured on the
CPU it was slower than this module (``benchmarks/RESULTS.md``).

Input: a uint8 batch padded to ``(batch_size, C, H, W)`` with each image's valid ``(height,
width)`` at its top left (`labelfew.data.batches.Batch`), C the length of ``config.mean``. Output:
float32 views normalised with ``config.mean`` / ``config.std``, shape (views, C, S, S).

Channels: RGB (C = 3) gets the paper's views. For 1 channel: crop, flip, brightness and contrast
jitter, blur; no hue or saturation (and no grayscale, the identity on gray): the brightness and
contrast factors and their order are the RGB ColorJitter's, drawn the same way, restricted to
those two. For N > 3 channels (and 2): the same geometric views and blur, and brightness and
contrast per channel, one factor per channel per view (`labelfew.views.channels.channel_jitter`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from labelfew.views.bands import Taps
from labelfew.views.channels import channel_jitter
from labelfew.views.config import ViewConfig, check_channels
from labelfew.views.ops import (
    BLEND,
    IDENTITY,
    SCALE,
    blur_radius,
    check_images,
    color_jitter,
    crop_weights,
    full_sizes,
    gaussian_blur,
    grayscale_ranges,
    normalize,
    one_thread_on_cpu,
    resample,
    to_device,
)
from labelfew.views.params import ViewParameters, sample_view_parameters

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
"""Indices of the jitter adjustments, as in torchvision ColorJitter's ``fn_idx``."""
NO_HUE_SHIFT, NO_JITTER = 4, 5
"""Hue groups after the four positions: jitter whose hue shift is 0 (hue skipped), no jitter."""

PairViews = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]
"""(uint8 images (B, C, H, W), valid sizes (B, 2), generator) -> the two views of every image;
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
        """Shape: (batch_size, C, H, W) uint8 -> two of (batch_size, C, image_size, image_size).

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
    images: Tensor,
    parameters: ViewParameters,
    config: ViewConfig,
    sources: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Applies ``parameters`` to uint8 images: crop + resize, flip, jitter, grayscale, blur, normalise.

    Args:
        images: uint8 images on the device to work on, C = ``config.channels``.
            Shape: (batch_size, C, H, W).
        parameters: One row per view, from `sample_view_parameters`, whose crops lie inside
            each source image's valid extent.
        config: The same view parameters the rows were drawn with (size, blur kernel, mean, std).
        sources: Which image of ``images`` each view is made from; None means view ``i`` comes
            from image ``i`` (then ``views == batch_size``). Shape: (views,), int64, on the CPU.
        chunk: Views made together, one part of the processing order at a time; None: all of them
            (one view at a time measured no faster on a shared 2-core CPU: 4.10 against 3.71 ms per
            224 px view, the per-view overhead eating what the cache saves).

    Returns:
        Normalised float32 views in the order of ``parameters``, on ``images.device``.
        Shape: (views, C, image_size, image_size).

    Raises:
        ValueError: ``images`` is not a uint8 (batch, C, H, W) tensor of ``config.channels``
            channels, or the sizes disagree.
    """
    check_images(images)
    check_channels(images.shape[1], config.mean)
    view_count = len(parameters)
    if sources is None:
        if view_count != images.shape[0]:
            raise ValueError(f"{view_count} views need `sources` for a batch of {images.shape[0]} images.")
        sources = torch.arange(view_count)
    plan = _Plan.build(parameters, config, sources.to("cpu"), images.device)
    chunk = view_count if chunk is None else chunk
    size = config.image_size
    with torch.no_grad(), one_thread_on_cpu(images.device):
        crops = plan.host_crops
        rows, columns = crop_weights(images, crops[:, 1:5], crops[:, 5].bool(), size)
        if chunk >= view_count:
            return _sorted_views(images, plan, rows, columns, 0, view_count)[plan.restore]
        views = torch.empty(view_count, images.shape[1], size, size, device=images.device)
        for start in range(0, view_count, chunk):
            end = min(start + chunk, view_count)
            views[plan.permutation[start:end]] = _sorted_views(images, plan, rows, columns, start, end)
        return views


def _sorted_views(images: Tensor, plan: _Plan, rows: Taps, columns: Taps, start: int, end: int) -> Tensor:
    """Views ``[start, end)`` of the plan's processing order. Shape: (end - start, C, S, S)."""
    steps = plan.steps(start, end)
    part = slice(start, end)
    views = resample(
        images, plan.host_crops[part, 0].long(), Taps(rows.first[part], rows.weights[part]),
        Taps(columns.first[part], columns.weights[part]),
    )  # fmt: skip
    jittered = slice(start, start + steps.jitter_rows)
    color_jitter(
        views[: steps.jitter_rows], plan.linear[jittered], plan.hue[jittered], steps.hue_ranges, steps.kinds
    )
    if plan.channel_factors is not None and plan.brightness_first is not None:
        factors = plan.channel_factors[part]
        channel_jitter(views, factors[:, 0], factors[:, 1], plan.brightness_first[part])
    grayscale_ranges(views, steps.gray_ranges)
    gaussian_blur(views, plan.blur_kernels[part], steps.blur_ranges)
    return normalize(views, plan.mean, plan.std)


class _Steps(NamedTuple):
    """What a contiguous part of the processing order needs, as row ranges within that part."""

    jitter_rows: int  # rows [0, jitter_rows) have colour jitter
    kinds: tuple[int, int, int, int]  # per jitter position, the most any row needs (`ops.color_jitter`)
    hue_ranges: tuple[tuple[int, int], ...]  # rows whose hue is at jitter position 0, 1, 2, 3
    gray_ranges: tuple[tuple[int, int], ...]
    blur_ranges: tuple[tuple[int, int, int], ...]  # (start, end, blur radius)


@dataclass(frozen=True)
class _Plan:
    """Per-view parameters sorted into processing order and moved to the device in one copy.

    Views are sorted by (hue group, grayscale, blurred): the hue group is the position of hue in
    the jitter order (0-3), then jitter without a hue shift (4), then no jitter (5). So each
    group's hue, the grayscale and the blur apply to contiguous row ranges, known on the host.
    """

    host_crops: Tensor  # (views, 6) on the CPU: source image, crop top, left, height, width, flip
    linear: Tensor  # (views, 4, 3): per jitter position, weights of (view, its gray, its mean gray)
    hue: Tensor  # (views, 1, 1)
    blur_kernels: Tensor  # (views, kernel_size)
    kinds: Tensor  # (views, 4) on the CPU: `ops.color_jitter`'s kind of each jitter position
    flags: list[tuple[int, bool, bool, int]]  # per view: hue group, grayscale, blurred, blur radius
    permutation: Tensor  # (views,) on the CPU: processing position -> original view
    restore: Tensor  # (views,): views[restore] is in the original order
    mean: Tensor  # (1, C, 1, 1) normalisation mean
    std: Tensor  # (1, C, 1, 1) normalisation standard deviation
    channel_factors: Tensor | None = None  # C != 3: (views, 2, C) brightness, contrast factors
    brightness_first: Tensor | None = None  # C != 3: (views,) bool, brightness before contrast

    @classmethod
    def build(
        cls, parameters: ViewParameters, config: ViewConfig, sources: Tensor, device: torch.device
    ) -> _Plan:
        channel_jitter_parameters = parameters
        if parameters.channel_brightness is not None:  # no RGB jitter or grayscale off RGB
            off = torch.zeros_like(parameters.color_jitter)
            parameters = dataclasses.replace(parameters, color_jitter=off, grayscale=off)
        hue_at = (parameters.jitter_order == HUE).long().argmax(dim=1)
        hue_group = torch.where(parameters.hue != 0, hue_at, NO_HUE_SHIFT)
        hue_group = torch.where(parameters.color_jitter, hue_group, NO_JITTER)
        blurred = parameters.blur
        permutation = torch.argsort(
            hue_group * 4 + parameters.grayscale.long() * 2 + blurred.long(), stable=True
        )
        linear = linear_weights(parameters)
        kernels = blur_kernels(parameters, config.blur_kernel_size)
        flat = torch.cat(
            [sources.double()[:, None], parameters.crop.double(), parameters.flip.double()[:, None],
             linear.flatten(1), parameters.hue.double()[:, None], kernels],
            dim=1,
        )[permutation].float()  # fmt: skip
        radii = torch.where(blurred, torch.tensor(blur_radius(kernels)), 0)
        flags = torch.stack([hue_group, parameters.grayscale.long(), blurred.long(), radii], dim=1)[
            permutation
        ]
        host_crops = flat[:, :6]
        flat = to_device(flat, device)
        constants = to_device(torch.tensor([*config.mean, *config.std]), device)
        view_count, channels = flat.shape[0], config.channels
        return cls(
            host_crops=host_crops,
            linear=flat[:, 6:18].reshape(view_count, 4, 3),
            hue=flat[:, 18].view(view_count, 1, 1),
            blur_kernels=flat[:, 19:],
            kinds=jitter_kinds(linear)[permutation],
            flags=[(group, bool(gray), bool(blur), radius) for group, gray, blur, radius in flags.tolist()],
            permutation=permutation,
            restore=to_device(torch.argsort(permutation), device),
            mean=constants[:channels].view(1, channels, 1, 1),
            std=constants[channels:].view(1, channels, 1, 1),
            **_channel_jitter_plan(channel_jitter_parameters, permutation, device),
        )

    def steps(self, start: int, end: int) -> _Steps:
        """The row ranges of views ``[start, end)`` of the processing order, relative to ``start``."""
        flags = self.flags[start:end]
        groups = [group for group, _, _, _ in flags]
        hue_ranges = tuple(_runs([group == position for group in groups]) for position in range(4))
        blur_runs = _runs([blur for _, _, blur, _ in flags])
        radius = [radius for _, _, _, radius in flags]
        kinds = self.kinds[start:end].amax(dim=0).tolist() if flags else [IDENTITY] * 4
        return _Steps(
            jitter_rows=sum(group < NO_JITTER for group in groups),
            kinds=tuple(kinds),
            hue_ranges=tuple(runs[0] if runs else (0, 0) for runs in hue_ranges),
            gray_ranges=_runs([gray for _, gray, _, _ in flags]),
            blur_ranges=tuple((first, last, max(radius[first:last])) for first, last in blur_runs),
        )


def _channel_jitter_plan(
    parameters: ViewParameters, permutation: Tensor, device: torch.device
) -> dict[str, Tensor]:
    """`_Plan`'s ``channel_factors`` and ``brightness_first`` in processing order; none for RGB.

    A view without jitter gets factors 1 (the identity); brightness comes first where the
    ColorJitter order drawn for the view puts it before contrast.
    """
    if parameters.channel_brightness is None or parameters.channel_contrast is None:
        return {}
    jitter = parameters.color_jitter[:, None]
    factors = torch.stack(
        [torch.where(jitter, parameters.channel_brightness, 1.0),
         torch.where(jitter, parameters.channel_contrast, 1.0)],
        dim=1,
    )  # fmt: skip
    order = parameters.jitter_order
    brightness_first = (order == BRIGHTNESS).long().argmax(dim=1) < (order == CONTRAST).long().argmax(dim=1)
    return {
        "channel_factors": to_device(factors[permutation].float(), device),
        "brightness_first": to_device(brightness_first[permutation], device),
    }


def _runs(flags: list[bool]) -> tuple[tuple[int, int], ...]:
    """The ``[start, end)`` runs of True in ``flags``."""
    runs: list[tuple[int, int]] = []
    for index, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        elif flag:
            runs.append((index, index + 1))
    return tuple(runs)


def jitter_kinds(linear: Tensor) -> Tensor:
    """`ops.color_jitter`'s kind of every view's jitter positions from its weights (`linear_weights`).

    Shape: (views, 4, 3) -> (views, 4), int64: `IDENTITY` for ``(1, 0, 0)``, `SCALE` when the gray
    weights are 0, else `BLEND`.
    """
    blends = (linear[..., 1:] != 0).any(dim=2)
    scales = linear[..., 0] != 1
    return torch.where(blends, BLEND, torch.where(scales, SCALE, IDENTITY))


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
