"""The banded bicubic resample (labelfew.views.bands) against the dense matrix product.

The reference is the resample before the weights were banded: for every output pixel, Pillow's
bicubic weights over *all* input pixels of the padded image, applied as ``rows @ image @ columns.T``
over the whole image. Banded weights, the dense matrices built from them and the tiled per-view
products must all give the same views up to float summation order.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from labelfew.views.bands import bicubic_filter, resample_banded
from labelfew.views.ops import bicubic_weights, crop_weights, dense_weights, resample, use_bands

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def reference_weights(
    start: Tensor,
    length: Tensor,
    size: int,
    input_size: int,
    mirror: Tensor | None = None,
    resized_length: Tensor | None = None,
    offset: Tensor | None = None,
) -> Tensor:
    """Dense weights over all ``input_size`` inputs (the pre-banded ``bicubic_weights``)."""
    positions = (torch.arange(size, dtype=start.dtype) + 0.5).expand(start.shape[0], size)
    if mirror is not None:
        positions = torch.where(mirror.view(-1, 1), size - positions, positions)
    if offset is not None:
        positions = positions + offset.view(-1, 1)
    scale = (length / (size if resized_length is None else resized_length)).view(-1, 1)
    centres = start.view(-1, 1) + positions * scale
    inputs = torch.arange(input_size, dtype=start.dtype) + 0.5
    distance = (inputs.view(1, 1, -1) - centres.unsqueeze(2)) / scale.clamp(min=1).unsqueeze(2)
    inside = (inputs.view(1, -1) > start.view(-1, 1)) & (inputs.view(1, -1) < (start + length).view(-1, 1))
    weights = bicubic_filter(distance).mul_(inside.unsqueeze(1))
    return weights.div_(weights.sum(dim=2, keepdim=True))


def reference_views(images: Tensor, sources: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    top, left, height, width = boxes.unbind(dim=1)
    rows = reference_weights(top, height, size, images.shape[-2])
    columns = reference_weights(left, width, size, images.shape[-1], mirror=flip)
    pixels = images[sources].to(boxes.dtype)
    return (rows.unsqueeze(1) @ pixels @ columns.transpose(1, 2).unsqueeze(1)).div(255).clamp(0, 1)


def padded_batch(generator: torch.Generator, sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Random uint8 images of different sizes, zero-padded at the bottom right like a real batch."""
    height, width = max(size[0] for size in sizes), max(size[1] for size in sizes)
    images = torch.zeros(len(sizes), 3, height, width, dtype=torch.uint8)
    for index, (image_height, image_width) in enumerate(sizes):
        images[index, :, :image_height, :image_width] = torch.randint(
            0, 256, (3, image_height, image_width), dtype=torch.uint8, generator=generator
        )
    return images, torch.tensor(sizes)


def random_boxes(
    generator: torch.Generator, sizes: Tensor, sources: Tensor, min_side: float, dtype: torch.dtype
) -> Tensor:
    """Boxes inside each source image, sides in ``[min_side, 1]`` of its extent, some fractional."""
    extent = sizes[sources].to(dtype)
    sides = extent * (
        min_side + (1 - min_side) * torch.rand(len(sources), 2, generator=generator, dtype=dtype)
    )
    sides = torch.where(torch.rand(len(sources), 1, generator=generator) < 0.5, sides.round(), sides).clamp(
        min=1
    )
    corners = (extent - sides) * torch.rand(len(sources), 2, generator=generator, dtype=dtype)
    return torch.stack([corners[:, 0], corners[:, 1], sides[:, 0], sides[:, 1]], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("size", "min_side", "image_sizes"),
    [
        (224, 0.3, [(256, 341), (256, 256), (300, 256), (180, 240)]),  # shrink and enlarge, padded
        (224, 0.05, [(256, 384), (64, 80)]),  # tiny crops: 4 taps, enlarged up to 20x
        (32, 0.8, [(32, 32), (30, 28)]),  # CIFAR-like
        (50, 0.5, [(97, 131), (120, 61)]),  # sizes whose tiles are not 16 (50 = 10 x 5)
        (37, 0.5, [(80, 90)]),  # a prime size: tiles of one output pixel
    ],
)
def test_banded_resample_equals_dense_product(
    dtype: torch.dtype, size: int, min_side: float, image_sizes: list[tuple[int, int]]
) -> None:
    generator = torch.Generator().manual_seed(size)
    images, sizes = padded_batch(generator, image_sizes)
    sources = torch.arange(len(image_sizes)).repeat(6)
    boxes = random_boxes(generator, sizes, sources, min_side, dtype)
    flip = torch.rand(len(sources), generator=generator) < 0.5
    expected = reference_views(images, sources, boxes, flip, size)

    rows, columns = crop_weights(images, boxes, flip, size)
    assert rows.weights.dtype == dtype
    banded = resample_banded(images, sources.tolist(), rows, columns).div(255).clamp(0, 1)
    pixels = images[sources].to(dtype)
    dense = (
        (
            dense_weights(rows, images.shape[-2]).unsqueeze(1)
            @ pixels
            @ dense_weights(columns, images.shape[-1]).transpose(1, 2).unsqueeze(1)
        )
        .div(255)
        .clamp(0, 1)
    )
    chosen = resample(images, sources, rows, columns)

    tolerance = TOLERANCE[dtype]
    for name, views in (("banded", banded), ("dense from taps", dense), ("resample", chosen)):
        assert views.dtype == dtype, name
        assert views.shape == (len(sources), 3, size, size), name
        difference = (views - expected).abs().max().item()
        assert difference <= tolerance, f"{name}: {difference}"


def test_taps_equal_dense_weights_with_offset_and_resize() -> None:
    """The evaluation view's resize-then-centre-crop weights, banded and dense, are the reference's."""
    heights = torch.tensor([256.0, 300.0, 97.0, 40.0], dtype=torch.float64)
    resized = torch.tensor([256.0, 292.0, 256.0, 256.0], dtype=torch.float64)
    offsets = torch.tensor([16.0, 30.0, 16.0, 16.0], dtype=torch.float64)
    zeros = torch.zeros_like(heights)
    taps = bicubic_weights(
        zeros, heights, 224, 300, torch.device("cpu"), resized_length=resized, offset=offsets
    )
    expected = reference_weights(zeros, heights, 224, 300, resized_length=resized, offset=offsets)
    assert (dense_weights(taps, 300) - expected).abs().max().item() <= 1e-15


def test_use_bands_by_size() -> None:
    """Dense for 32 px views of 32 px images, banded for 224 px views of photos (on the CPU)."""
    small = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    boxes = torch.tensor([[2.0, 3.0, 25.0, 28.0]]).repeat(8, 1)
    flip = torch.zeros(8, dtype=torch.bool)
    assert not use_bands(small, *crop_weights(small, boxes, flip, 32))
    photos = torch.zeros(8, 3, 256, 341, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 40.0, 180.0, 200.0]]).repeat(8, 1)
    assert use_bands(photos, *crop_weights(photos, boxes, flip, 224))
