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


def test_with_batchnorm_the_models_momentum_is_one_minus_the_decay_so_statistics_match_the_average() -> None:
    """FixMatch's references set BN momentum to 1 - decay (0.001); here it warms up with the decay, and
    the running mean the average copies is the hand-written EMA of the batch means with those momenta."""
    torch.manual_seed(0)
    model = _model()
    batchnorm = model[1]
    ema = ModelEMA(model, decay=0.999, batchnorm=True)
    expected_mean = batchnorm.running_mean.clone()
    for n in range(20):
        momentum = 1 - min(0.999, (1 + n) / (10 + n))
        assert batchnorm.momentum == pytest.approx(momentum)
        inputs = torch.randn(8, 4) + n
        with torch.no_grad():
            batch_mean = model[0](inputs).mean(dim=0)
        model.train()(inputs)
        expected_mean = (1 - momentum) * expected_mean + momentum * batch_mean
        ema.update(model)
    torch.testing.assert_close(dict(ema.module.named_buffers())["1.running_mean"], expected_mean)
    ema.load_state_dict(ema.state_dict(), updates=10_000)  # a resumed run: the momentum goes with the count
    assert batchnorm.momentum == pytest.approx(0.001)
    plain = _model()
    ModelEMA(plain, decay=0.999).update(plain)
    assert plain[1].momentum == 0.1  # without batchnorm=True the model's own momentum is left
