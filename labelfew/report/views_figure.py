"""`views.png`: what the augmentations do to a user's images, drawn from the views that train.

The first thing to check on a new kind of data (slides, factory parts) is whether the views still
show what matters. `pretrain` writes `RUN/pretrain/views.png` at the start of every run: 8 images
of the first batch, each as the original beside its two views, made by the same view executor and
from the same kind of batch as training (either image source). Pure numpy + Pillow: no matplotlib.

Images that are not RGB are drawn as what the model sees: 1 channel as grayscale; N > 3 channels
as their first three channels as red, green and blue (2 channels: red and green), with a caption
under the grid that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from labelfew.data.batches import EpochBatches
from labelfew.fileio import atomic_write
from labelfew.views.simclr import SimCLRViews

SHOWN_IMAGES = 8
MIN_CELL = 96
"""Cells are at least this many pixels wide (a 32 px view is enlarged 3× by pixel repetition)."""
GAP = 4
CAPTION_HEIGHT = 16
"""The white strip under the grid that holds the caption of images that are not RGB or gray."""


def views_grid(
    images: Tensor, sizes: Tensor, views: Sequence[Tensor], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """One row per image: the original (its valid extent, fitted into the cell) and each view.

    Args:
        images: uint8 batch, padded, any channel count C. Shape: (N, C, H, W).
        sizes: valid (height, width) of each image. Shape: (N, 2).
        views: normalised float views, each of shape (N, C, S, S).
        mean, std: the normalisation the views were made with (C entries each, undone here).

    Returns:
        uint8 RGB picture (gray for C = 1, the first three channels for C > 3, with `caption`
        under it). Shape: (rows × cell + gaps [+ caption], columns × cell + gaps, 3).
    """
    count, channels, side = images.shape[0], images.shape[1], views[0].shape[-1]
    scale = max(1, -(-MIN_CELL // side))
    cell = side * scale
    columns = 1 + len(views)
    grid = np.full((count * (cell + GAP) + GAP, columns * (cell + GAP) + GAP, 3), 255, dtype=np.uint8)
    shift = torch.tensor(mean).view(1, channels, 1, 1)
    spread = torch.tensor(std).view(1, channels, 1, 1)
    shown = [
        ((view.detach().float().cpu() * spread + shift).clamp(0, 1) * 255).round().byte() for view in views
    ]
    for row in range(count):
        height, width = (int(value) for value in sizes[row])
        original = images[row, :, :height, :width].cpu().permute(1, 2, 0).numpy()
        cells = [_fit(displayed(original), cell)] + [
            _enlarge(displayed(view[row].permute(1, 2, 0).numpy()), scale) for view in shown
        ]
        top = GAP + row * (cell + GAP)
        for column, picture in enumerate(cells):
            left = GAP + column * (cell + GAP)
            grid[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
    text = caption(channels)
    return grid if text is None else _with_caption(grid, text)


def displayed(picture: np.ndarray) -> np.ndarray:
    """An (H, W, C) uint8 image as the (H, W, 3) RGB picture a person sees.

    1 channel: gray (the channel in red, green and blue); 3: itself; more: the first three; 2: red
    and green, blue 0.
    """
    channels = picture.shape[2]
    if channels == 1:
        return np.repeat(picture, 3, axis=2)
    if channels == 2:
        return np.concatenate([picture, np.zeros_like(picture[..., :1])], axis=2)
    return np.ascontiguousarray(picture[..., :3])


def caption(channels: int) -> str | None:
    """What the picture of ``channels``-channel images leaves out; None for RGB and grayscale."""
    if channels in (1, 3):
        return None
    if channels == 2:
        return "2-channel images: channel 1 as red, channel 2 as green"
    return f"{channels}-channel images: channels 1-3 shown as red, green, blue"


def _with_caption(grid: np.ndarray, text: str) -> np.ndarray:
    """``grid`` with a white strip under it holding ``text`` in black (Pillow's default font)."""
    strip = Image.new("RGB", (grid.shape[1], CAPTION_HEIGHT), "white")
    ImageDraw.Draw(strip).text((GAP, 2), text, fill="black")
    return np.concatenate([grid, np.asarray(strip)], axis=0)


def write_views_figure(batches: EpochBatches, views: SimCLRViews, path: Path, loggers: Any) -> None:
    """``path`` (and the loggers' image ``views``): `SHOWN_IMAGES` images of the first batch beside
    their two views, from the executor that trains.

    The global random state is forked, so drawing the figure changes nothing in training.
    """
    with torch.random.fork_rng(devices=[]):
        batches.set_epoch(0)
        batch = next(iter(batches))
        count = min(SHOWN_IMAGES, len(batch))
        images, sizes = batch.images[:count], batch.sizes[:count]
        first, second = views(images, sizes, batch.generator())
    picture = views_grid(images, sizes, [first, second], views.config.mean, views.config.std)
    write_png(path, picture)
    loggers.log_image("views", picture)


def write_png(path: Path, picture: np.ndarray) -> None:
    """Writes an (H, W, 3) uint8 picture as a PNG, atomically."""
    atomic_write(path, lambda temporary: Image.fromarray(picture).save(temporary, format="PNG"))


def _fit(picture: np.ndarray, cell: int) -> np.ndarray:
    """The whole image, aspect kept, longer side = `cell` (bicubic)."""
    height, width = picture.shape[:2]
    factor = cell / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BICUBIC))


def _enlarge(picture: np.ndarray, scale: int) -> np.ndarray:
    return picture.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else picture
