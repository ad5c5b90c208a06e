"""views.png of images that are not RGB: gray as gray, N channels as their first three, captioned."""

from __future__ import annotations

import numpy as np
import torch

from labelfew.report.views_figure import CAPTION_HEIGHT, GAP, MIN_CELL, caption, displayed, views_grid


def _grid(channels: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(channels)
    images = torch.randint(0, 256, (2, channels, 32, 32), dtype=torch.uint8, generator=generator)
    views = [images.float() / 255, images.flip(3).float() / 255]  # mean 0, std 1: the views as drawn
    return views_grid(images, torch.tensor([[32, 32], [32, 32]]), views, (0.0,) * channels, (1.0,) * channels)


def test_gray_images_are_drawn_gray_without_a_caption() -> None:
    grid = _grid(1)
    assert grid.shape == (2 * (MIN_CELL + GAP) + GAP, 3 * (MIN_CELL + GAP) + GAP, 3)
    assert np.array_equal(grid[..., 0], grid[..., 1]) and np.array_equal(grid[..., 1], grid[..., 2])
    assert grid.std() > 5


def test_four_channel_images_show_their_first_three_channels_and_say_so() -> None:
    grid = _grid(4)
    body = grid[:-CAPTION_HEIGHT]
    assert body.shape == (2 * (MIN_CELL + GAP) + GAP, 3 * (MIN_CELL + GAP) + GAP, 3)
    generator = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (2, 4, 32, 32), dtype=torch.uint8, generator=generator)
    first_view = body[GAP : GAP + MIN_CELL, 2 * GAP + MIN_CELL : 2 * GAP + 2 * MIN_CELL]
    expected = images[0, :3].permute(1, 2, 0).numpy().repeat(3, axis=0).repeat(3, axis=1)
    assert np.array_equal(first_view, expected)
    strip = grid[-CAPTION_HEIGHT:]
    assert strip.min() < 128 and strip.max() == 255  # text on white
    assert caption(4) == "4-channel images: channels 1-3 shown as red, green, blue"


def test_displayed_pictures() -> None:
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    assert np.array_equal(displayed(gray), np.repeat(gray, 3, axis=2))
    rgb = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    assert displayed(rgb) is rgb or np.array_equal(displayed(rgb), rgb)
    two = np.ones((2, 3, 2), dtype=np.uint8)
    assert displayed(two)[..., 2].max() == 0 and caption(2) is not None and caption(3) is None
