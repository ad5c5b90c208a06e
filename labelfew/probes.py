"""kNN and the linear probe on frozen backbone features: the maths of `labelfew evaluate`.

Both score the backbone's pooled features, never the projection head's output (trap 6 in
DESIGN.md: the head is for the loss; SimCLR arXiv 2002.05709 section 4.2). Pure functions of
feature tensors, so the benchmarks and evaluate share them and the tests check them against
plain loops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch import nn

PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores (Wu et al. 2018, arXiv 1805.01978; DINO's eval_knn).

    Cosine similarity of each query to the bank; the k nearest vote for their class with
    weight exp(similarity / temperature). k is capped by the bank size. DINO (arXiv 2104.14294)
    uses T = 0.07 and reports k = 20 as best; k = 200 with T = 0.1 is the CIFAR protocol of
    Wu et al., which a few-label bank cannot serve (every image then votes, and the classes with
    more labels win). The scores are on the device of `bank` and `queries`.

    Shape: bank (B, D), bank_labels (B,), queries (Q, D) -> scores (Q, num_classes)
    """
    bank = nn.functional.normalize(bank.float(), dim=1)
    queries = nn.functional.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ bank.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, bank_labels.to(similarity.device)[top_index], weights)
        scores.append(votes)
    return torch.cat(scores)


def linear_probe_scores(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    num_classes: int,
    holdout: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, float | None]:
    """Logistic regression on L2-normalised frozen features; returns (scores, chosen C).

    C is chosen from PROBE_C_GRID on a stratified held-out part of the training features, then
    the probe is refit on all of them. With fewer than two examples of a class no split is
    possible and C = 1 is used (the second value is then None).

    Shape: train (N, D), train_labels (N,), test (Q, D) -> scores (Q, num_classes)
    """
    train = train / np.linalg.norm(train, axis=1, keepdims=True).clip(1e-12)
    test = test / np.linalg.norm(test, axis=1, keepdims=True).clip(1e-12)
    counts = np.bincount(train_labels, minlength=num_classes)
    present = counts > 0
    chosen: float | None = None
    if (counts[present] >= 2).all() and holdout > 0 and len(np.unique(train_labels)) > 1:
        fit_x, val_x, fit_y, val_y = train_test_split(
            train,
            train_labels,
            test_size=max(holdout, present.sum() / len(train_labels)),
            stratify=train_labels,
            random_state=seed,
        )
        best = -1.0
        for c in PROBE_C_GRID:
            score = _fit(fit_x, fit_y, c, seed).score(val_x, val_y)
            if score > best:
                best, chosen = score, c
    probe = _fit(train, train_labels, chosen or 1.0, seed)
    scores = np.zeros((test.shape[0], num_classes))
    scores[:, probe.classes_] = probe.predict_proba(test)
    return scores, chosen


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)


def knn_k(requested: int, bank_labels: torch.Tensor, class_names: list[str]) -> tuple[int, dict[str, Any]]:
    """k capped by the smallest class in the bank, and what report.json says about it.

    With more neighbours than the smallest class has images, a query of that class is outvoted by
    the others whatever its features: a bank of 20-30 labels with k = 20 is a majority vote.
    """
    counts = torch.bincount(bank_labels, minlength=len(class_names))
    present = counts[counts > 0]
    smallest = int(present.min()) if len(present) else 1
    if requested <= smallest:
        return requested, {}
    name = class_names[int(torch.where(counts == smallest)[0][0])]
    return smallest, {
        "k_requested": requested,
        "k_cap": f"the bank's smallest class, {name!r}, has {smallest}",
    }
