"""Multi-label maths: targets as bit masks, the per-class sigmoid loss, the metrics evaluate reports
(average precision, macro/micro F1 at a threshold), the threshold chosen on validation, and kNN and
the linear probe per class.

A multi-label image's classes travel through the batches as one int64 bit mask (bit c set: class
c present), so the image sources, which carry one integer label per image, need no second path;
`multi_hot` unpacks it on the device. Hence at most `MAX_CLASSES` classes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from labelfew.probes import PROBE_C_GRID

MAX_CLASSES = 63
"""Classes of a multi-label model: one bit each of a non-negative int64."""
DEFAULT_THRESHOLD = 0.5
"""The sigmoid threshold when no validation images choose one (`--val-fraction 0`)."""
THRESHOLD_GRID = tuple(round(0.05 * step, 2) for step in range(1, 20))
"""Global thresholds tried on validation: 0.05, 0.10, ..., 0.95."""


def bit_mask(indices: Iterable[int]) -> int:
    """The int64 label of an image whose classes are `indices`."""
    return sum(1 << index for index in set(indices))


def multi_hot(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Unpacks bit masks into float 0/1 targets.

    Shape: masks (N,) int64 -> (N, num_classes) float32
    """
    bits = torch.arange(num_classes, device=masks.device)
    return ((masks.long()[:, None] >> bits) & 1).float()


def binary_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over images and classes of −[y log σ(z) + (1 − y) log(1 − σ(z))]: one sigmoid per class.

    Shape: logits (N, C), masks (N,) bit masks -> scalar
    """
    targets = multi_hot(masks, logits.shape[1])
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one class: Σₙ (Rₙ − Rₙ₋₁) Pₙ over the distinct score thresholds, high
    to low (scikit-learn's `average_precision_score`, no interpolation). NaN without a positive.

    Shape: scores (N,), targets (N,) 0/1
    """
    positives = float(targets.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], targets[order].astype(float)
    true_positives = np.cumsum(hits)
    last_of_tie = np.r_[np.nonzero(np.diff(ranked))[0], len(ranked) - 1]  # ties form one threshold
    precision = true_positives[last_of_tie] / (last_of_tie + 1)
    recall = true_positives[last_of_tie] / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_scores(predicted: np.ndarray, targets: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(macro-F1, micro-F1, per-class F1) of 0/1 predictions; a class with no positive and no
    prediction scores 0 (scikit-learn's `zero_division=0`).

    Shape: predicted (N, C), targets (N, C) 0/1
    """
    predicted, targets = predicted.astype(bool), targets.astype(bool)
    true_positive = (predicted & targets).sum(axis=0).astype(float)
    wrong = (predicted ^ targets).sum(axis=0).astype(float)  # false positives + false negatives
    denominator = 2 * true_positive + wrong
    per_class = np.divide(
        2 * true_positive, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    total = 2 * true_positive.sum() + wrong.sum()
    micro = float(2 * true_positive.sum() / total) if total > 0 else 0.0
    return float(per_class.mean()), micro, per_class


def macro_f1(scores: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    """Macro-F1 of `scores > threshold`: a multi-label run's `val_score` (the best-checkpoint metric).

    Shape: scores (N, C) probabilities, targets (N, C) 0/1
    """
    return f1_scores(scores > threshold, targets)[0]


def choose_threshold(scores: np.ndarray, targets: np.ndarray) -> float:
    """The global threshold of `THRESHOLD_GRID` with the best macro-F1 on validation (the one
    nearest 0.5 among equals).

    Shape: scores (N, C) probabilities, targets (N, C) 0/1
    """
    ranked = sorted(THRESHOLD_GRID, key=lambda value: (-macro_f1(scores, targets, value), abs(value - 0.5)))
    return float(ranked[0])


def metrics(
    scores: np.ndarray, targets: np.ndarray, threshold: float, class_names: list[str]
) -> dict[str, object]:
    """evaluate's multi-label numbers: mAP (over the classes with a positive), macro/micro-F1 at
    `threshold`, per-class AP and F1.

    Shape: scores (N, C) probabilities, targets (N, C) 0/1
    """
    per_class_ap = [
        average_precision(scores[:, index], targets[:, index]) for index in range(len(class_names))
    ]
    present = [value for value in per_class_ap if not np.isnan(value)]
    macro, micro, per_class_f1 = f1_scores(scores > threshold, targets)
    return {
        "mAP": float(np.mean(present)) if present else None,
        "macro_f1": macro,
        "micro_f1": micro,
        "threshold": threshold,
        "per_class_ap": {name: (None if np.isnan(value) else value) for name, value in zip(class_names, per_class_ap, strict=True)},
        "per_class_f1": {name: float(value) for name, value in zip(class_names, per_class_f1, strict=True)},
    }  # fmt: skip


def knn_vote_shares(
    bank: torch.Tensor,
    bank_targets: torch.Tensor,
    queries: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Per-class kNN scores: the share of the k nearest neighbours' weights exp(cos / T) that carry
    the class (`labelfew.probes.knn_scores`' vote, one class at a time), in [0, 1].

    Shape: bank (B, D), bank_targets (B, C) 0/1, queries (Q, D) -> (Q, C)
    """
    bank = nn.functional.normalize(bank.float(), dim=1)
    queries = nn.functional.normalize(queries.float(), dim=1)
    similarity, index = (queries @ bank.T).topk(min(k, bank.shape[0]), dim=1)
    weights = (similarity / temperature).exp()
    votes = (weights[:, :, None] * bank_targets.float()[index]).sum(dim=1)
    return votes / weights.sum(dim=1, keepdim=True)


def linear_probe_scores(
    train: np.ndarray, train_targets: np.ndarray, test: np.ndarray, holdout: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, float | None]:
    """One-vs-rest logistic regression on L2-normalised features; returns (P(class) per test image, C).

    One C for all classes, chosen from PROBE_C_GRID by mAP on a seeded random `holdout` of the
    training features (None, and C = 1, when that holdout lacks a positive of some class); a
    class that is always (or never) present in the training features scores its frequency.

    Shape: train (N, D), train_targets (N, C) 0/1, test (Q, D) -> (Q, C)
    """
    train = train / np.linalg.norm(train, axis=1, keepdims=True).clip(1e-12)
    test = test / np.linalg.norm(test, axis=1, keepdims=True).clip(1e-12)
    order = np.random.default_rng(seed).permutation(len(train))
    cut = round(holdout * len(train))
    held, fit = order[:cut], order[cut:]
    chosen: float | None = None
    if cut > 0 and train_targets[held].sum(axis=0).min() > 0 and train_targets[fit].sum(axis=0).min() > 0:

        def held_map(c: float) -> float:
            scores = _one_vs_rest(train[fit], train_targets[fit], train[held], c, seed)
            return float(np.nanmean([average_precision(scores[:, j], train_targets[held][:, j])
                                     for j in range(scores.shape[1])]))  # fmt: skip

        chosen = max(PROBE_C_GRID, key=held_map)
    return _one_vs_rest(train, train_targets, test, chosen or 1.0, seed), chosen


def _one_vs_rest(x: np.ndarray, targets: np.ndarray, test: np.ndarray, c: float, seed: int) -> np.ndarray:
    columns = []
    for column in targets.T:
        if column.min() == column.max():
            columns.append(np.full(len(test), float(column.mean())))
            continue
        model = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, column)
        columns.append(model.predict_proba(test)[:, 1])
    return np.stack(columns, axis=1)


def frozen_rows(start: str, bank_x: torch.Tensor, bank_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                class_names: list[str], settings: dict[str, Any], details: dict[str, Any],
                probe: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """evaluate's kNN (per-class vote share) and one-vs-rest linear probe rows of one backbone's
    features, at `DEFAULT_THRESHOLD` (no validation images choose one for them); `settings`: the
    config's knn_k, knn_temperature, probe_holdout and seed.

    Shape: bank_x (B, D), bank_y (B,) bit masks, test_x (N, D), test_y (N,) bit masks
    """
    count = len(class_names)
    bank_targets, targets = multi_hot(bank_y, count), multi_hot(test_y, count).numpy()
    k, temperature = min(settings["knn_k"], len(bank_x)), settings["knn_temperature"]
    shares = knn_vote_shares(bank_x, bank_targets, test_x, k=k, temperature=temperature)
    rows = [{"method": f"kNN{start}", **metrics(shares.numpy(), targets, DEFAULT_THRESHOLD, class_names),
             "details": {"k": k, "temperature": temperature, **details}}]  # fmt: skip
    if probe:
        scores, c = linear_probe_scores(bank_x.numpy(), bank_targets.numpy(), test_x.numpy(),
                                        holdout=settings["probe_holdout"], seed=settings["seed"])  # fmt: skip
        chosen = c if c is not None else "1.0 (too few labels to choose)"
        rows.append({"method": f"linear probe{start}", **metrics(scores, targets, DEFAULT_THRESHOLD, class_names),
                     "details": {"C": chosen, **details}})  # fmt: skip
    return rows
