"""The tensor operations of the views, on whatever device the batch is on.

Resampling is Pillow's anti-aliased bicubic (``a = -0.5``, what torchvision's anti-aliased
tensor resize copies) written as two matrix products, ``view = rows @ image @ columns.T``, with
one weight matrix per view (kept banded, `labelfew.views.bands`): a crop box, a flip (the columns
reversed), a whole-image resize followed by a centre crop (only the kept output rows computed) are
all just different weights, and the padding of a batch of images of different sizes gets no weight. Colour jitter,
grayscale and blur follow torchvision's formulas on float tensors (hue through RGB -> HSV -> RGB;
blur as a grouped separable convolution with one kernel per view and reflect padding).

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
    """Raises ValueError unless ``images`` is uint8 (batch, 3, H, W) and ``sizes`` (batch, 2) fit in it."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images of shape (batch_size, 3, H, W), got {images.dtype} {tuple(images.shape)}"
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
        images: uint8 images. Shape: (batch, 3, H, W).
        sources: The image of each view, on the CPU. Shape: (views,), int64.
        rows: Weights of every output row over the input rows (`bicubic_weights`).
        columns: Weights of every output column over the input columns.

    Returns:
        Shape: (views, 3, out_height, out_width), in the weights' dtype (float32 from float boxes).
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
    saved = 3 * (dense * view_count - int(banded.sum()))
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


def normalization(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` as (1, 3, 1, 1) float32 tensors on ``device``, moved in one copy."""
    values = to_device(torch.tensor([*mean, *std], dtype=torch.float32), device)
    return values[:3].view(1, 3, 1, 1), values[3:].view(1, 3, 1, 1)


def normalize(views: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """In place: ``(views - mean) / std`` with (1, 3, 1, 1) statistics on the views' device."""
    return views.sub_(mean).div_(std)


def grayscale(views: Tensor) -> Tensor:
    """Luma with torchvision's weights and arithmetic. Shape: (n, 3, H, W) -> (n, 1, H, W)."""
    red, green, blue = views.unbind(dim=1)
    gray = (
        red.mul(GRAYSCALE_WEIGHTS[0])
        .add_(green, alpha=GRAYSCALE_WEIGHTS[1])
        .add_(blue, alpha=GRAYSCALE_WEIGHTS[2])
    )
    return gray.unsqueeze(1)


def color_jitter(views: Tensor, linear: Tensor, hue: Tensor, hue_ranges: tuple[tuple[int, int], ...]) -> None:
    """torchvision ColorJitter with per-view factors and order, in place.

    Args:
        views: The jittered views, RGB in [0, 1]. Shape: (n, 3, H, W).
        linear: Per jitter position, the weights ``(scale, gray, mean gray)`` of brightness,
            contrast or saturation (the identity for hue). Shape: (n, 4, 3).
        hue: Hue shift per view in turns. Shape: (n, 1, 1).
        hue_ranges: For jitter positions 0-3, the rows ``[start, end)`` whose hue is applied there.
    """
    if views.shape[0] == 0:
        return
    for position in range(4):
        scale, gray_weight, mean_weight = linear[:, position].view(-1, 3, 1, 1, 1).unbind(dim=1)
        gray = grayscale(views)
        mean_gray = gray.mean(dim=(2, 3), keepdim=True)
        offset = gray.mul_(gray_weight).add_(mean_gray.mul_(mean_weight))
        views.mul_(scale).add_(offset).clamp_(0, 1)
        start, end = hue_ranges[position]
        if end > start:
            views[start:end] = adjust_hue(views[start:end], hue[start:end])


def adjust_hue(views: Tensor, shift: Tensor) -> Tensor:
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


def gaussian_blur(views: Tensor, kernels: Tensor, ranges: tuple[tuple[int, int], ...]) -> None:
    """Separable Gaussian blur, one kernel per view, reflect padding (torchvision's), in place.

    Args:
        views: Shape: (n, 3, H, W).
        kernels: One normalised 1-D kernel per view. Shape: (n, kernel_size).
        ranges: The rows ``[start, end)`` to blur.
    """
    kernel_size = kernels.shape[1]
    radius = kernel_size // 2
    for start, end in ranges:
        part = views[start:end]
        count, channels, height, width = part.shape
        weights = kernels[start:end].repeat_interleave(channels, dim=0)
        padded = functional.pad(part, [radius, radius, radius, radius], mode="reflect")
        flat = padded.reshape(1, count * channels, height + 2 * radius, width + 2 * radius)
        flat = functional.conv2d(flat, weights.view(-1, 1, kernel_size, 1), groups=count * channels)
        flat = functional.conv2d(flat, weights.view(-1, 1, 1, kernel_size), groups=count * channels)
        part.copy_(flat.view(count, channels, height, width))
