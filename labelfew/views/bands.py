"""Pillow's anti-aliased bicubic weights as bands of taps, and the banded resample on the CPU.

Each output pixel of a view reads only the input pixels inside its filter's support (4 when
enlarging, ~``4 * scale`` when shrinking), so the weights are kept as ``(first, weights)``: the
first input pixel of every output pixel and ``T`` taps from there (`Taps`). `labelfew.views.ops`
turns them into dense matrices for the batched product (GPUs, small images); on the CPU,
`resample_banded` applies them view by view on the view's band only (its crop plus the filter's
support), in tiles of ``tile`` output pixels: tile ``k`` reads the window
``[k * step, k * step + length)`` of the band, so all tiles of a pass are one strided view of the
band and one batched product of (tile x length) weight blocks. At 224 px from ~256 x 340 images
that is ~1.2 ms per view against ~2.4 for dense products over the band and ~6.6 over the whole
padded image (one CPU core; gathers with one pass per tap measured slower than all three).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

BICUBIC_A = -0.5
"""Pillow's bicubic kernel parameter (torch's non-anti-aliased bicubic uses -0.75)."""
MAX_TILE = 16
"""Output pixels per tile: 16 measured 1.23 ms per 224 px view, 32 took 1.27 and 8 took 2.0."""


class Taps(NamedTuple):
    """Banded resampling weights of a batch of views along one axis.

    Output pixel ``i`` of view ``v`` reads input pixels ``first[v, i] + t``, ``t < T``, with
    weights ``weights[v, i, t]`` (zero past the filter's support and outside the span; ``T`` is
    the widest support of the batch). ``first`` is monotonic along ``i``: non-decreasing, or
    non-increasing for a mirrored view.

    Attributes:
        first: First input pixel of every output pixel, on the CPU. Shape: (views, size), int64.
        weights: Shape: (views, size, T), float, on the device of the views.
    """

    first: Tensor
    weights: Tensor


class _Tiles(NamedTuple):
    """One view's weights along one axis, as a batch of (tile x length) blocks."""

    begin: int  # first input pixel of the band
    end: int  # one past the last
    step: int  # tile k reads band pixels [k * step, k * step + length)
    length: int
    blocks: Tensor  # (tiles, tile, length)
    mirrored: bool  # the blocks compute the outputs in reverse order


def bicubic_filter(distance: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with ``a = -0.5`` (Pillow's ``bicubic_filter``), support 2."""
    x = distance.abs()
    a = BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_taps(
    start: Tensor,
    length: Tensor,
    size: int,
    input_size: int,
    mirror: Tensor | None = None,
    resized_length: Tensor | None = None,
    offset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Weights of Pillow's bicubic filter from ``[start, start + length)`` to output pixels.

    As Pillow's ``precompute_coeffs``: with ``scale = length / resized_length``, output pixel
    ``i`` of the resized span is centred at ``start + (i + 0.5) * scale``; when shrinking, the
    filter is stretched by ``scale`` (anti-aliasing, support ``2 * scale``); input pixels outside
    the span get no weight (a crop is cut before it is resized; a padded batch's padding never
    counts), and each output pixel's weights are normalised. ``size`` output pixels are computed,
    from pixel ``offset`` of the resized span on (a centre crop of a resized image computes only
    the rows it keeps). ``first`` is clamped so that all ``T`` taps lie in ``[0, input_size)``,
    which keeps every tap inside the support.

    Args:
        start: First input pixel of each span, on the CPU. Shape: (views,).
        length: Span length in input pixels. Shape: (views,).
        size: Output pixels per view.
        input_size: Input length (the padded batch's side).
        mirror: Views whose ``size`` outputs are reversed (a horizontal flip), or None. Shape: (views,).
        resized_length: Length the span is resized to; None means ``size``. Shape: (views,).
        offset: First output pixel kept; None means 0. Shape: (views,).

    Returns:
        ``(first, weights)``: shapes (views, size), int64, and (views, size, T) in ``start``'s dtype.
    """
    positions = torch.arange(size, dtype=start.dtype) + 0.5
    positions = positions.expand(start.shape[0], size)
    if mirror is not None:
        positions = torch.where(mirror.view(-1, 1), size - positions, positions)
    if offset is not None:
        positions = positions + offset.view(-1, 1)
    scale = (length / (size if resized_length is None else resized_length)).view(-1, 1)
    centres = start.view(-1, 1) + positions * scale
    support = 2 * scale.clamp(min=1)
    widest = float(support.max()) if support.numel() else 2.0
    count = min(math.ceil(2 * widest) + 2, input_size)
    first = torch.floor(centres - support - 0.5).long().clamp_(0, input_size - count)
    inputs = (first.unsqueeze(2) + torch.arange(count)).to(start.dtype) + 0.5
    distance = (inputs - centres.unsqueeze(2)) / scale.clamp(min=1).unsqueeze(2)
    inside = (inputs > start.view(-1, 1, 1)) & (inputs < (start + length).view(-1, 1, 1))
    weights = bicubic_filter(distance).mul_(inside)
    return first, weights.div_(weights.sum(dim=2, keepdim=True))


def resample_banded(images: Tensor, sources: list[int], rows: Taps, columns: Taps) -> Tensor:
    """``rows @ image @ columns.T`` per view and channel on the CPU, reading only each view's band.

    Args:
        images: uint8 images on the CPU, any channel count C. Shape: (batch, C, H, W).
        sources: The image of each view.
        rows: Weights of every output row over the input rows.
        columns: Weights of every output column over the input columns.

    Returns:
        Shape: (views, C, out_height, out_width), in the weights' dtype, unscaled (0-255).
    """
    out_height, out_width = rows.first.shape[1], columns.first.shape[1]
    views = rows.weights.new_empty((len(sources), images.shape[1], out_height, out_width))
    for view, source in enumerate(sources):
        row_tiles = _tiles(rows, view, _tile(out_height))
        column_tiles = _tiles(columns, view, _tile(out_width))
        _resample_view(images[source], row_tiles, column_tiles, views[view])
    return views


def _resample_view(image: Tensor, rows: _Tiles, columns: _Tiles, out: Tensor) -> None:
    """One view: rows on its band (C, h, w) -> (C, out_height, w), then columns -> ``out``.

    The last tile's window may run past the band's end by less than ``length``; it reads the next
    channel's pixels (or zeros after the last) with zero weights.
    """
    height, width = rows.end - rows.begin, columns.end - columns.begin
    channels, out_height = out.shape[0], out.shape[1]
    dtype = rows.blocks.dtype
    band_storage = torch.zeros(channels * height * width + rows.length * width, dtype=dtype)
    band = band_storage[: channels * height * width].view(channels, height, width)
    band.copy_(image[:, rows.begin : rows.end, columns.begin : columns.end])
    resized_storage = torch.zeros(channels * out_height * width + columns.length, dtype=dtype)
    resized = resized_storage[: channels * out_height * width].view(channels, out_height, width)
    tile_count, tile, _ = rows.blocks.shape
    for channel in range(channels):
        windows = band_storage.as_strided(
            (tile_count, rows.length, width), (rows.step * width, width, 1), channel * height * width
        )
        torch.bmm(rows.blocks, windows, out=resized[channel].view(tile_count, tile, width))
    if rows.mirrored:
        resized.copy_(resized.flip(1))
    tile_count, tile, _ = columns.blocks.shape
    windows = resized_storage.as_strided(
        (tile_count, channels * out_height, columns.length), (columns.step, width, 1)
    )
    tiles = torch.bmm(windows, columns.blocks.transpose(1, 2))
    tiles = tiles.view(tile_count, channels, out_height, tile)
    if columns.mirrored:
        tiles = tiles.flip(0, 3)
    out.view(channels, out_height, tile_count, tile).copy_(tiles.permute(1, 2, 0, 3))


def _tile(size: int) -> int:
    """The largest divisor of ``size`` up to `MAX_TILE` (tiles never need padding)."""
    return max(divisor for divisor in range(1, MAX_TILE + 1) if size % divisor == 0)


def _tiles(taps: Taps, view: int, tile: int) -> _Tiles:
    """One view's taps as (tile x length) blocks over windows ``k * step`` of its band.

    ``step`` is the largest that keeps every tile's first tap inside its window, and ``length``
    the smallest that then keeps its last tap inside.
    """
    first, weights = taps.first[view], taps.weights[view]
    mirrored = bool(first[0] > first[-1])
    if mirrored:
        first, weights = first.flip(0), weights.flip(0)
    size, count = weights.shape
    tile_count = size // tile
    begin = int(first[0])
    local = (first - begin).view(tile_count, tile)
    heads = local[:, 0]
    indices = torch.arange(1, tile_count)
    step = int((heads[1:] // indices).min()) if tile_count > 1 else 0
    starts = torch.arange(tile_count) * step
    length = int((local[:, -1] + count - starts).max())
    index = (local - starts.view(-1, 1)).unsqueeze(2) + torch.arange(count)
    blocks = weights.new_zeros(tile_count, tile, length)
    blocks.scatter_(2, index.to(weights.device), weights.view(tile_count, tile, count))
    return _Tiles(begin, int(first[-1]) + count, step, length, blocks, mirrored)
