"""Multi-label maths against plain references: scikit-learn's AP and F1, the BCE formula by hand,
kNN vote shares by a loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from labelfew.multilabel import (
    average_precision,
    binary_cross_entropy,
    bit_mask,
    choose_threshold,
    f1_scores,
    knn_vote_shares,
    linear_probe_scores,
    macro_f1,
    metrics,
    multi_hot,
)


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_matches_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, size=40)
    targets[0] = 1
    scores = rng.integers(0, 6, size=40) / 5  # many ties
    assert average_precision(scores, targets) == pytest.approx(average_precision_score(targets, scores))


@pytest.mark.parametrize("seed", range(6))
def test_f1_scores_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, size=(30, 5))
    targets[:, 4] = 0  # a class with no positive (and maybe no prediction): zero_division=0
    predicted = rng.integers(0, 2, size=(30, 5))
    predicted[: seed % 2 * 30, 4] = 0
    macro, micro, per_class = f1_scores(predicted, targets)
    assert macro == pytest.approx(f1_score(targets, predicted, average="macro", zero_division=0))
    assert micro == pytest.approx(f1_score(targets, predicted, average="micro", zero_division=0))
    assert per_class == pytest.approx(f1_score(targets, predicted, average=None, zero_division=0))


def test_bit_masks_round_trip_to_multi_hot() -> None:
    masks = torch.tensor([bit_mask([0, 2]), bit_mask([]), bit_mask([62]), bit_mask([1, 1])])
    hot = multi_hot(masks, 63)
    assert hot[0].nonzero().flatten().tolist() == [0, 2]
    assert hot[1].sum() == 0
    assert hot[2].nonzero().flatten().tolist() == [62]
    assert hot[3].nonzero().flatten().tolist() == [1]


def test_binary_cross_entropy_is_the_per_class_sigmoid_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    sets = [[0], [1, 2], [], [0, 1, 2]]
    expected = 0.0
    for row, classes in enumerate(sets):
        for c in range(3):
            p = 1 / (1 + math.exp(-float(logits[row, c])))
            y = 1.0 if c in classes else 0.0
            expected -= y * math.log(p) + (1 - y) * math.log(1 - p)
    masks = torch.tensor([bit_mask(classes) for classes in sets])
    assert float(binary_cross_entropy(logits, masks)) == pytest.approx(expected / 12, rel=1e-5)


def test_knn_vote_shares_match_a_loop() -> None:
    torch.manual_seed(1)
    bank, queries = torch.randn(12, 5), torch.randn(4, 5)
    targets = (torch.rand(12, 3) > 0.5).float()
    shares = knn_vote_shares(bank, targets, queries, k=4, temperature=0.1)
    for q in range(4):
        cosine = [float(torch.nn.functional.cosine_similarity(queries[q], bank[b], dim=0)) for b in range(12)]
        nearest = sorted(range(12), key=lambda b: -cosine[b])[:4]
        weights = {b: math.exp(cosine[b] / 0.1) for b in nearest}
        for c in range(3):
            share = sum(w for b, w in weights.items() if targets[b, c] == 1) / sum(weights.values())
            assert float(shares[q, c]) == pytest.approx(share, rel=1e-4)


def test_threshold_is_the_grid_value_with_the_best_macro_f1() -> None:
    scores = np.array([[0.9, 0.35], [0.3, 0.32], [0.8, 0.1], [0.2, 0.05]])
    targets = np.array([[1, 1], [0, 1], [1, 0], [0, 0]])
    chosen = choose_threshold(scores, targets)
    assert macro_f1(scores, targets, chosen) == 1.0
    assert 0.3 <= chosen < 0.32


def test_probe_separates_separable_classes_and_metrics_name_every_class() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=(80, 3))
    targets[0] = 1
    features = targets * 4.0 + rng.normal(size=(80, 3)) * 0.3 + 0.5
    scores, c = linear_probe_scores(features[:60], targets[:60], features[60:], seed=0)
    assert scores.shape == (20, 3) and c is not None
    result = metrics(scores, targets[60:], 0.5, ["a", "b", "c"])
    assert result["mAP"] > 0.85 and set(result["per_class_ap"]) == {"a", "b", "c"}  # type: ignore[arg-type]
