"""Tests for labelfew.data.store: whole images decoded once into a uint8 store, and batches from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from labelfew.data.batches import EpochOrder
from labelfew.data.images import find_images, load_resized
from labelfew.data.store import (
    DEFAULT_MEMORY_BUDGET,
    ImageStore,
    MemoryBatches,
    decode_images,
    estimate_decoded_bytes,
    fits_in_memory,
    image_bytes,
    store_device,
    stored_side,
)
from labelfew.errors import UserError


def _png(path: Path, height: int, width: int, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_stored_side_keeps_small_images_and_adds_eval_headroom_above_64() -> None:
    assert [stored_side(size) for size in (8, 32, 64)] == [8, 32, 64]
    assert stored_side(224) == 256
    assert stored_side(96) == 110


def test_budget_counts_the_real_bytes_of_whole_images() -> None:
    assert image_bytes(32, 32, 32) == 3 * 32 * 32
    assert image_bytes(375, 500, 256) == 3 * 256 * 341  # shorter side shrunk, aspect kept
    assert image_bytes(96, 96, 110) == 3 * 96 * 96  # never upsampled
    assert 50_000 * image_bytes(32, 32, 32) < DEFAULT_MEMORY_BUDGET  # CIFAR-10: 150 MiB
    assert 1_281_167 * image_bytes(375, 500, 256) > 75 * DEFAULT_MEMORY_BUDGET  # ImageNet: 312 GiB
    assert DEFAULT_MEMORY_BUDGET == 4 * 2**30


def test_estimate_reads_headers_and_is_exact_for_small_folders(tmp_path: Path) -> None:
    paths = [_png(tmp_path / "a.png", 40, 60), _png(tmp_path / "b.png", 90, 30), tmp_path / "broken.png"]
    paths[2].write_bytes(b"junk")
    expected = image_bytes(40, 60, 32) + image_bytes(90, 30, 32)
    assert estimate_decoded_bytes(paths[:2], 32) == expected
    assert estimate_decoded_bytes(paths, 32) == round(expected / 2 * 3)  # the unreadable one as the mean
    assert fits_in_memory(paths[:2], 32, budget=expected) and not fits_in_memory(
        paths[:2], 32, budget=expected - 1
    )


def test_decodes_digits_pixel_for_pixel(digits_folder: tuple[Path, Path]) -> None:
    paths = find_images(digits_folder[0])[:40]
    store = decode_images(paths, side=32, workers=2)
    assert len(store) == 40 and store.paths == paths and store.skipped == []
    assert store.nbytes == 40 * 3 * 32 * 32
    images, sizes = store.gather(torch.tensor([7, 3]))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8 and sizes.tolist() == [[32, 32]] * 2
    expected = torch.from_numpy(np.array(Image.open(paths[7]).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(images[0], expected)


def test_non_square_images_are_kept_whole_and_never_upsampled(tmp_path: Path) -> None:
    pixels = np.zeros((40, 120, 3), dtype=np.uint8)
    pixels[:, :40] = (255, 0, 0)  # red left third: a centre square would lose it
    pixels[:, 80:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    small = _png(tmp_path / "small.png", 12, 16)
    store = decode_images([tmp_path / "wide.png", small], side=20)
    assert store.sizes.tolist() == [[20, 60], [12, 16]]
    assert store.nbytes == 3 * (20 * 60 + 12 * 16)
    images, sizes = store.gather(torch.tensor([0, 1]))
    assert images.shape == (2, 3, 20, 60) and sizes.tolist() == [[20, 60], [12, 16]]
    assert images[0, 0, :, :18].min() > 240 and images[0, 2, :, 42:].min() > 240
    assert torch.equal(images[1, :, :12, :16], torch.from_numpy(np.array(Image.open(small))).permute(2, 0, 1))
    assert (images[1, :, 12:] == 0).all() and (images[1, :, :, 16:] == 0).all()


def test_bad_files_are_skipped_and_reported(tmp_path: Path, digits_folder: tuple[Path, Path]) -> None:
    good = find_images(digits_folder[0])[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png(tmp_path / "whole.png", 64, 64).read_bytes()[:200])  # header fine, data cut
    store = decode_images([good[0], broken, good[1], empty, truncated, good[2]], side=16)
    assert len(store) == 3 and store.paths == good
    assert len(store.skipped) == 3
    assert (
        str(broken) in store.skipped[0]
        and str(empty) in store.skipped[1]
        and str(truncated) in store.skipped[2]
    )
    images, _ = store.gather(torch.arange(3))
    for row, path in enumerate(good):
        assert torch.equal(images[row], torch.from_numpy(load_resized(path, 16)).permute(2, 0, 1))


def test_over_budget_and_undecodable_folders_raise_user_errors(
    tmp_path: Path, digits_folder: tuple[Path, Path]
) -> None:
    paths = find_images(digits_folder[0])[:10]
    with pytest.raises(UserError, match="memory budget"):
        decode_images(paths, side=32, budget=10 * 3 * 32 * 32 - 1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"junk")
    with pytest.raises(UserError, match="could be decoded"):
        decode_images([broken], side=32)
    with pytest.raises(UserError, match="No image files"):
        decode_images([], side=32)


def test_store_device_is_the_cpu_without_a_gpu() -> None:
    assert store_device(1000, torch.device("cpu")) == torch.device("cpu")


def store_of(count: int) -> ImageStore:
    """uint8 images whose first pixel is their own index, so batches can be traced back."""
    images = torch.zeros(count, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    return ImageStore(images.flatten(), torch.arange(count) * 192, torch.tensor([[8, 8]] * count),
                      [Path(f"{index}.png") for index in range(count)])  # fmt: skip


def test_batches_follow_the_epoch_order_and_carry_their_step_seed() -> None:
    order = EpochOrder(50, batch_size=8, seed=3)
    batches = MemoryBatches(store_of(50), order, "cpu", labels=torch.arange(50) % 5)
    assert len(batches) == 6
    expected = list(EpochOrder(50, batch_size=8, seed=3))
    seen = list(batches)
    for step, batch in enumerate(seen):
        assert batch.indices.tolist() == expected[step]
        assert batch.images.shape == (8, 3, 8, 8) and batch.sizes.tolist() == [[8, 8]] * 8
        assert torch.equal(batch.images[:, 0, 0, 0].long(), batch.indices)
        assert torch.equal(batch.labels, batch.indices % 5)  # type: ignore[arg-type]
        assert batch.bad == [] and batch.seed == order.view_seed(step)
    batches.set_epoch(1, first_step=4)
    resumed = list(batches)
    order.set_epoch(1)
    assert [batch.indices.tolist() for batch in resumed] == list(order)[4:]
    assert [batch.seed for batch in resumed] == [order.view_seed(4), order.view_seed(5)]


def test_too_few_images_for_one_global_batch_is_refused() -> None:
    with pytest.raises(UserError, match="larger than the 10 decoded images"):
        MemoryBatches(store_of(10), EpochOrder(10, batch_size=6, world_size=2), "cpu")


def test_sideways_phone_photos_are_stored_upright(tmp_path: Path) -> None:
    """A JPEG with EXIF Orientation 6 (camera turned a quarter) is stored as PIL's exif_transpose
    shows it, at the upright extent its header promised (no "size differs from its header")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(_png(tmp_path / "raw.png", 20, 40)).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    store = decode_images([tmp_path / "photo.jpg"], side=64)
    assert store.skipped == [] and store.sizes.tolist() == [[40, 20]]
    with Image.open(tmp_path / "photo.jpg") as stored:
        expected = torch.from_numpy(np.array(ImageOps.exif_transpose(stored).convert("RGB"))).permute(2, 0, 1)
    images, _ = store.gather(torch.tensor([0]))
    assert torch.equal(images[0], expected)
