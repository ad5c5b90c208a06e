"""NT-Xent against a hand-written loop, closed forms, and two real processes (gloo on CPU)."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_distributed
import torch.multiprocessing as torch_multiprocessing
from reference.losses_reference import global_mean, reference_nt_xent, weighted_smoothed_cross_entropy
from torch import Tensor

from labelfew.losses import classification_loss, gather_with_grad, nt_xent_loss


def _loss_and_grads(loss_function, z1: Tensor, z2: Tensor, temperature: float):
    z1 = z1.detach().clone().requires_grad_()
    z2 = z2.detach().clone().requires_grad_()
    loss = loss_function(z1, z2, temperature)
    grad_z1, grad_z2 = torch.autograd.grad(loss, [z1, z2])
    return loss.detach(), grad_z1, grad_z2


@pytest.mark.parametrize("dim", [2, 16, 128])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_matches_reference_loop(batch_size: int, temperature: float, dim: int) -> None:
    generator = torch.Generator().manual_seed(batch_size * 1000 + dim)
    z1 = torch.randn(batch_size, dim, generator=generator, dtype=torch.float64)
    z2 = torch.randn(batch_size, dim, generator=generator, dtype=torch.float64)

    loss, grad_z1, grad_z2 = _loss_and_grads(nt_xent_loss, z1, z2, temperature)
    expected_loss, expected_z1, expected_z2 = _loss_and_grads(reference_nt_xent, z1, z2, temperature)

    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_z1, expected_z1, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_z2, expected_z2, rtol=0, atol=1e-5)


def test_float32_matches_reference_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 16, generator=generator)
    z2 = torch.randn(8, 16, generator=generator)
    expected = reference_nt_xent(z1.double(), z2.double(), 0.1)
    loss = nt_xent_loss(z1, z2, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 16])
def test_identical_embeddings_give_log_2n_minus_1(batch_size: int) -> None:
    # Every similarity is 1, so each anchor's softmax is uniform over 2N - 1 candidates.
    z = torch.ones(batch_size, 8, dtype=torch.float64) * 3.0
    loss = nt_xent_loss(z, z.clone(), temperature=0.5)
    assert loss.item() == pytest.approx(math.log(2 * batch_size - 1), abs=1e-9)


def test_swapping_views_gives_the_same_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 32, generator=generator, dtype=torch.float64)
    z2 = torch.randn(6, 32, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.2), nt_xent_loss(z2, z1, 0.2))


def test_loss_does_not_depend_on_projection_scale() -> None:
    generator = torch.Generator().manual_seed(2)
    z1 = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    z2 = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.5), nt_xent_loss(7 * z1, 0.1 * z2, 0.5))


def test_float32_under_autocast_and_for_half_inputs() -> None:
    generator = torch.Generator().manual_seed(3)
    z1 = torch.randn(4, 8, generator=generator)
    z2 = torch.randn(4, 8, generator=generator)
    expected = nt_xent_loss(z1, z2, 0.1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = nt_xent_loss(z1, z2, 0.1)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected)
    half_loss = nt_xent_loss(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert half_loss.dtype == torch.float32
    torch.testing.assert_close(half_loss, expected, rtol=0, atol=0.05)


@pytest.mark.parametrize("queued", [0, 1, 5, 40])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_keys_and_queue_match_the_reference_loop(batch_size: int, queued: int) -> None:
    """With momentum keys, the positive and the in-batch negatives are keys and the queued keys
    are more negatives in every denominator; no gradient reaches keys or queue."""
    generator = torch.Generator().manual_seed(batch_size * 100 + queued)
    z1, z2 = (torch.randn(batch_size, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    keys = torch.randn(2 * batch_size, 16, generator=generator, dtype=torch.float64).requires_grad_()
    queue = torch.randn(queued, 16, generator=generator, dtype=torch.float64).requires_grad_()

    def with_keys(function):
        return lambda first, second, temperature: function(first, second, temperature, queue=queue, keys=keys)

    loss, grad_z1, grad_z2 = _loss_and_grads(with_keys(nt_xent_loss), z1, z2, 0.2)
    expected_loss, expected_z1, expected_z2 = _loss_and_grads(with_keys(reference_nt_xent), z1, z2, 0.2)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-9)
    torch.testing.assert_close(grad_z1, expected_z1, rtol=0, atol=1e-9)
    torch.testing.assert_close(grad_z2, expected_z2, rtol=0, atol=1e-9)
    nt_xent_loss(z1.requires_grad_(), z2, 0.2, queue=queue, keys=keys).backward()
    assert queue.grad is None and keys.grad is None  # constants of the step (MoCo's stop-gradient)


def test_more_queued_keys_give_a_larger_loss() -> None:
    generator = torch.Generator().manual_seed(5)
    z1, z2 = (torch.randn(4, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    keys, queue = torch.cat([z1, z2]) + 0.1, torch.randn(9, 16, generator=generator, dtype=torch.float64)
    assert nt_xent_loss(z1, z2, 0.2, queue=queue, keys=keys) > nt_xent_loss(z1, z2, 0.2, keys=keys)


def test_keys_equal_to_the_online_views_give_simclrs_loss_with_gradient_through_the_anchors_only() -> None:
    """The same formula: keys equal to the online projections give plain NT-Xent's value, and a
    gradient without the candidates' part (the keys are constants)."""
    generator = torch.Generator().manual_seed(6)
    z1, z2 = (torch.randn(5, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    keys = torch.cat([z1, z2])
    torch.testing.assert_close(
        nt_xent_loss(z1, z2, 0.3, keys=keys), nt_xent_loss(z1, z2, 0.3), rtol=0, atol=1e-12
    )
    _, plain_z1, _ = _loss_and_grads(nt_xent_loss, z1, z2, 0.3)
    _, key_z1, _ = _loss_and_grads(lambda a, b, t: nt_xent_loss(a, b, t, keys=keys), z1, z2, 0.3)
    assert not torch.allclose(key_z1, plain_z1)  # plain NT-Xent also differentiates its candidates


@pytest.mark.parametrize("batch_size", [1, 4])
def test_identical_embeddings_and_keys_give_log_of_all_candidates(batch_size: int) -> None:
    # Every similarity is 1: each anchor's softmax is uniform over 2N - 1 keys and the K queued keys.
    z = torch.ones(batch_size, 8, dtype=torch.float64)
    loss = nt_xent_loss(z, 2 * z, 0.5, queue=torch.full((7, 8), 0.3, dtype=torch.float64),
                        keys=torch.full((2 * batch_size, 8), 4.0, dtype=torch.float64))  # fmt: skip
    assert loss.item() == pytest.approx(math.log(2 * batch_size - 1 + 7), abs=1e-9)


def test_empty_queue_is_plain_nt_xent_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    plain = nt_xent_loss(z1, z2, 0.5)
    assert torch.equal(nt_xent_loss(z1, z2, 0.5, queue=torch.empty(0, 8)), plain)
    assert torch.equal(nt_xent_loss(z1, z2, 0.5, queue=None), plain)


def test_rejects_a_queue_of_another_width_keys_of_another_shape_and_a_queue_without_keys() -> None:
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="queue must have shape"):
        nt_xent_loss(z, z, 0.5, queue=torch.randn(3, 5), keys=torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"keys must have shape \(4, 4\)"):
        nt_xent_loss(z, z, 0.5, keys=torch.randn(2, 4))
    with pytest.raises(ValueError, match="queue needs this step's momentum keys"):
        nt_xent_loss(z, z, 0.5, queue=torch.randn(3, 4))


def test_single_process_gather_is_the_identity() -> None:
    tensor = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(tensor) is tensor


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan")])
def test_rejects_non_positive_temperature(temperature: float) -> None:
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="temperature must be positive"):
        nt_xent_loss(z, z, temperature)


@pytest.mark.parametrize(
    ("shape1", "shape2"), [((2, 4), (3, 4)), ((2, 4), (2, 5)), ((8,), (8,)), ((0, 4), (0, 4))]
)
def test_rejects_bad_shapes(shape1: tuple[int, ...], shape2: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(torch.randn(shape1), torch.randn(shape2), 0.1)


# --- Two processes, gloo on CPU --------------------------------------------------------------

WORLD_SIZE = 2


def _loopback_interface() -> str:
    """Name of the loopback interface ('lo' on Linux, 'lo0' on macOS), for gloo's transport."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def _distributed_worker(
    rank: int, init_file: str, z1_global: Tensor, z2_global: Tensor, out_dir: str
) -> None:
    """Runs in a spawned process: this rank's loss and input gradients, saved to out_dir."""
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    torch_distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=30),
    )
    try:
        local_size = z1_global.shape[0] // WORLD_SIZE
        rows = slice(rank * local_size, (rank + 1) * local_size)
        z1 = z1_global[rows].clone().requires_grad_()
        z2 = z2_global[rows].clone().requires_grad_()
        loss = nt_xent_loss(z1, z2, temperature=0.5)
        loss.backward()
        assert z1.grad is not None and z2.grad is not None
        result = {"loss": loss.detach(), "mean": global_mean(loss)}
        result.update(grad_z1=z1.grad, grad_z2=z2.grad)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch_distributed.destroy_process_group()


def test_two_processes_match_single_process_on_the_global_batch(tmp_path: Path) -> None:
    """Per-rank losses and DDP-averaged gradients equal those of one process on the full batch.

    DDP all-reduces parameter gradients and divides by the world size K, so what each rank
    ends up applying is (1/K) * sum_r dL_r/dtheta, the gradient of the global mean loss
    L = (1/K) * sum_r L_r. The local projections z1, z2 stand in for the parameters here: the
    backward of `gather_with_grad` already sums over ranks the gradients that every L_r sends
    to this rank's rows, so z.grad on rank r is d(sum_s L_s)/dz_r, and dividing it by K
    (DDP's averaging) must give dL/dz_r, the rank's slice of the single-process gradient of
    the loss on the full batch (which is that same mean L over all 2NK anchors).
    """
    generator = torch.Generator().manual_seed(5)
    local_size, dim = 3, 8
    z1_global = torch.randn(WORLD_SIZE * local_size, dim, generator=generator, dtype=torch.float64)
    z2_global = torch.randn(WORLD_SIZE * local_size, dim, generator=generator, dtype=torch.float64)

    torch_multiprocessing.spawn(
        _distributed_worker,
        args=(str(tmp_path / "init"), z1_global, z2_global, str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    full_loss, full_grad_z1, full_grad_z2 = _loss_and_grads(nt_xent_loss, z1_global, z2_global, 0.5)
    for rank, result in enumerate(results):
        rows = slice(rank * local_size, (rank + 1) * local_size)
        torch.testing.assert_close(result["mean"], full_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(result["grad_z1"] / WORLD_SIZE, full_grad_z1[rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(result["grad_z2"] / WORLD_SIZE, full_grad_z2[rows], rtol=0, atol=1e-6)
        # The per-rank loss used the other rank's negatives: it is not the local-batch loss.
        local_only = nt_xent_loss(z1_global[rows], z2_global[rows], 0.5)
        assert abs(result["loss"].item() - local_only.item()) > 1e-3
    average = sum(result["loss"] for result in results) / WORLD_SIZE
    torch.testing.assert_close(average, full_loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("weights", [None, [1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 4.0]])
def test_the_class_weighted_smoothed_cross_entropy_matches_the_formula(
    weights: list[float] | None, smoothing: float
) -> None:
    """`--class-weights` with `--label-smoothing`: PyTorch's semantics against a loop over images and classes."""
    torch.manual_seed(0)
    logits, labels = torch.randn(9, 4) * 3, torch.tensor([0, 1, 1, 2, 3, 3, 3, 0, 2])
    tensor = None if weights is None else torch.tensor(weights)
    loss = classification_loss(logits, labels, smoothing, tensor)
    expected = weighted_smoothed_cross_entropy(logits, labels, weights, smoothing)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    if weights is not None and len(set(weights)) > 1:  # the weights change it
        unweighted = weighted_smoothed_cross_entropy(logits, labels, None, smoothing)
        assert abs(float(unweighted) - float(expected)) > 1e-3
