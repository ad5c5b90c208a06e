"""The tensor operations of the views, on whatever device the batch is on.

Resampling is Pillow's anti-aliased bicubic (``a = -0.5``, what torchvision's anti-aliased
tensor resize copies) written as two matrix products, ``view = rows @ image @ columns.T``, with
one weight matrix per view (kept banded, `labelfew.views.bands`): a crop box, a flip (the columns
reversed), a whole-image resize followed by a centre crop (only the kept output rows computed) are
all just different weights, and the padding of a batch of images of different sizes gets no weight. Colour jitter,
grayscale and blur follow torchvision's formulas on float tensors (hue through RGB -> HSV -> RGB;
blur separable, one kernel per view, reflect padding, as shifted sums over the taps it needs).
Resampling, blur and normalisation work on any channel count C; colour jitter and grayscale are
RGB's (C = 3); `labelfew.views.channels` has the brightness and contrast of 1 or N channels.

Remaining pixel differences from the per-image PIL reference come from its uint8 arithmetic:
Pillow's ``Image.blend`` truncates (brightness, contrast and saturation each lose 0.2-0.4/255 on
average, so PIL views are slightly darker), and PIL rounds after every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as functional
from torch import Tensor

from labelfew.views.bands import Taps, bicubic_taps, resample_banded

GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)
"""torchvision's (ITU-R 601-2) luma weights, used by contrast, saturation and grayscale."""


@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
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


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copies a host tensor to ``device`` without making the host wait for the device's queue."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def check_images(images: Tensor, sizes: Tensor | None = None) -> None:
    """Raises ValueError unless ``images`` is uint8 (batch, C, H, W), C >= 1, and ``sizes`` (batch, 2) fit in it."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] < 1:
        raise ValueError(
            f"expected uint8 images of shape (batch_size, channels, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if sizes is not None:
        if tuple(sizes.shape) != (images.shape[0], 2):
            raise ValueError(f"expected sizes of shape ({images.shape[0]}, 2), got {tuple(sizes.shape)}")
        if (
            (sizes < 1).any()
            or (sizes[:, 0] > images.shape[2]).any()
            or (sizes[:, 1] > images.shape[3]).any()
        ):
            raise ValueError(f"sizes must lie within the padded images of {tuple(images.shape[2:])}")


def full_sizes(images: Tensor) -> Tensor:
    """The sizes of an unpadded batch: every image fills ``(H, W)``. Shape: (batch, 2), int64."""
    return torch.tensor(images.shape[2:]).expand(images.shape[0], 2)


def resample(images: Tensor, sources: Tensor, rows: Taps, columns: Taps) -> Tensor:
    """``rows @ image @ columns.T`` per view and channel, in [0, 1].

    Two ways, with the same weights (the results differ by float summation order only):
    - dense: one batched product over the whole padded image, the weights as dense matrices
      (GPUs, whose batched products this keeps busy, and small CPU images: 32 px views of 32 px
      images, where one product beats a loop over views);
    - banded (`labelfew.views.bands.resample_banded`): on the CPU, view by view, over each view's
      band only, in tiles of output pixels; 224 px views of ~256 x 340 images take ~1.2 ms each
      against ~6.6 ms for the dense product on one core.
    `use_bands` picks one by the multiply-adds the bands save.

    Args:
        images: uint8 images, any channel count C. Shape: (batch, C, H, W).
        sources: The image of each view, on the CPU. Shape: (views,), int64.
        rows: Weights of every output row over the input rows (`bicubic_weights`).
        columns: Weights of every output column over the input columns.

    Returns:
        Shape: (views, C, out_height, out_width), in the weights' dtype (float32 from float boxes).
    """
    if use_bands(images, rows, columns):
        views = resample_banded(images, sources.tolist(), rows, columns)
    else:
        pixels = images[to_device(sources, images.device)].to(rows.weights.dtype)
        row_matrix = dense_weights(rows, images.shape[-2]).unsqueeze(1)
        column_matrix = dense_weights(columns, images.shape[-1]).transpose(1, 2).unsqueeze(1)
        views = row_matrix @ pixels @ column_matrix
    return views.mul_(1 / 255).clamp_(0, 1)


def dense_weights(taps: Taps, input_size: int) -> Tensor:
    """Banded weights as dense matrices. Shape: (views, size, input_size)."""
    views, size, count = taps.weights.shape
    index = to_device(taps.first.unsqueeze(2) + torch.arange(count), taps.weights.device)
    matrix = taps.weights.new_zeros(views, size, input_size)
    return matrix.scatter_(2, index, taps.weights)


BAND_OVERHEAD = 1_000_000
"""Multiply-adds a view's band must save to pay for its own operations (~30 us on a CPU core)."""


def use_bands(images: Tensor, rows: Taps, columns: Taps) -> bool:
    """Whether the banded resample saves more multiply-adds than its per-view operations cost.

    Counts dense products over each view's band (an upper bound of the tiled products). Always
    False off the CPU: the banded loop would launch tens of kernels per view.
    """
    view_count = rows.first.shape[0]
    if images.device.type != "cpu" or view_count == 0:
        return False
    out_height, out_width = rows.first.shape[1], columns.first.shape[1]
    height, width = images.shape[-2:]
    dense = out_height * height * width + out_height * width * out_width
    row_bands, column_bands = _band_sizes(rows), _band_sizes(columns)
    banded = out_height * row_bands * column_bands + out_height * column_bands * out_width
    saved = images.shape[1] * (dense * view_count - int(banded.sum()))
    return saved > BAND_OVERHEAD * view_count


def _band_sizes(taps: Taps) -> Tensor:
    """Input pixels each view reads. Shape: (views,), int64."""
    return taps.first.max(dim=1).values + taps.weights.shape[2] - taps.first.min(dim=1).values


def bicubic_weights(
    start: Tensor,
    length: Tensor,
    size: int,
    input_size: int,
    device: torch.device,
    mirror: Tensor | None = None,
    resized_length: Tensor | None = None,
    offset: Tensor | None = None,
) -> Taps:
    """`bicubic_taps` computed on the CPU from host parameters, the weights moved to ``device``."""
    first, weights = bicubic_taps(start, length, size, input_size, mirror, resized_length, offset)
    return Taps(first, to_device(weights, device))


def crop_weights(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> tuple[Taps, Taps]:
    """Row and column weights of crop boxes resized to ``size x size``, flipped where ``flip``.

    Args:
        images: The batch the boxes lie in (for its padded height and width, and its device).
        boxes: ``(top, left, height, width)`` per view, float, on the CPU. Shape: (views, 4).
        flip: Shape: (views,), bool, on the CPU.
    """
    top, left, height, width = boxes.unbind(dim=1)
    rows = bicubic_weights(top, height, size, images.shape[-2], images.device)
    columns = bicubic_weights(left, width, size, images.shape[-1], images.device, mirror=flip)
    return rows, columns


def reflect(positions: Tensor, extents: Tensor) -> Tensor:
    """Reflect padding's source pixel of each position (``-1 -> 1``, ``n -> n - 2``: the edge is not
    repeated, as ``torch.nn.functional.pad(mode="reflect")`` and TensorFlow's ``REFLECT``).

    Valid for positions less than one extent outside ``[0, extent)``. Shapes: (views, size) int64
    positions and (views,) extents -> (views, size) int64 in ``[0, extent)``.
    """
    last = (extents - 1).view(-1, 1)
    folded = positions.abs()
    return torch.where(folded > last, 2 * last - folded, folded)


def gather_windows(images: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """``images[v, :, rows[v, i], columns[v, j]]`` as float views in [0, 1]: pixels copied, none resampled.

    One gather over the flattened pixels (on a CPU core ~2x faster than a gather of rows, then one
    of columns). Shapes: (views, C, H, W) uint8 and (views, S) int64 rows and columns on the CPU ->
    (views, C, S, S) float32.
    """
    count, channels, height, width = images.shape
    size = rows.shape[1]
    index = (rows.unsqueeze(2) * width + columns.unsqueeze(1)).view(count, 1, size * size)
    index = to_device(index, images.device).expand(count, channels, size * size)
    picked = images.reshape(count, channels, height * width).gather(2, index)
    return picked.view(count, channels, size, size).float().mul_(1 / 255)


def resized_pixel_weights(length: int, resized_length: int, input_size: int, picks: Tensor) -> Tensor:
    """Dense bicubic weights of the pixels ``picks`` of a span ``[0, length)`` resized to ``resized_length``.

    Shape: (size,) int64 picks -> (size, input_size) float32 on the CPU, one row per picked pixel.
    """
    start, span = torch.zeros(1), torch.tensor([float(length)])
    first, weights = bicubic_taps(
        start, span, resized_length, input_size, resized_length=torch.tensor([float(resized_length)])
    )
    return dense_weights(Taps(first, weights), input_size)[0, picks]


def normalization(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` as (1, C, 1, 1) float32 tensors on ``device``, moved in one copy (C = len(mean))."""
    channels = len(mean)
    values = to_device(torch.tensor([*mean, *std], dtype=torch.float32), device)
    return values[:channels].view(1, channels, 1, 1), values[channels:].view(1, channels, 1, 1)


def normalize(views: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """In place: ``(views - mean) / std`` with (1, C, 1, 1) statistics on the views' device.

    Raises:
        ValueError: the statistics are not for the views' channel count.
    """
    if mean.shape[1] != views.shape[1]:
        raise ValueError(
            f"views of {views.shape[1]} channels, but normalisation statistics for {mean.shape[1]}"
        )
    return views.sub_(mean).div_(std)


def grayscale(views: Tensor) -> Tensor:
    """Luma with torchvision's weights and arithmetic. Shape: (n, 3, H, W) -> (n, 1, H, W).

    A 1-channel view is its own gray image (a copy), as torchvision's ``rgb_to_grayscale`` keeps it.
    """
    if views.shape[1] == 1:
        return views.clone()
    red, green, blue = views.unbind(dim=1)
    gray = (
        red.mul(GRAYSCALE_WEIGHTS[0])
        .add_(green, alpha=GRAYSCALE_WEIGHTS[1])
        .add_(blue, alpha=GRAYSCALE_WEIGHTS[2])
    )
    return gray.unsqueeze(1)


IDENTITY, SCALE, BLEND = 0, 1, 2
"""What a jitter position does to a group of views (`color_jitter`'s ``kinds``): nothing (hue or no
jitter), a scale only (brightness), or a scale plus a gray offset (contrast, saturation)."""


def color_jitter(
    views: Tensor,
    linear: Tensor,
    hue: Tensor,
    hue_ranges: tuple[tuple[int, int], ...],
    kinds: tuple[int, int, int, int] = (BLEND, BLEND, BLEND, BLEND),
) -> None:
    """torchvision ColorJitter with per-view factors and order, in place.

    Args:
        views: The jittered views, RGB in [0, 1]. Shape: (n, 3, H, W).
        linear: Per jitter position, the weights ``(scale, gray, mean gray)`` of brightness,
            contrast or saturation (the identity for hue). Shape: (n, 4, 3).
        hue: Hue shift per view in turns. Shape: (n, 1, 1).
        hue_ranges: For jitter positions 0-3, the rows ``[start, end)`` whose hue is applied there.
        kinds: Per position, the most any of the views needs there (`IDENTITY`, `SCALE`, `BLEND`),
            known on the host: less work for what needs less, the same values (a skipped gray
            term has weight 0).
    """
    if views.shape[0] == 0:
        return
    for position in range(4):
        if kinds[position] != IDENTITY:
            scale, gray_weight, mean_weight = linear[:, position].view(-1, 3, 1, 1, 1).unbind(dim=1)
            if kinds[position] == BLEND:
                gray = grayscale(views)
                mean_gray = gray.mean(dim=(2, 3), keepdim=True)
                views.mul_(scale).add_(gray.mul_(gray_weight).add_(mean_gray.mul_(mean_weight)))
            else:
                views.mul_(scale)
            views.clamp_(0, 1)
        start, end = hue_ranges[position]
        if end > start:
            views[start:end] = adjust_hue(views[start:end], hue[start:end])


def adjust_hue(views: Tensor, shift: Tensor) -> Tensor:
    """Rotates the hue by ``shift`` turns per view through HSV, as torchvision's ``adjust_hue``.

    RGB -> HSV as torchvision (red wins ties, then green; hue 0 for grays); HSV -> RGB by
    channel ``n`` in (5, 3, 1): ``v - (v - min) * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6``
    (``v * s`` is the chroma ``v - min``, so the saturation never has to be divided out).

    Written for the CPU's speed with the same values: the channel maximum and minimum as two
    pairwise ``maximum``/``minimum`` each (``aminmax`` over the channel dimension took ~0.6 ms of a
    224 px view, the rest of the op ~0.4), ``mod 6`` as ``k - 6 * floor(k / 6)`` (``remainder``
    took ~0.2 ms; at a multiple of 6 either value gives ramp 0), and the green test without
    ``& ~is_red`` (where red and green tie, red's formula is taken first and gives the same hue).

    Args:
        views: RGB in [0, 1]. Shape: (n, 3, H, W).
        shift: Hue shift per view in [-0.5, 0.5]. Shape: (n, 1, 1).
    """
    red, green, blue = views.unbind(dim=1)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    is_red = value == red
    is_green = value == green
    numerator = torch.where(is_red, green - blue, torch.where(is_green, blue - red, red - green))
    base = torch.where(is_red, 0.0, torch.where(is_green, 2.0, 4.0))
    sextant = numerator.div_(chroma.clamp(min=torch.finfo(views.dtype).tiny)).add_(base).add_(6 * shift)
    offsets = torch.arange(5, 0, -2, dtype=views.dtype, device=views.device).view(1, 3, 1, 1)  # 5, 3, 1
    k = sextant.unsqueeze(1) + offsets
    k.sub_(torch.floor(k * (1 / 6)).mul_(6))
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return value.unsqueeze(1) - ramp.mul_(chroma.unsqueeze(1))


BLUR_TAP_FLOOR = 1e-9
"""Blur taps below this fraction of the centre tap are left out (`blur_radius`): together they
weigh < 3e-8, under float32's resolution of a pixel value near 1 (6e-8). A sigma of 0.1 then
needs 1 tap instead of 23, a sigma of 1 needs 13."""


def blur_radius(kernels: Tensor) -> list[int]:
    """The radius each normalised 1-D kernel needs, its taps below `BLUR_TAP_FLOOR` left out.

    Shape: (views, kernel_size) on the CPU -> one radius per view, at most ``kernel_size // 2``.
    """
    centre = kernels.shape[1] // 2
    negligible = kernels[:, :centre] < BLUR_TAP_FLOOR * kernels[:, centre : centre + 1]
    return (centre - negligible.sum(dim=1)).tolist()


def gaussian_blur(views: Tensor, kernels: Tensor, ranges: tuple[tuple[int, int, int], ...]) -> None:
    """Separable Gaussian blur, one kernel per view, reflect padding (torchvision's), in place.

    Each pass adds the shifted views times one tap each (the sum that a grouped convolution
    computes, ~2x faster on a CPU core at 224 px), over only the taps a range's widest kernel needs.

    Args:
        views: Shape: (n, 3, H, W).
        kernels: One normalised 1-D kernel per view, odd size. Shape: (n, kernel_size).
        ranges: ``(start, end, radius)``: the rows ``[start, end)`` to blur with the central
            ``2 * radius + 1`` taps of their kernels (`blur_radius`).
    """
    centre = kernels.shape[1] // 2
    for start, end, radius in ranges:
        part = views[start:end]
        height, width = part.shape[-2:]
        taps = kernels[start:end, centre - radius : centre + radius + 1].view(end - start, -1, 1, 1, 1)
        padded = functional.pad(part, [radius, radius, radius, radius], mode="reflect")
        rows = padded[..., :height, :] * taps[:, 0]
        for tap in range(1, 2 * radius + 1):
            rows.addcmul_(padded[..., tap : tap + height, :], taps[:, tap])
        blurred = rows[..., :width] * taps[:, 0]
        for tap in range(1, 2 * radius + 1):
            blurred.addcmul_(rows[..., tap : tap + width], taps[:, tap])
        part.copy_(blurred)


def grayscale_ranges(views: Tensor, ranges: tuple[tuple[int, int], ...]) -> None:
    """In place: the rows ``[start, end)`` of each range become their luma in all three channels."""
    for start, end in ranges:
        part = views[start:end]
        part.copy_(grayscale(part).expand_as(part))
