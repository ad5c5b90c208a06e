"""TypiClust and margin selection against plain references on small synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from labelfew.selection import (
    MIN_CLUSTER_SIZE,
    choose_typical,
    choose_uncertain,
    cluster,
    cluster_order,
    margins,
    mean_neighbour_distance,
    mixed_split,
    normalize,
    typicality,
)


def brute_force_typicality(members: np.ndarray, neighbours: int) -> np.ndarray:
    """The paper's formula written out: 1 / (mean distance to the K nearest other points + 1e-5)."""
    neighbours = max(1, min(neighbours, len(members) // 2))
    result = []
    for index, point in enumerate(members):
        others = np.delete(members, index, axis=0)
        distances = np.sort(np.sqrt(((others - point) ** 2).sum(axis=1)))
        result.append(1.0 / (distances[:neighbours].mean() + 1e-5))
    return np.array(result)


def blobs(count: int = 6, per_blob: int = 40, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: (points, blob of each point); blob sizes differ."""
    random = np.random.default_rng(seed)
    centres = random.normal(size=(count, dim)) * 20
    sizes = [per_blob + 5 * index for index in range(count)]
    points = np.concatenate(
        [centre + random.normal(size=(size, dim)) for centre, size in zip(centres, sizes, strict=True)]
    )
    return points.astype(np.float32), np.repeat(np.arange(count), sizes)


@pytest.mark.parametrize(("size", "neighbours"), [(7, 20), (30, 5), (60, 20)])
def test_typicality_matches_brute_force(size: int, neighbours: int) -> None:
    members = np.random.default_rng(size).normal(size=(size, 5)).astype(np.float32)
    expected = brute_force_typicality(members.astype(np.float64), neighbours)
    assert np.allclose(typicality(members, members, neighbours), expected, rtol=1e-3)


def test_chunked_distances_equal_unchunked() -> None:
    members = np.random.default_rng(1).normal(size=(200, 16)).astype(np.float32)
    whole = mean_neighbour_distance(members, members, 10, chunk_elements=10**9)
    for chunk_elements in (1, 200, 999, 5000):
        assert np.allclose(mean_neighbour_distance(members, members, 10, chunk_elements), whole, atol=1e-6)


def test_typical_picks_one_image_per_blob_and_the_densest() -> None:
    points, blob = blobs()
    embeddings = normalize(points)
    clusters = cluster(embeddings, 6, seed=0)
    picks = choose_typical(embeddings, clusters, np.zeros(len(points), bool), budget=6)
    assert sorted(blob[pick.row] for pick in picks) == list(range(6))
    for pick in picks:  # the chosen image is the most typical of its blob
        members = np.flatnonzero(blob == blob[pick.row])
        scores = brute_force_typicality(embeddings[members].astype(np.float64), 20)
        assert members[int(np.argmax(scores))] == pick.row


def test_largest_uncovered_clusters_first_and_covered_ones_skipped() -> None:
    points, blob = blobs()
    embeddings = normalize(points)
    labelled = np.zeros(len(points), bool)
    labelled[np.flatnonzero(blob == 5)[:2]] = True  # the largest blob is covered
    clusters = cluster(embeddings, 6, seed=0)
    picks = choose_typical(embeddings, clusters, labelled, budget=3)
    assert [blob[pick.row] for pick in picks] == [4, 3, 2]
    assert not labelled[[pick.row for pick in picks]].any()


def test_cluster_order_puts_tiny_clusters_last() -> None:
    clusters = np.array([0] * (MIN_CLUSTER_SIZE - 1) + [1] * 10 + [2] * 20)
    assert cluster_order(clusters, np.zeros(len(clusters), bool)) == [2, 1, 0]


def test_budget_above_clusters_goes_round_again_without_repeats() -> None:
    points, _ = blobs(count=3)
    embeddings = normalize(points)
    clusters = cluster(embeddings, 3, seed=0)
    picks = choose_typical(embeddings, clusters, np.zeros(len(points), bool), budget=7)
    rows = [pick.row for pick in picks]
    assert len(rows) == len(set(rows)) == 7
    assert np.bincount(clusters[rows]).tolist() in ([3, 2, 2], [2, 3, 2], [2, 2, 3])


def test_selection_is_deterministic_for_a_seed() -> None:
    points, _ = blobs(per_blob=300)
    embeddings = normalize(points)

    def chosen(seed: int) -> list[int]:
        clusters = cluster(embeddings, 10, seed=seed)
        labelled = np.zeros(len(points), bool)
        return [
            p.row for p in choose_typical(embeddings, clusters, labelled, 10, seed=seed, max_candidates=50)
        ]

    assert chosen(3) == chosen(3)


def test_minibatch_kmeans_above_the_threshold_separates_blobs() -> None:
    points, blob = blobs(per_blob=100)
    clusters = cluster(normalize(points), 6, seed=0, minibatch_above=100)
    assert len({(c, b) for c, b in zip(clusters, blob, strict=True)}) == 6


def test_margins_and_uncertain_spread_over_clusters() -> None:
    probabilities = np.array([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33], [0.6, 0.4, 0.0]])
    assert np.allclose(margins(probabilities), [0.05, 0.85, 0.01, 0.2])
    margin = np.array([0.01, 0.02, 0.03, 0.5, 0.6, 0.04])
    clusters = np.array([0, 0, 0, 1, 1, 2])
    labelled = np.array([False, False, False, False, False, True])
    picks = choose_uncertain(margin, clusters, labelled, budget=3)
    # one per cluster before a second from the most confusing one; the labelled image is never taken
    assert [(p.row, p.cluster) for p in picks] == [(0, 0), (3, 1), (1, 0)]


def test_mixed_split_is_typical_until_a_few_labels_per_class() -> None:
    assert mixed_split(labelled=0, budget=20, classes=10) == (20, 0)
    assert mixed_split(labelled=30, budget=100, classes=10) == (20, 80)
    assert mixed_split(labelled=100, budget=100, classes=10) == (0, 100)
