"""`pretrain --queue`: the key queue against a plain list, the momentum update against its formula,
the keys' BatchNorm, the checkpoint round trip, and the checks before any training."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from labelfew.config import PretrainConfig
from labelfew.engine import checkpoint, simclr
from labelfew.engine.key_queue import FILLED, KEYS, POINTER, KeyQueue
from labelfew.errors import UserError
from labelfew.losses import nt_xent_loss
from labelfew.stages import pretrain

DIM = 8


def _model() -> nn.Module:
    config = PretrainConfig(data=Path("unused"), arch="test_resnet", small_stem=True, image_size=32,
                            projection_dim=DIM)  # fmt: skip
    torch.manual_seed(0)
    return pretrain.build_model(config)


class _Linear(nn.Module):
    """A projection without BatchNorm, for the queue's bookkeeping alone."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(DIM, DIM)

    def forward(self, images: Tensor) -> Tensor:
        return self.layer(images)


def _reference_queue(batches: list[Tensor], size: int) -> tuple[Tensor, int]:
    """A plain first-in first-out list: row i holds the i-th key ever queued, modulo `size`, and only
    the last `size` keys survive; returns (rows, filled)."""
    rows: dict[int, Tensor] = {}
    written = 0
    for batch in batches:
        for key in batch:
            rows[written % size] = key
            written += 1
    filled = min(written, size)
    return torch.stack([rows[row] for row in range(filled)]) if filled else torch.empty(0, DIM), filled


@pytest.mark.parametrize(
    ("size", "counts"), [(10, [4, 4, 4, 4]), (6, [4]), (5, [12, 2]), (7, [3, 3, 3, 3, 3])]
)
def test_queue_keeps_the_last_keys_and_uses_only_filled_rows(size: int, counts: list[int]) -> None:
    queue = KeyQueue(_Linear(), size=size, dim=DIM, momentum=0.9)
    generator = torch.Generator().manual_seed(size)
    batches = []
    for count in counts:
        batch = torch.randn(count, DIM, generator=generator)
        queue.enqueue(batch)
        batches.append(batch)
        expected, filled = _reference_queue(batches, size)
        assert queue.filled == filled  # warm-up: fewer keys than K made so far
        assert torch.equal(queue.negatives(), expected)
    assert queue.pointer == sum(counts) % size


def test_momentum_update_follows_the_formula_and_the_ramp_reaches_one() -> None:
    online = _Linear()
    queue = KeyQueue(online, size=4, dim=DIM, momentum=0.99)
    before = queue.module.layer.weight.detach().clone()
    with torch.no_grad():
        online.layer.weight.add_(1.0)
    queue.update(online)
    expected = 0.99 * before + 0.01 * online.layer.weight.detach()
    torch.testing.assert_close(queue.module.layer.weight, expected, rtol=0, atol=1e-7)
    assert queue.current_decay() == 0.99  # constant (MoCo v2), no warmup
    ramped = KeyQueue(online, size=4, dim=DIM, momentum=0.99, ramp_steps=10)
    decays = []
    for _ in range(11):
        decays.append(ramped.current_decay())
        ramped.update(online)
    assert decays[0] == pytest.approx(0.99) and decays[5] == pytest.approx(0.995) and decays[10] == 1.0
    assert all(a <= b for a, b in itertools.pairwise(decays))
    assert decays[3] == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.3) + 1) / 2)


def test_keys_use_the_batch_statistics_as_the_online_pass_does() -> None:
    """The BatchNorm choice: at the first step the copy equals the online model and runs in train mode
    over the same views, so its keys are the online projections exactly; running statistics (eval
    mode) would give other keys. The online model's own BatchNorm statistics are left alone."""
    model = _model().train()
    queue = KeyQueue(model, size=64, dim=DIM, momentum=0.999)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    running = [buffer.clone() for buffer in model.buffers()]
    keys = queue.encode(images)
    assert all(torch.equal(a, b) for a, b in zip(running, model.buffers(), strict=True))
    online = nn.functional.normalize(model(images).detach(), dim=1)
    first, second = online.chunk(2)
    torch.testing.assert_close(keys, torch.cat([first, second]), rtol=0, atol=1e-6)
    evaluated = nn.functional.normalize(model.eval()(images).detach(), dim=1)
    assert (keys - evaluated).abs().max() > 1e-2


def test_step_contrasts_with_this_steps_keys_and_the_earlier_queue_then_adds_its_keys() -> None:
    model = _model().train()
    queue = KeyQueue(model, size=20, dim=DIM, momentum=0.999)
    queue.enqueue(torch.randn(6, DIM, generator=torch.Generator().manual_seed(2)))
    earlier = queue.negatives().clone()

    def views(images: Tensor, sizes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return images.float() / 255, images.flip(-1).float() / 255

    images = torch.randint(
        0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    batch = type("B", (), {"images": images, "sizes": None, "generator": lambda self: torch.Generator()})()
    torch.manual_seed(4)
    loss, count = pretrain.contrastive_step(0.5, False, views, queue)(model, batch)  # type: ignore[arg-type]
    assert count == 8 and queue.filled == 14
    first, second = views(images, images, torch.Generator())
    z1, z2 = model(torch.cat([first, second])).chunk(2)
    keys = torch.cat([z1, z2]).detach()  # the copy still equals the online model: the same keys
    torch.testing.assert_close(loss, nt_xent_loss(z1, z2, 0.5, queue=earlier, keys=keys))
    torch.testing.assert_close(queue.negatives()[6:], nn.functional.normalize(torch.cat([z1, z2]).detach(), dim=1),
                               rtol=0, atol=1e-6)  # fmt: skip


def test_state_dict_round_trip_restores_encoder_queue_and_pointer() -> None:
    online = _Linear()
    queue = KeyQueue(online, size=5, dim=DIM, momentum=0.9)
    queue.enqueue(torch.randn(7, DIM))
    queue.update(online)
    state = queue.state_dict()
    assert {KEYS, POINTER, FILLED} <= set(state)
    restored = KeyQueue(_Linear(), size=5, dim=DIM, momentum=0.9)
    restored.load_state_dict({key: value.clone() for key, value in state.items()}, updates=1)
    assert (restored.pointer, restored.filled, restored.updates) == (queue.pointer, queue.filled, 1)
    assert torch.equal(restored.keys, queue.keys)
    assert torch.equal(restored.module.layer.weight, queue.module.layer.weight)
    with pytest.raises(ValueError, match="queue of shape"):
        KeyQueue(_Linear(), size=6, dim=DIM, momentum=0.9).load_state_dict(state, updates=1)


def test_the_checkpoint_estimate_counts_the_momentum_encoder_and_the_queue() -> None:
    online = _Linear()
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    alone = checkpoint.estimated_bytes(online, optimizer)
    queue = KeyQueue(online, size=1000, dim=DIM, momentum=0.9)
    weights = (DIM * DIM + DIM) * 4
    assert checkpoint.estimated_bytes(online, optimizer, queue) == alone + weights + 1000 * DIM * 4 + 2 * 8


def test_a_queue_longer_than_an_epoch_is_refused_and_off_leaves_the_fingerprint_alone(tmp_path: Path) -> None:
    config = PretrainConfig(data=tmp_path, arch="test_resnet", batch_size=4, epochs=2, warmup_epochs=0)
    simclr.check(PretrainConfig(**{**config.__dict__, "queue": 20}), image_count=10)
    with pytest.raises(UserError, match="--queue 21 holds more keys than an epoch makes"):
        simclr.check(PretrainConfig(**{**config.__dict__, "queue": 21}), image_count=10)
    assert "queue" not in simclr.fingerprint(config, [])
    with pytest.raises(UserError, match="--key-momentum 1"):
        PretrainConfig(data=tmp_path, key_momentum=1.0)
