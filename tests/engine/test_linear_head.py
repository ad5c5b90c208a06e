"""`finetune --method linear`'s heads: the grid trained in one pass against single heads trained by
a hand-written loop, and the chosen head against scikit-learn's logistic regression."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from labelfew.data.labels import LabeledImages
from labelfew.engine import linear_head
from labelfew.engine.linear_head import HeadSettings, fit_linear, train_heads


def _reference_head(
    features: torch.Tensor, labels: torch.Tensor, classes: int, lr: float, settings: HeadSettings
) -> nn.Linear:
    """One zero-initialised nn.Linear on standardised features, torch.optim.SGD (Nesterov 0.9, decay
    on the weight only), the warmup + cosine factor written out, the same seeded epoch orders."""
    mean, std = features.mean(0), features.std(0, unbiased=False)
    inputs = (features - mean) / std
    layer = nn.Linear(features.shape[1], classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(
        [{"params": [layer.weight], "weight_decay": settings.weight_decay}, {"params": [layer.bias], "weight_decay": 0}],
        lr=lr, momentum=0.9, nesterov=True,
    )  # fmt: skip
    batch = min(settings.batch_size, len(labels))
    total = settings.epochs * math.ceil(len(labels) / batch)
    warmup = max(1, round(settings.warmup_fraction * total)) if settings.warmup_fraction else 0
    generator = torch.Generator().manual_seed(settings.seed)
    step = 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch):
            index = order[start : start + batch]
            factor = (
                (step + 1) / warmup
                if step < warmup
                else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
            )
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            weight = None if settings.class_weights is None else torch.tensor(settings.class_weights)
            loss = nn.functional.cross_entropy(layer(inputs[index]), labels[index], weight=weight,
                                               label_smoothing=settings.label_smoothing)  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():  # back on raw features
        folded = nn.Linear(features.shape[1], classes)
        folded.weight.copy_(layer.weight / std)
        folded.bias.copy_(layer.bias - (layer.weight / std) @ mean)
    return folded


@pytest.mark.parametrize(
    "settings",
    [
        HeadSettings(epochs=3, batch_size=16),
        HeadSettings(
            epochs=4, batch_size=7, weight_decay=1e-2, warmup_fraction=0.3, label_smoothing=0.1, seed=5
        ),
        HeadSettings(epochs=3, batch_size=9, label_smoothing=0.2, class_weights=(0.5, 2.0, 1.25)),
    ],
)
def test_every_head_of_the_grid_is_the_head_trained_alone(settings: HeadSettings) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(45, 6, generator=generator) * 3 + 1
    labels = torch.randint(0, 3, (45,), generator=generator)
    lrs = [0.01, 0.1, 0.7]
    heads = train_heads(features, labels, 3, lrs, settings)
    assert heads.weight.shape == (3, 3, 6) and heads.bias.shape == (3, 3)
    for index, lr in enumerate(lrs):
        reference = _reference_head(features, labels, 3, lr, settings)
        torch.testing.assert_close(heads.layer(index).weight, reference.weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(heads.layer(index).bias, reference.bias, atol=1e-5, rtol=1e-4)


def _blobs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping Gaussian classes in 10 dimensions, off-centre and unevenly scaled."""
    centres = np.random.default_rng(42).normal(size=(3, 10)) * 1.5  # the same classes in every draw
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    features = centres[labels] + rng.normal(size=(count, 10))
    return (features * np.linspace(0.5, 20, 10) + 7).astype(np.float32), labels


def test_the_chosen_head_reaches_what_logistic_regression_reaches() -> None:
    features, labels = _blobs(300, seed=0)
    test_features, test_labels = _blobs(600, seed=1)
    names = ["a", "b", "c"]
    labeled = LabeledImages(
        tuple(Path(f"{i}.png") for i in range(300)), tuple(names[i] for i in labels), Path(".")
    )
    fit = fit_linear(torch.from_numpy(features), labeled, names, None, HeadSettings(epochs=30, batch_size=32))
    ours = (fit.layer(torch.from_numpy(test_features)).argmax(1).numpy() == test_labels).mean()
    theirs = LogisticRegression(max_iter=5000).fit(features, labels).score(test_features, test_labels)
    assert theirs > 0.8  # not trivially separable, not hopeless
    assert ours >= theirs - 0.02
    assert fit.search is not None and len(fit.search["candidates"]) == len(linear_head.LR_FACTORS)
    assert fit.lr == fit.search["chosen"]


def test_the_grid_keeps_the_best_held_out_top1_then_the_lower_loss() -> None:
    scores = [
        linear_head.GridScore(0.1, 1, 10, 0.8, 0.5, 0.4),
        linear_head.GridScore(0.2, 2, 10, 0.8, 0.4, 0.3),
        linear_head.GridScore(0.4, 4, 10, 0.7, 0.1, 0.1),
    ]
    assert max(scores, key=linear_head._rank).lr == 0.2
