"""The moving average of the weights against a hand-written update (FixMatch evaluates it, trap 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from labelfew.engine.ema import ModelEMA


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_each_update_is_decay_times_average_plus_the_rest_times_the_weights_and_buffers_are_copied() -> None:
    torch.manual_seed(0)
    model = _model()
    ema = ModelEMA(model, decay=0.999)
    expected = {name: value.detach().clone() for name, value in model.named_parameters()}
    for n in range(30):
        with torch.no_grad():  # a training step: new weights, and BN statistics from a batch
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model.train()(torch.randn(8, 4))
        decay = min(0.999, (1 + n) / (10 + n))  # TensorFlow's num_updates warmup; 0.999 from n = 8,990
        assert ema.current_decay() == decay
        ema.update(model)
        for name, parameter in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * parameter.detach()
    averaged = dict(ema.module.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(averaged[name], dict(model.named_parameters())[name])
    for (name, buffer), (_, copied) in zip(model.named_buffers(), ema.module.named_buffers(), strict=True):
        assert torch.equal(buffer, copied), name  # running mean, variance and count: the model's own
    assert ema.updates == 30 and not ema.module.training
    assert all(not parameter.requires_grad for parameter in ema.module.parameters())


def test_the_decay_reaches_its_value_and_a_restored_average_goes_on_the_same_way() -> None:
    ema = ModelEMA(_model(), decay=0.999)
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    model = _model()
    restored = ModelEMA(model, decay=0.999)
    restored.load_state_dict(ema.state_dict(), updates=ema.updates)
    ema.update(model)
    restored.update(model)
    for key, value in ema.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert restored.extra_state() == {"updates": 10_001, "decay": 0.999}


def test_a_decay_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(_model(), decay=1.0)
