"""kNN, linear probe and metrics against plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelfew.report.tables import metrics_row
from labelfew.stages.evaluate import knn_scores, linear_probe_scores


def knn_reference(bank, bank_labels, queries, num_classes, k, temperature):
    """A plain loop: cosine similarity, k nearest, exp(sim / T) votes."""
    scores = []
    for query in queries:
        similarities = []
        for index, item in enumerate(bank):
            cosine = float(query @ item) / (float(query.norm()) * float(item.norm()))
            similarities.append((cosine, index))
        similarities.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for cosine, index in similarities[: min(k, len(bank))]:
            votes[int(bank_labels[index])] += math.exp(cosine / temperature)
        scores.append(votes)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.1), (5, 0.1), (200, 0.5)])
def test_knn_matches_a_plain_loop(k: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(k)
    bank = torch.randn(30, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,), generator=generator)
    queries = torch.randn(7, 8, generator=generator, dtype=torch.float64)
    got = knn_scores(bank, labels, queries, num_classes=4, k=k, temperature=temperature, chunk=3)
    expected = knn_reference(bank, labels, queries, 4, k, temperature)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_knn_is_scale_invariant_and_finds_identical_points() -> None:
    bank = torch.eye(3)
    scores = knn_scores(bank, torch.tensor([0, 1, 2]), 5 * torch.eye(3), num_classes=3, k=1)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2]


def test_linear_probe_separates_separable_classes_and_chooses_c() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 5
    train_y = np.repeat(np.arange(3), 20)
    train_x = centres[train_y] + rng.normal(size=(60, 3))
    test_y = np.repeat(np.arange(3), 10)
    test_x = centres[test_y] + rng.normal(size=(30, 3))
    scores, chosen = linear_probe_scores(train_x, train_y, test_x, num_classes=3)
    assert chosen is not None
    assert (scores.argmax(axis=1) == test_y).mean() > 0.9
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)


def test_linear_probe_with_one_label_per_class_uses_default_c() -> None:
    train_x = np.array([[1.0, 0.0], [0.0, 1.0]])
    scores, chosen = linear_probe_scores(train_x, np.array([0, 1]), train_x, num_classes=3)
    assert chosen is None
    assert scores.shape == (2, 3)
    assert scores[:, 2].sum() == 0  # a class absent from the bank gets no probability
    assert scores.argmax(axis=1).tolist() == [0, 1]


def test_metrics_row_top1_top5_balanced_and_confusion() -> None:
    names = [str(index) for index in range(6)]
    labels = np.array([0, 0, 0, 1, 2, 3])
    scores = np.zeros((6, 6))
    scores[np.arange(6), [0, 0, 1, 1, 2, 5]] = 1.0  # 4 of 6 right
    scores[5, 3] = 0.5  # the last is right in the top 5
    row = metrics_row("kNN", scores, labels, names, {})
    assert row["top1"] == pytest.approx(4 / 6)
    assert row["top5"] == pytest.approx(1.0)
    # per class: 0 -> 2/3, 1 -> 1, 2 -> 1, 3 -> 0
    assert row["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    assert row["per_class_accuracy"]["0"] == pytest.approx(2 / 3)
    assert row["per_class_accuracy"]["4"] is None
    assert np.array(row["confusion_matrix"]).sum() == 6
    assert row["confusion_matrix"][0][1] == 1


def test_metrics_row_has_no_top5_below_five_classes() -> None:
    row = metrics_row("x", np.eye(2), np.array([0, 1]), ["a", "b"], {})
    assert row["top5"] is None
    assert row["top1"] == 1.0
