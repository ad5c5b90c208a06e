"""SimCLR views made in batches on the training device, with the distribution of `labelfew.views.pil`.

The CPU path (`augment.simclr_view`) transforms one PIL image at a time in DataLoader workers;
that feeds a GPU a few thousand views/s, while a ResNet-18 at 32 px trains on tens of thousands.
Here a whole uint8 batch becomes two views per image with a fixed number of tensor operations on
whatever device the batch is on (so CI tests it on the CPU):

1. `sample_view_parameters` draws every view's random parameters on the host, vectorised, from
   the distributions of the CPU path's torchvision transforms: the crop box as
   ``RandomResizedCrop`` (ten attempts, then its centre-crop fallback), the flip / jitter /
   grayscale / blur coins, ``ColorJitter``'s factors and its random order of the four adjustments
   (drawn per view, as torchvision draws it per image), and the blur sigma.
2. `make_views` applies them: crop + resize (+ flip) as two batched matrix products with Pillow's
   anti-aliased bicubic weights, the CPU path's resampling; colour jitter as per-view tensor
   arithmetic in torchvision's formulas (hue through RGB -> HSV -> RGB); grayscale; Gaussian
   blur as a grouped separable convolution with one kernel per view (torchvision's kernel and
   reflect padding); normalisation.

Drawing the parameters on the host costs microseconds (a few numbers per view), needs no device
synchronisation, gives the same views for a seed on every device, and tells the host how many
views fall in each group: views are processed sorted by the position of hue in their jitter
order and by whether they are blurred, so hue and blur run on contiguous slices holding only the
views that need them; the order is restored at the end.

Resizing (``resize=``): ``"bicubic"`` (default) reproduces torchvision's float resize of the CPU
path to 1e-5, so crops look the same on both paths. ``"roi_align"`` (``torchvision.ops``) averages
an adaptive grid of bilinear samples per output pixel: no per-view gather of the source image and
one kernel, but bilinear, so upsampled crops are softer than the CPU path's. ``grid_sample`` was
measured and dropped: it does not anti-alias when a crop is shrunk (mean absolute error against
the CPU path's resize 0.13 at 128 -> 48 px on noise images, against 0.001 for ``"bicubic"``) and
was no faster than ``roi_align`` at 224 px. Measurements are in ``benchmarks/RESULTS.md``.

Why not kornia.augmentation (not a dependency): its ``ColorJitter`` draws one order of the four
adjustments per call (``torch.randperm(4)``), not per image as torchvision does, so every view of
a batch would share it; its crop resize is bilinear without anti-aliasing; and measured on the
CPU it was slower than this module (``benchmarks/RESULTS.md``).

Remaining pixel differences from the CPU path come from its uint8 PIL arithmetic: Pillow's
``Image.blend`` truncates (brightness, contrast and saturation each lose 0.2-0.4/255 on average, so
PIL views are slightly darker), and PIL rounds after every step. Parameters, order of the
operations and formulas are the same.

Input: a uint8 batch of equal-size images, shape (batch_size, 3, H, W), on any device (what
`labelfew.data.store` stores). Output: float32 views normalised with ``config.mean`` /
``config.std``, shape (views, 3, S, S).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as functional
from torch import Tensor
from torchvision.ops import roi_align

from labelfew.views.pil import CROP_RATIO, ViewConfig

ResizeMethod = Literal["bicubic", "roi_align"]

CROP_ATTEMPTS = 10
"""Tries of torchvision's RandomResizedCrop before it falls back to a centre crop."""
GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)
"""torchvision's (ITU-R 601-2) luma weights, used by contrast, saturation and grayscale."""
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
"""Indices of the jitter adjustments, as in torchvision ColorJitter's ``fn_idx``."""
BICUBIC_A = -0.5
"""Pillow's bicubic kernel parameter (torch's non-anti-aliased bicubic uses -0.75)."""
NO_HUE = 4
"""Hue 'position' of a view without colour jitter (sorts after the four real positions)."""


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

    def __len__(self) -> int:
        return int(self.flip.shape[0])


def sample_view_parameters(
    view_count: int,
    image_size: tuple[int, int],
    config: ViewConfig,
    generator: torch.Generator | None = None,
) -> ViewParameters:
    """Draws the random parameters of ``view_count`` views of ``height x width`` images.

    Every view is independent; each parameter has the distribution the CPU path draws it from
    (see the module docstring).

    Args:
        view_count: Number of views.
        image_size: ``(height, width)`` of the input images, in pixels.
        config: View parameters (crop scale, colour strength, probabilities, blur).
        generator: A CPU generator for reproducible draws; None uses torch's global one.

    Returns:
        Parameters on the CPU, one row per view.
    """
    height, width = image_size
    draw = _Draw(view_count, generator)
    strength = config.color_strength
    factor_low, factor_high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    return ViewParameters(
        crop=_sample_crops(draw, height, width, config.min_scale),
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


class _Draw:
    """Uniform float64 draws of one value per view (or several) from one generator."""

    def __init__(self, view_count: int, generator: torch.Generator | None) -> None:
        self.view_count = view_count
        self.generator = generator

    def uniform(self, low: float = 0.0, high: float = 1.0, columns: int | None = None) -> Tensor:
        shape = (self.view_count,) if columns is None else (self.view_count, columns)
        values = torch.empty(shape, dtype=torch.float64)
        return values.uniform_(low, high, generator=self.generator)


def _sample_crops(draw: _Draw, height: int, width: int, min_scale: float) -> Tensor:
    """torchvision's RandomResizedCrop.make_params for every view at once.

    Each view tries ``CROP_ATTEMPTS`` (area fraction, log aspect ratio) pairs and keeps the first
    whose rounded box fits; a view where none fits gets torchvision's centre-crop fallback.
    """
    area = height * width
    target_area = area * draw.uniform(min_scale, 1.0, columns=CROP_ATTEMPTS)
    log_ratio = draw.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), columns=CROP_ATTEMPTS)
    aspect_ratio = torch.exp(log_ratio)
    widths = torch.round(torch.sqrt(target_area * aspect_ratio))
    heights = torch.round(torch.sqrt(target_area / aspect_ratio))
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first_fit = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    crop_width = widths.gather(1, first_fit).squeeze(1)
    crop_height = heights.gather(1, first_fit).squeeze(1)
    top = torch.floor(draw.uniform() * (height - crop_height + 1)).clamp(max=height - crop_height)
    left = torch.floor(draw.uniform() * (width - crop_width + 1)).clamp(max=width - crop_width)
    fallback_top, fallback_left, fallback_height, fallback_width = _fallback_crop(height, width)
    found = fits.any(dim=1)
    crop = torch.stack(
        [
            torch.where(found, top, fallback_top),
            torch.where(found, left, fallback_left),
            torch.where(found, crop_height, fallback_height),
            torch.where(found, crop_width, fallback_width),
        ],
        dim=1,
    )
    return crop.long()


def _fallback_crop(height: int, width: int) -> tuple[float, float, float, float]:
    """torchvision's centre crop when ten attempts failed: the largest box within the ratio range."""
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        crop_width, crop_height = width, round(width / min(CROP_RATIO))
    elif in_ratio > max(CROP_RATIO):
        crop_height, crop_width = height, round(height * max(CROP_RATIO))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def make_views(
    images: Tensor,
    parameters: ViewParameters,
    config: ViewConfig,
    sources: Tensor | None = None,
    resize: ResizeMethod = "bicubic",
) -> Tensor:
    """Applies ``parameters`` to uint8 images: crop + resize, flip, jitter, grayscale, blur, normalise.

    Args:
        images: uint8 RGB images of equal size on the device to work on.
            Shape: (batch_size, 3, H, W).
        parameters: One row per view, from `sample_view_parameters` for ``(H, W)``.
        config: The same view parameters the rows were drawn with (size, blur kernel, mean, std).
        sources: Which image of ``images`` each view is made from; None means view ``i`` comes
            from image ``i`` (then ``views == batch_size``). Shape: (views,), int64, on the CPU.
        resize: ``"bicubic"`` (default: the CPU path's resampling) or ``"roi_align"``; see the
            module docstring.

    Returns:
        Normalised float32 views in the order of ``parameters``, on ``images.device``.
        Shape: (views, 3, image_size, image_size).

    Raises:
        ValueError: ``images`` is not a uint8 (batch, 3, H, W) tensor, or the sizes disagree.
    """
    _check_images(images)
    view_count = len(parameters)
    if sources is None:
        if view_count != images.shape[0]:
            raise ValueError(f"{view_count} views need `sources` for a batch of {images.shape[0]} images.")
        sources = torch.arange(view_count)
    plan = _Plan.build(parameters, config, sources.to("cpu"), images.device)
    with torch.no_grad(), _one_thread_on_cpu(images.device):
        views = _crop_and_resize(images, plan, config.image_size, resize)
        _color_jitter(views, plan)
        gray = _grayscale(views).expand_as(views)
        views = torch.where(plan.grayscale, gray, views)
        _gaussian_blur(views, plan, config.blur_kernel_size)
        views = views.sub_(plan.mean).div_(plan.std)
        return views[plan.restore]  # advanced indexing: index_select is far slower on CPU


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Runs the CPU ops of a batch with one intra-op thread.

    The views take ~100 short tensor operations per batch. With two OpenMP threads on a shared
    2-core machine, one descheduled thread stalls every operation: 32 px views measured 315
    views/s with two threads under load against 7,100 with one (15,900 with two when idle).
    One thread loses at most that factor of ~1.4 and never the factor of 20.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchedTwoViews:
    """Two independent SimCLR views of every image of a uint8 batch, made on the batch's device.

    The batched counterpart of `labelfew.views.pil.TwoViews`: returns ``(first, second)`` where
    ``first[i]`` and ``second[i]`` are views of image ``i``, the positive pair of NT-Xent.

    Args:
        config: View parameters; the same `ViewConfig` the CPU path takes.
        generator: CPU generator the parameters are drawn from; seed it for reproducible views
            (and seed it differently on every process of a multi-GPU run).
        resize: ``"bicubic"`` (default) or ``"roi_align"``; see the module docstring.
    """

    def __init__(
        self,
        config: ViewConfig,
        generator: torch.Generator | None = None,
        resize: ResizeMethod = "bicubic",
    ) -> None:
        self.config = config
        self.generator = generator
        self.resize: ResizeMethod = resize

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Shape: (batch_size, 3, H, W) uint8 -> two of (batch_size, 3, image_size, image_size).

        ``generator``, when given, is drawn from instead of the one passed at construction
        (`labelfew.data.store.MemoryBatches` passes one seeded per step).
        """
        _check_images(images)
        batch_size, _, height, width = images.shape
        source = generator if generator is not None else self.generator
        parameters = sample_view_parameters(2 * batch_size, (height, width), self.config, source)
        sources = torch.arange(batch_size).repeat(2)
        views = make_views(images, parameters, self.config, sources=sources, resize=self.resize)
        return views[:batch_size], views[batch_size:]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, resize={self.resize!r})"


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images of shape (batch_size, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )


@dataclass(frozen=True)
class _Plan:
    """Per-view parameters sorted into processing order and moved to the device in one copy.

    Views are sorted by (position of hue in the jitter order, blurred), so the hue of jitter
    position ``k`` and the blur apply to contiguous row ranges, known on the host.
    """

    boxes: Tensor  # (views, 5): source index, x1, y1, x2, y2 (roi_align's layout)
    flip: Tensor  # (views, 1, 1, 1) bool
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
        top, left, height, width = parameters.crop.double().unbind(dim=1)
        boxes = torch.stack([sources.double(), left, top, left + width, top + height], dim=1)
        flat = torch.cat(
            [
                boxes,
                parameters.flip.double()[:, None],
                _linear_weights(parameters).flatten(1),
                parameters.hue.double()[:, None],
                parameters.grayscale.double()[:, None],
                _blur_kernels(parameters, config.blur_kernel_size),
            ],
            dim=1,
        )[permutation].float()
        flat = _to_device(flat, device)
        constants = _to_device(torch.tensor([*config.mean, *config.std]), device)
        view_count = flat.shape[0]
        return cls(
            boxes=flat[:, 0:5],
            flip=flat[:, 5].bool().view(view_count, 1, 1, 1),
            linear=flat[:, 6:18].reshape(view_count, 4, 3),
            hue=flat[:, 18].view(view_count, 1, 1),
            grayscale=flat[:, 19].bool().view(view_count, 1, 1, 1),
            blur_kernels=flat[:, 20:],
            jitter_rows=starts[2 * NO_HUE],
            hue_ranges=hue_ranges,
            blur_ranges=blur_ranges,
            restore=_to_device(torch.argsort(permutation), device),
            mean=constants[:3].view(1, 3, 1, 1),
            std=constants[3:].view(1, 3, 1, 1),
        )


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copies a host tensor to ``device`` without making the host wait for the device's queue."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _linear_weights(parameters: ViewParameters) -> Tensor:
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


def _blur_kernels(parameters: ViewParameters, kernel_size: int) -> Tensor:
    """One normalised 1-D Gaussian per view (torchvision's ``_get_gaussian_kernel1d``).

    Shape: (views, kernel_size), float64.
    """
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    sigma = parameters.blur_sigma.double()[:, None]
    return torch.softmax(-0.5 * (offsets / sigma) ** 2, dim=1)


def _crop_and_resize(images: Tensor, plan: _Plan, size: int, resize: ResizeMethod) -> Tensor:
    """Every view's crop box resized to ``size x size`` and flipped where drawn, in [0, 1].

    Shape: (views, 3, size, size).
    """
    if resize == "bicubic":
        return _bicubic_crops(images, plan.boxes, plan.flip.view(-1), size)
    if resize == "roi_align":
        views = roi_align(
            images.float(), plan.boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
        return torch.where(plan.flip, views.flip(-1), views).mul_(1 / 255)
    raise ValueError(f"resize {resize!r}: use 'bicubic' or 'roi_align'")


def _bicubic_crops(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Pillow's anti-aliased bicubic resize of every crop, as two batched matrix products.

    ``view = rows @ image @ columns.T`` per channel, with the resampling weights of every output
    row / column over the input rows / columns (`_bicubic_weights`); a flip reverses the rows of
    ``columns``, so it costs nothing.
    """
    sources, left, top, right, bottom = boxes.unbind(dim=1)
    rows = _bicubic_weights(top, bottom - top, size, images.shape[-2], mirror=None)
    columns = _bicubic_weights(left, right - left, size, images.shape[-1], mirror=flip)
    pixels = images[sources.long()].float()
    views = rows.unsqueeze(1) @ pixels @ columns.transpose(1, 2).unsqueeze(1)
    return views.mul_(1 / 255).clamp_(0, 1)


def _bicubic_weights(
    start: Tensor, length: Tensor, size: int, input_size: int, mirror: Tensor | None
) -> Tensor:
    """Resampling weights of Pillow's bicubic filter (``a = -0.5``) from a crop to ``size`` pixels.

    As Pillow's ``precompute_coeffs`` (which torchvision's anti-aliased tensor resize copies):
    output pixel ``i`` is centred at ``start + (i + 0.5) * scale`` with ``scale = length / size``;
    when shrinking, the filter is stretched by ``scale`` (anti-aliasing); input pixels outside the
    crop get no weight (the CPU path crops before it resizes), and each row is normalised.

    Args:
        start: First input pixel of each crop. Shape: (views,).
        length: Crop length in input pixels. Shape: (views,).
        size: Output length.
        input_size: Input length.
        mirror: Views whose output is reversed (a horizontal flip), or None. Shape: (views,).

    Returns:
        Shape: (views, size, input_size).
    """
    positions = torch.arange(size, dtype=start.dtype, device=start.device) + 0.5
    positions = positions.expand(start.shape[0], size)
    if mirror is not None:
        positions = torch.where(mirror.view(-1, 1), size - positions, positions)
    scale = (length / size).view(-1, 1)
    centres = start.view(-1, 1) + positions * scale
    inputs = torch.arange(input_size, dtype=start.dtype, device=start.device) + 0.5
    distance = (inputs.view(1, 1, -1) - centres.unsqueeze(2)) / scale.clamp(min=1).unsqueeze(2)
    inside = (inputs.view(1, -1) > start.view(-1, 1)) & (inputs.view(1, -1) < (start + length).view(-1, 1))
    weights = _bicubic_filter(distance).mul_(inside.unsqueeze(1))
    return weights.div_(weights.sum(dim=2, keepdim=True))


def _bicubic_filter(distance: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with ``a = -0.5`` (Pillow's ``bicubic_filter``), support 2."""
    x = distance.abs()
    a = BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _grayscale(views: Tensor) -> Tensor:
    """Luma with torchvision's weights and arithmetic. Shape: (n, 3, H, W) -> (n, 1, H, W)."""
    red, green, blue = views.unbind(dim=1)
    gray = (
        red.mul(GRAYSCALE_WEIGHTS[0])
        .add_(green, alpha=GRAYSCALE_WEIGHTS[1])
        .add_(blue, alpha=GRAYSCALE_WEIGHTS[2])
    )
    return gray.unsqueeze(1)


def _color_jitter(views: Tensor, plan: _Plan) -> None:
    """torchvision ColorJitter with per-view factors and order, in place on the jittered rows."""
    jittered = views[: plan.jitter_rows]
    if jittered.shape[0] == 0:
        return
    linear = plan.linear[: plan.jitter_rows]
    for position in range(4):
        scale, gray_weight, mean_weight = linear[:, position].view(-1, 3, 1, 1, 1).unbind(dim=1)
        gray = _grayscale(jittered)
        mean_gray = gray.mean(dim=(2, 3), keepdim=True)
        offset = gray.mul_(gray_weight).add_(mean_gray.mul_(mean_weight))
        jittered.mul_(scale).add_(offset).clamp_(0, 1)
        start, end = plan.hue_ranges[position]
        if end > start:
            jittered[start:end] = _adjust_hue(jittered[start:end], plan.hue[start:end])


def _adjust_hue(views: Tensor, shift: Tensor) -> Tensor:
    """Rotates the hue by ``shift`` turns per view through HSV, as torchvision's ``adjust_hue``.

    RGB -> HSV as torchvision (red wins ties, then green; hue 0 for grays); HSV -> RGB by
    channel ``n`` in (5, 3, 1): ``v - (v - min) * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6``
    (``v * s`` is the chroma ``v - min``, so the saturation never has to be divided out).

    Args:
        views: RGB in [0, 1]. Shape: (n, 3, H, W).
        shift: Hue shift per view in [-0.5, 0.5]. Shape: (n, 1, 1).
    """
    red, green, blue = views.unbind(dim=1)
    minimum, value = torch.aminmax(views, dim=1)
    chroma = value - minimum
    is_red = value == red
    is_green = (value == green) & ~is_red
    numerator = torch.where(is_red, green - blue, torch.where(is_green, blue - red, red - green))
    base = torch.where(is_red, 0.0, torch.where(is_green, 2.0, 4.0))
    sextant = numerator.div_(chroma.clamp(min=torch.finfo(views.dtype).tiny)).add_(base).add_(6 * shift)
    offsets = torch.arange(5, 0, -2, dtype=views.dtype, device=views.device).view(1, 3, 1, 1)  # 5, 3, 1
    k = (sextant.unsqueeze(1) + offsets).remainder_(6)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return value.unsqueeze(1) - ramp.mul_(chroma.unsqueeze(1))


def _gaussian_blur(views: Tensor, plan: _Plan, kernel_size: int) -> None:
    """Separable Gaussian blur, one kernel per view, reflect padding (torchvision's), in place."""
    radius = kernel_size // 2
    for start, end in plan.blur_ranges:
        part = views[start:end]
        count, channels, height, width = part.shape
        kernels = plan.blur_kernels[start:end].repeat_interleave(channels, dim=0)
        padded = functional.pad(part, [radius, radius, radius, radius], mode="reflect")
        flat = padded.reshape(1, count * channels, height + 2 * radius, width + 2 * radius)
        flat = functional.conv2d(flat, kernels.view(-1, 1, kernel_size, 1), groups=count * channels)
        flat = functional.conv2d(flat, kernels.view(-1, 1, 1, kernel_size), groups=count * channels)
        part.copy_(flat.view(count, channels, height, width))
