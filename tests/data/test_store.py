"""Tests for labelfew.data.memory: decoding into a uint8 store and batches drawn from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelfew.data.images import find_images
from labelfew.data.store import (
    DEFAULT_MEMORY_BUDGET,
    MemoryBatches,
    decode_images,
    decoded_bytes,
    fits_in_memory,
    store_device,
    stored_side,
)
from labelfew.errors import UserError
from labelfew.views.batched import BatchedTwoViews
from labelfew.views.pil import ViewConfig


def test_stored_side_keeps_small_images_and_adds_eval_headroom_above_64() -> None:
    assert [stored_side(size) for size in (8, 32, 64)] == [8, 32, 64]
    assert stored_side(224) == 256
    assert stored_side(96) == 110


def test_budget_arithmetic() -> None:
    assert decoded_bytes(50_000, 32) == 50_000 * 3 * 32 * 32
    assert fits_in_memory(50_000, 32)  # CIFAR-10: 150 MiB
    assert not fits_in_memory(1_281_167, 256)  # ImageNet at 256 px: 235 GiB
    assert fits_in_memory(10, 10, budget=3000) and not fits_in_memory(10, 10, budget=2999)
    assert DEFAULT_MEMORY_BUDGET == 4 * 2**30


def test_decodes_digits_pixel_for_pixel(digits_folder: tuple[Path, Path]) -> None:
    train, _ = digits_folder
    paths = find_images(train)[:40]
    store = decode_images(paths, side=32, workers=2)
    assert store.images.shape == (40, 3, 32, 32) and store.images.dtype == torch.uint8
    assert store.paths == paths and store.skipped == []
    assert store.nbytes == decoded_bytes(40, 32)
    expected = torch.from_numpy(np.array(Image.open(paths[7]).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(store.images[7], expected)


def test_non_square_images_are_resized_and_centre_cropped(tmp_path: Path) -> None:
    pixels = np.zeros((40, 120, 3), dtype=np.uint8)
    pixels[:, :40] = (255, 0, 0)  # red left third
    pixels[:, 40:80] = (0, 255, 0)  # green centre third: all the square keeps
    pixels[:, 80:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    store = decode_images([tmp_path / "wide.png"], side=20)
    assert store.images.shape == (1, 3, 20, 20)
    green = store.images[0, :, :, 3:17].float()
    assert green[1].min() > 240 and green[0].max() < 15 and green[2].max() < 15


def test_bad_files_are_skipped_and_reported(tmp_path: Path, digits_folder: tuple[Path, Path]) -> None:
    good = find_images(digits_folder[0])[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    store = decode_images([good[0], broken, good[1], empty, good[2]], side=16)
    assert store.images.shape[0] == 3
    assert store.paths == good
    assert len(store.skipped) == 2
    assert str(broken) in store.skipped[0] and str(empty) in store.skipped[1]


def test_over_budget_and_undecodable_folders_raise_user_errors(
    tmp_path: Path, digits_folder: tuple[Path, Path]
) -> None:
    paths = find_images(digits_folder[0])[:10]
    with pytest.raises(UserError, match="memory budget"):
        decode_images(paths, side=32, budget=decoded_bytes(10, 32) - 1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"junk")
    with pytest.raises(UserError, match="could be decoded"):
        decode_images([broken], side=32)
    with pytest.raises(UserError, match="No image files"):
        decode_images([], side=32)


def test_store_device_is_the_cpu_without_a_gpu() -> None:
    assert store_device(1000, torch.device("cpu")) == torch.device("cpu")


def store_of(count: int) -> torch.Tensor:
    """uint8 images whose first pixel is their own index, so batches can be traced back."""
    images = torch.zeros(count, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    return images


def test_batches_cover_an_epoch_once_and_reshuffle_per_epoch() -> None:
    batches = MemoryBatches(store_of(50), batch_size=8, seed=3)
    assert len(batches) == 6  # 48 images, the last incomplete batch dropped
    first = [batch["indices"] for batch in batches]
    seen = torch.cat(first)
    assert len(set(seen.tolist())) == 48
    for batch in batches:
        assert batch["images"].shape == (8, 3, 8, 8) and batch["images"].dtype == torch.uint8
        assert torch.equal(batch["images"][:, 0, 0, 0].long(), batch["indices"])
        assert batch["bad"] == [] and (batch["labels"] == -1).all()
    again = [batch["indices"] for batch in batches]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    batches.set_epoch(1)
    second_epoch = [batch["indices"] for batch in batches]
    assert not torch.equal(torch.cat(second_epoch), seen)
    batches.set_epoch(1, first_step=4)  # a resume inside epoch 1 yields its last two batches
    resumed = [batch["indices"] for batch in batches]
    assert len(resumed) == 2 and all(
        torch.equal(a, b) for a, b in zip(resumed, second_epoch[4:], strict=True)
    )
    assert len([batch for batch in batches]) == 6  # and the epoch after it is whole again


def test_processes_take_disjoint_shares_of_each_global_batch() -> None:
    shards = [MemoryBatches(store_of(64), batch_size=4, seed=0, rank=rank, world_size=3) for rank in range(3)]
    assert all(len(shard) == 5 for shard in shards)
    per_rank = [torch.cat([batch["indices"] for batch in shard]) for shard in shards]
    combined = torch.cat(per_rank)
    assert len(set(combined.tolist())) == 60
    single = torch.cat([batch["indices"] for batch in MemoryBatches(store_of(64), batch_size=12, seed=0)])
    # Step by step, the three shares together are the single-process global batch.
    for step in range(5):
        together = torch.cat([shard[step * 4 : step * 4 + 4] for shard in per_rank])
        assert torch.equal(together, single[step * 12 : step * 12 + 12])


def test_batches_pass_through_the_batched_views() -> None:
    config = ViewConfig(image_size=8)
    batches = MemoryBatches(
        store_of(20), batch_size=5, transform=BatchedTwoViews(config, torch.Generator().manual_seed(0))
    )
    batch = next(iter(batches))
    first, second = batch["images"]
    assert first.shape == second.shape == (5, 3, 8, 8) and first.dtype == torch.float32


def test_invalid_batching_is_refused() -> None:
    with pytest.raises(UserError, match="larger than the 10 decoded images"):
        MemoryBatches(store_of(10), batch_size=6, world_size=2)
    with pytest.raises(ValueError):
        MemoryBatches(store_of(10), batch_size=2, rank=2, world_size=2)
