"""The typed batch, padding, and the seeded epoch order both image sources share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelfew.data.batches import Batch, EpochOrder, pad_images, step_seed


def test_pad_images_puts_each_image_top_left_and_records_its_size() -> None:
    arrays = [np.full((4, 6, 3), 1, dtype=np.uint8), np.full((5, 3, 3), 2, dtype=np.uint8)]
    images, sizes = pad_images(arrays)
    assert images.shape == (2, 3, 5, 6) and images.dtype == torch.uint8
    assert sizes.tolist() == [[4, 6], [5, 3]]
    assert (images[0, :, :4, :6] == 1).all() and (images[0, :, 4:] == 0).all()
    assert (images[1, :, :5, :3] == 2).all() and (images[1, :, :, 3:] == 0).all()
    tensors, tensor_sizes = pad_images([torch.from_numpy(array).permute(2, 0, 1) for array in arrays])
    assert torch.equal(tensors, images) and torch.equal(tensor_sizes, sizes)


def test_batch_moves_images_and_labels_and_seeds_its_generator() -> None:
    batch = Batch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([[4, 4], [3, 2]]),
                  torch.tensor([5, 7]), torch.tensor([0, 1]), bad=[3], seed=11)  # fmt: skip
    moved = batch.to("cpu")
    assert len(moved) == 2 and moved.bad == [3] and moved.seed == 11
    assert torch.equal(moved.labels, batch.labels)  # type: ignore[arg-type]
    assert torch.equal(batch.generator().get_state(), torch.Generator().manual_seed(11).get_state())


def test_step_seeds_differ_for_nearby_steps_epochs_and_processes() -> None:
    seeds = {step_seed(0, epoch, step, rank) for epoch in range(3) for step in range(20) for rank in range(4)}
    assert len(seeds) == 240 and all(0 <= seed < 2**63 for seed in seeds)
    assert step_seed(1, 2, 3, 0) == step_seed(1, 2, 3, 0)


def test_an_epoch_covers_the_images_once_reshuffles_and_resumes() -> None:
    order = EpochOrder(50, batch_size=8, seed=3)
    assert len(order) == 6  # 48 images, the last incomplete batch dropped
    first = list(order)
    assert all(len(rows) == 8 for rows in first) and len({row for rows in first for row in rows}) == 48
    assert list(order) == first
    order.set_epoch(1)
    second = list(order)
    assert second != first
    order.set_epoch(1, first_step=4)  # a resume inside epoch 1 yields its last two batches
    assert list(order) == second[4:]
    assert len(list(order)) == 6  # and the epoch after it is whole again


def test_processes_take_disjoint_shares_of_each_global_batch() -> None:
    shards = [list(EpochOrder(64, batch_size=4, seed=0, rank=rank, world_size=3)) for rank in range(3)]
    single = list(EpochOrder(64, batch_size=12, seed=0))
    assert all(len(shard) == 5 for shard in shards)
    for step in range(5):
        assert shards[0][step] + shards[1][step] + shards[2][step] == single[step]
    seeds = {EpochOrder(64, 4, seed=0, rank=rank, world_size=3).view_seed(0) for rank in range(3)}
    assert len(seeds) == 3  # each process draws its own views


def test_unshuffled_order_keeps_every_image_and_splits_the_last_batch() -> None:
    order = EpochOrder(10, batch_size=3, shuffle=False, drop_last=False)
    assert list(order) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]] and order.view_seed(0) == 0
    shards = [
        list(EpochOrder(5, 2, rank=rank, world_size=2, shuffle=False, drop_last=False)) for rank in (0, 1)
    ]
    assert shards == [[[0, 1], [4]], [[2, 3]]]


def test_weighted_order_draws_in_proportion_to_the_weights() -> None:
    weights = [1.0] * 90 + [9.0] * 10  # the last ten images as likely as the first ninety
    rows = [row for rows in EpochOrder(100, batch_size=10, seed=0, weights=weights) for row in rows]
    assert len(rows) == 100
    rare = sum(row >= 90 for rows in (EpochOrder(100, 10, seed=seed, weights=weights) for seed in range(20))
               for batch in rows for row in batch)  # fmt: skip
    assert abs(rare / 2000 - 0.5) < 0.05


def test_invalid_orders_are_refused() -> None:
    with pytest.raises(ValueError):
        EpochOrder(10, batch_size=0)
    with pytest.raises(ValueError):
        EpochOrder(10, batch_size=2, rank=2, world_size=2)
