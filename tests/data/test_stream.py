"""Tests for labelfew.data.stream: workers that decode and resize into the padded Batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelfew.data.batches import EpochOrder
from labelfew.data.images import load_resized
from labelfew.data.stream import DecodedFiles, StreamBatches, collate


def _png(path: Path, height: int, width: int, value: int) -> Path:
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)
    return path


def test_a_bad_file_is_replaced_by_the_next_good_one_and_reported(tmp_path: Path) -> None:
    first = _png(tmp_path / "0.png", 8, 8, 1)
    (tmp_path / "1.png").write_bytes(b"")
    (tmp_path / "2.png").write_text("text")
    third = _png(tmp_path / "3.png", 8, 8, 3)
    files = DecodedFiles([first, tmp_path / "1.png", tmp_path / "2.png", third], side=8, labels=[0, 1, 2, 3])
    pixels, index, label, bad = files[1]
    assert (index, label, bad) == (3, 3, [1, 2]) and int(pixels[0, 0, 0]) == 3
    assert files[0][1:] == (0, 0, [])
    with pytest.raises(RuntimeError, match="could not be decoded"):
        DecodedFiles([tmp_path / "1.png"] * 3, side=8)[0]


def test_collate_pads_whole_resized_images_into_a_batch(tmp_path: Path) -> None:
    paths = [_png(tmp_path / "wide.png", 20, 60, 5), _png(tmp_path / "small.png", 6, 4, 7)]
    files = DecodedFiles(paths, side=10, labels=[1, 0])
    batch = collate([files[0], files[1]])
    assert batch.images.shape == (2, 3, 10, 30) and batch.sizes.tolist() == [[10, 30], [6, 4]]
    assert torch.equal(batch.images[0], torch.from_numpy(load_resized(paths[0], 10)).permute(2, 0, 1))
    assert (batch.images[1, :, :6, :4] == 7).all() and (batch.images[1, :, 6:] == 0).all()
    assert batch.labels.tolist() == [1, 0] and batch.indices.tolist() == [0, 1] and batch.bad == []  # type: ignore[union-attr]
    assert collate([DecodedFiles(paths, side=10)[0]]).labels is None


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_batches_follow_the_epoch_order_with_any_worker_count(tmp_path: Path, workers: int) -> None:
    paths = [_png(tmp_path / f"{index}.png", 8 + index % 3, 9, index) for index in range(20)]
    order = EpochOrder(20, batch_size=6, seed=1)
    batches = StreamBatches(DecodedFiles(paths, side=16), order, "cpu", workers=workers)
    assert len(batches) == 3
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        seen = list(batches)
        order.set_epoch(epoch)
        assert [batch.indices.tolist() for batch in seen] == list(order)
        assert [batch.seed for batch in seen] == [order.view_seed(step) for step in range(3)]
        for batch in seen:
            assert torch.equal(batch.images[:, 0, 0, 0].long(), batch.indices)
    batches.set_epoch(1, first_step=2)
    assert [batch.indices.tolist() for batch in batches] == list(order)[2:]
