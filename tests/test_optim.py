"""LARS against hand computations, parameter groups, learning-rate rules and the schedule."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from reference.lars_reference import PerTensorLARS
from torch import nn

from labelfew.optim import (
    LARS,
    build_finetune_optimizer,
    build_optimizer,
    fixmatch_schedule,
    parameter_groups,
    scaled_learning_rate,
    warmup_cosine,
)


def _norm(values: list[float]) -> float:
    return math.sqrt(sum(value * value for value in values))


def _small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, kernel_size=3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 2),
    )


# --- LARS ----------------------------------------------------------------------------------


def test_one_and_two_steps_match_hand_computation() -> None:
    """SimCLR's TF LARS: g = grad + wd*w; trust = eta*|w|/|g|; v = m*v + lr*trust*g; w -= v."""
    weight_decay, trust_coefficient, momentum = 0.1, 0.05, 0.9
    param = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    optimizer = LARS(
        [param],
        lr=0.5,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
    )

    # Step 1, by hand.
    w0, grad1 = [3.0, 4.0], [1.0, -2.0]
    g1 = [grad + weight_decay * w for grad, w in zip(grad1, w0, strict=True)]
    trust1 = trust_coefficient * _norm(w0) / _norm(g1)
    v1 = [0.5 * trust1 * g for g in g1]
    w1 = [w - v for w, v in zip(w0, v1, strict=True)]
    param.grad = torch.tensor(grad1, dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor(w1, dtype=torch.float64))

    # Step 2 with a new learning rate: the buffer keeps the old scaled update (TF formulation).
    grad2 = [0.5, 0.25]
    g2 = [grad + weight_decay * w for grad, w in zip(grad2, w1, strict=True)]
    trust2 = trust_coefficient * _norm(w1) / _norm(g2)
    v2 = [momentum * v + 0.25 * trust2 * g for v, g in zip(v1, g2, strict=True)]
    w2 = [w - v for w, v in zip(w1, v2, strict=True)]
    optimizer.param_groups[0]["lr"] = 0.25
    param.grad = torch.tensor(grad2, dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor(w2, dtype=torch.float64))


def test_trust_ratio_is_one_when_weight_or_gradient_is_zero() -> None:
    zero_weight = torch.zeros(3, requires_grad=True)
    zero_gradient = torch.tensor([1.0, 2.0, 2.0], requires_grad=True)
    optimizer = LARS([zero_weight, zero_gradient], lr=0.1, momentum=0.0)
    zero_weight.grad = torch.tensor([1.0, -1.0, 2.0])
    zero_gradient.grad = torch.zeros(3)
    optimizer.step()
    torch.testing.assert_close(zero_weight.detach(), torch.tensor([-0.1, 0.1, -0.2]))
    torch.testing.assert_close(zero_gradient.detach(), torch.tensor([1.0, 2.0, 2.0]))


def test_eps_is_added_to_the_gradient_norm() -> None:
    param = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    optimizer = LARS([param], lr=1.0, momentum=0.0, trust_coefficient=0.1, eps=3.0)
    param.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    optimizer.step()
    trust = 0.1 * 5.0 / (2.0 + 3.0)
    expected = torch.tensor([3.0, 4.0 - trust * 2.0], dtype=torch.float64)
    torch.testing.assert_close(param.detach(), expected)


def test_excluded_parameters_get_no_decay_and_no_adaptation() -> None:
    """Biases and BN weights follow plain momentum SGD exactly; weights are decayed and adapted."""
    model = _small_model()
    reference = copy.deepcopy(model)
    lr, weight_decay = 0.2, 0.5
    lars = LARS(parameter_groups(model, weight_decay), lr=lr, trust_coefficient=0.01)
    sgd = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    gradients = {
        name: [torch.randn(param.shape, generator=generator) for _ in range(3)]
        for name, param in model.named_parameters()
    }
    for step in range(3):
        for (name, param), reference_param in zip(
            model.named_parameters(), reference.parameters(), strict=True
        ):
            param.grad = gradients[name][step].clone()
            reference_param.grad = gradients[name][step].clone()
        lars.step()
        sgd.step()
        if step == 0:
            for name in ("0.weight", "4.weight"):  # conv and linear weights: one LARS step
                w, grad = initial[name], gradients[name][0]
                decayed = grad + weight_decay * w
                trust = 0.01 * w.norm() / decayed.norm()
                expected = w - lr * trust * decayed
                torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected)

    excluded = {"0.bias", "1.weight", "1.bias", "4.bias"}
    for (name, param), reference_param in zip(model.named_parameters(), reference.parameters(), strict=True):
        if name in excluded:
            torch.testing.assert_close(param, reference_param)
        else:
            assert not torch.allclose(param, reference_param)


def test_closure_is_evaluated_with_gradients_enabled() -> None:
    param = torch.tensor([1.0, -2.0], requires_grad=True)
    optimizer = LARS([param], lr=0.1, trust_coefficient=1.0)

    def closure() -> float:
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss.item()

    assert optimizer.step(closure) == pytest.approx(5.0)
    # grad = 2w, so trust = |w| / |2w| = 0.5 and the step is w - 0.1 * 0.5 * 2w = 0.9 w.
    torch.testing.assert_close(param.detach(), torch.tensor([0.9, -1.8]))


def test_state_dict_round_trip_continues_identically() -> None:
    first, second = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -0.5])
    param = torch.tensor([3.0, 4.0], requires_grad=True)
    optimizer = LARS([param], lr=0.3, weight_decay=0.01)
    param.grad = first.clone()
    optimizer.step()
    resumed_param = param.detach().clone().requires_grad_()
    resumed = LARS([resumed_param], lr=0.3, weight_decay=0.01)
    # deepcopy as saving to a file would: load_state_dict keeps the tensors it is given.
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    param.grad, resumed_param.grad = second.clone(), second.clone()
    optimizer.step()
    resumed.step()
    torch.testing.assert_close(param, resumed_param)


def test_multi_tensor_update_matches_the_per_tensor_loop() -> None:
    """The multi-tensor update against the per-tensor reference loop: decay, exclusions, zero tensors."""
    models = [_small_model(), _small_model()]
    with torch.no_grad():
        for model in models:
            model[0].bias.zero_()  # a zero weight: trust ratio 1
    optimizers = [
        optimizer(parameter_groups(model, weight_decay=1e-4), lr=0.5)
        for model, optimizer in zip(models, (LARS, PerTensorLARS), strict=True)
    ]
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        images = torch.randn(8, 3, 4, 4, generator=generator)
        for model, optimizer in zip(models, optimizers, strict=True):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 / (step + 1)
            model(images).square().mean().backward()
            if step == 1:
                model[4].bias.grad = None  # a tensor without a gradient is left alone
            optimizer.step()
            optimizer.zero_grad()
    for first, second in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(first, second, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -1.0}, "learning rate"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1e-6}, "weight decay"),
        ({"lr": 0.1, "trust_coefficient": 0.0}, "trust coefficient"),
        ({"lr": 0.1, "eps": -1.0}, "eps"),
        ({"lr": 0.1, "lars_adapt": False, "weight_decay": 1e-6}, "lars_adapt=False"),
    ],
)
def test_lars_rejects_bad_hyperparameters(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LARS([torch.zeros(2, requires_grad=True)], **options)


# --- Parameter groups, learning-rate rules, optimizer names ------------------------------------


def test_parameter_groups_split_conv_bn_linear() -> None:
    model = _small_model()
    model[1].bias.requires_grad_(False)  # frozen parameters are left out
    adapted, excluded = parameter_groups(model, weight_decay=1e-6)
    assert {id(p) for p in adapted["params"]} == {id(model[0].weight), id(model[4].weight)}
    assert {id(p) for p in excluded["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[4].bias),
    }
    assert (adapted["weight_decay"], adapted["lars_adapt"]) == (1e-6, True)
    assert (excluded["weight_decay"], excluded["lars_adapt"]) == (0.0, False)
    with pytest.raises(ValueError, match="Weight decay"):
        parameter_groups(model, weight_decay=-1.0)


def test_scaled_learning_rate() -> None:
    assert scaled_learning_rate(None, 512, "linear") == pytest.approx(0.6)
    assert scaled_learning_rate(None, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_learning_rate(0.1, 1024, "linear") == pytest.approx(0.4)
    assert scaled_learning_rate(0.5, 16, "sqrt") == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("base_lr", "batch_size", "rule", "message"),
    [
        (None, 256, "cubic", "Unknown learning-rate rule"),
        (None, 0, "linear", "Batch size"),
        (-0.3, 256, "linear", "Base learning rate"),
    ],
)
def test_scaled_learning_rate_rejects_bad_arguments(
    base_lr: float | None, batch_size: int, rule: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        scaled_learning_rate(base_lr, batch_size, rule)  # type: ignore[arg-type]


def test_build_optimizer_by_name() -> None:
    model = _small_model()
    groups = parameter_groups(model, weight_decay=1e-4)
    lars = build_optimizer("lars", groups, lr=0.6)
    assert isinstance(lars, LARS)
    assert [group["lars_adapt"] for group in lars.param_groups] == [True, False]
    for name in ("sgd", "adamw"):
        optimizer = build_optimizer(name, groups, lr=0.01)
        assert type(optimizer) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
        assert [group["weight_decay"] for group in optimizer.param_groups] == [1e-4, 0.0]
        assert all(group["lr"] == 0.01 for group in optimizer.param_groups)
        assert all("lars_adapt" not in group for group in optimizer.param_groups)
    assert build_optimizer("sgd", groups, lr=0.01, momentum=0.5).param_groups[0]["momentum"] == 0.5
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
        build_optimizer("adam", groups, lr=0.01)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Learning rate"):
        build_optimizer("sgd", groups, lr=-0.01)


def test_sgd_uses_nesterov_momentum_as_simclr_fine_tuning() -> None:
    groups = parameter_groups(_small_model(), weight_decay=0.0)
    assert all(group["nesterov"] for group in build_optimizer("sgd", groups, lr=0.01).param_groups)
    # torch refuses Nesterov without momentum; momentum 0 is plain SGD.
    assert not build_optimizer("sgd", groups, lr=0.01, momentum=0.0).param_groups[0]["nesterov"]


def test_excluded_modules_are_neither_adapted_nor_decayed() -> None:
    model = _small_model()
    adapted, excluded = parameter_groups(model, weight_decay=1e-6, exclude=[model[4]])
    assert {id(p) for p in adapted["params"]} == {id(model[0].weight)}
    assert id(model[4].weight) in {id(p) for p in excluded["params"]}
    assert (excluded["weight_decay"], excluded["lars_adapt"]) == (0.0, False)


def test_fixmatch_decays_the_classifier_weight_and_simclr_fine_tuning_does_not() -> None:
    """FixMatch decays every weight matrix, the final dense one's too (official: every ``kernel``;
    USB: all but biases and BatchNorm); SimCLR's fine-tuning excludes its new head."""
    model = _small_model()

    def decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
        return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}

    fixmatch = decay_of(build_finetune_optimizer("sgd", model, model[4], 5e-4, 0.03, decay_classifier=True))
    simclr = decay_of(build_finetune_optimizer("sgd", model, model[4], 5e-4, 0.03))
    assert (fixmatch[id(model[4].weight)], simclr[id(model[4].weight)]) == (5e-4, 0.0)
    assert fixmatch[id(model[0].weight)] == simclr[id(model[0].weight)] == 5e-4
    for never in (model[4].bias, model[1].weight, model[1].bias, model[0].bias):
        assert fixmatch[id(never)] == simclr[id(never)] == 0.0


# --- Schedule ------------------------------------------------------------------------------


def test_warmup_cosine_shape() -> None:
    warmup_steps, total_steps = 100, 500
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=warmup_steps, total_steps=total_steps)
    factors = []
    for _ in range(total_steps + 3):
        factors.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        scheduler.step()

    assert 0 < factors[0] <= 0.01
    assert factors[warmup_steps - 1] == pytest.approx(1.0)
    assert factors[warmup_steps] == pytest.approx(1.0)
    assert factors[warmup_steps + (total_steps - warmup_steps) // 2] == pytest.approx(0.5)
    assert factors[total_steps] == pytest.approx(0.0, abs=1e-12)
    assert factors[-1] == 0.0
    assert 0 < factors[total_steps - 1] < 1e-4
    warmup, decay = factors[:warmup_steps], factors[warmup_steps:]
    assert all(a < b for a, b in itertools.pairwise(warmup))
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_warmup_cosine_without_warmup_starts_at_peak() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warmup_cosine(optimizer, warmup_steps=0, total_steps=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)


@pytest.mark.parametrize(("warmup_steps", "total_steps"), [(-1, 10), (11, 10), (0, 0)])
def test_warmup_cosine_rejects_bad_steps(warmup_steps: int, total_steps: int) -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(optimizer, warmup_steps=warmup_steps, total_steps=total_steps)


@pytest.mark.parametrize("warmup_fraction", [0.0, 0.1, 0.5])
def test_fixmatch_schedule_reaches_cos_7_pi_16_at_the_last_step_and_stays(warmup_fraction: float) -> None:
    """After a warmup of W steps, FixMatch's cos(7 pi k / 16 K) runs over the K - W steps left: k counts
    from the warmup's end, and the factor is cos(7 pi / 16) from step K on, never lower."""
    total = 40
    warmup = round(warmup_fraction * total)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = fixmatch_schedule(optimizer, total, warmup_fraction).lr_lambdas[0]
    assert [factor(step) for step in range(warmup)] == pytest.approx(
        [(s + 1) / warmup for s in range(warmup)]
    )
    expected = [
        math.cos(7 * math.pi * (step - warmup) / (16 * (total - warmup))) for step in range(warmup, total)
    ]
    assert [factor(step) for step in range(warmup, total)] == pytest.approx(expected)
    end = math.cos(7 * math.pi / 16)
    assert [factor(step) for step in (total, total + 1, 2 * total)] == pytest.approx([end] * 3)
