"""TypiClust and margin selection against plain references on small synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from labelfew.selection import (
    MAX_CLUSTERS,
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


def reference_typiclust(
    embeddings: np.ndarray, clusters: np.ndarray, labelled_rows: list[int], budget: int
) -> list[int]:
    """The selection loop of the authors' code (avihu111/TypiClust, deep-al/pycls/al/typiclust.py)
    written out: drop clusters of <= 5 images (labelled ones count), order the rest by labelled count
    then size (largest first, ties by cluster id), and take pick i from cluster i mod (clusters left):
    the most typical of its images not labelled or picked yet, K = min(20, half of them)."""
    ids, sizes = np.unique(clusters, return_counts=True)
    labelled_counts = np.bincount(clusters[labelled_rows], minlength=ids.max() + 1)[ids]
    kept = [(labelled_counts[i], -sizes[i], ids[i]) for i in range(len(ids)) if sizes[i] > 5]
    order = [cluster_id for _, _, cluster_id in sorted(kept)]
    remaining = clusters.copy()
    remaining[labelled_rows] = -1
    selected = []
    for i in range(budget):
        rows = np.flatnonzero(remaining == order[i % len(order)])
        scores = brute_force_typicality(embeddings[rows].astype(np.float64), min(20, len(rows) // 2))
        selected.append(int(rows[np.argmax(scores)]))
        remaining[selected[-1]] = -1
    return selected


def blobs_and_outliers(outliers: int = 10, seed: int = 0) -> np.ndarray:
    """`blobs()` plus `outliers` lone points far from the blobs and from each other."""
    points, _ = blobs(seed=seed)
    far = np.random.default_rng(seed + 1).normal(size=(outliers, points.shape[1])) * 80
    return np.concatenate([points, far.astype(np.float32)])


@pytest.mark.parametrize(("labelled_count", "budget"), [(0, 16), (0, 40), (3, 20)])
def test_typical_equals_the_reference_loop_and_never_picks_from_tiny_clusters(
    labelled_count: int, budget: int
) -> None:
    """k = labels + budget as `select` clusters; with no labels every cluster used to get a pick,
    the outliers' single-image clusters included."""
    points = blobs_and_outliers()
    labelled = np.zeros(len(points), bool)
    labelled[np.arange(labelled_count) * 7] = True  # in the first blob
    clusters = cluster(points, budget + labelled_count, seed=0)
    sizes = np.bincount(clusters)
    assert (sizes <= MIN_CLUSTER_SIZE).sum() >= 5  # the outliers do form tiny clusters
    picks = choose_typical(points, clusters, labelled, budget)
    expected = reference_typiclust(points, clusters, list(np.flatnonzero(labelled)), budget)
    assert [pick.row for pick in picks] == expected
    assert all(sizes[pick.cluster] > MIN_CLUSTER_SIZE and pick.reason == "typical" for pick in picks)


def test_cluster_order_drops_clusters_of_at_most_min_size() -> None:
    clusters = np.array([0] * MIN_CLUSTER_SIZE + [1] * 10 + [2] * 20 + [3] * (MIN_CLUSTER_SIZE + 1))
    labelled = np.zeros(len(clusters), bool)
    assert cluster_order(clusters, labelled) == [2, 1, 3]
    labelled[np.flatnonzero(clusters == 2)[0]] = True  # a labelled image counts towards the size too
    assert cluster_order(clusters, labelled) == [1, 3, 2]


def test_outlier_picks_only_once_the_larger_clusters_have_no_image_left() -> None:
    """Where the authors' code fails (argmax of an empty cluster), the rest comes from the tiny clusters."""
    points = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    clusters = np.array([0] * 8 + [1, 1, 2, 2, 3, 3, 4, 4])
    picks = choose_typical(points, clusters, np.zeros(16, bool), budget=12)
    assert [pick.reason for pick in picks] == ["typical"] * 8 + ["outlier"] * 4
    assert sorted(pick.row for pick in picks[:8]) == list(range(8))
    assert len({pick.row for pick in picks}) == 12 and {pick.cluster for pick in picks[8:]} == {1, 2, 3, 4}
    assert len(choose_typical(points, clusters, np.zeros(16, bool), budget=16)) == 16


def test_k_means_makes_at_most_max_clusters() -> None:
    assert MAX_CLUSTERS == 500  # TypiClust's MAX_NUM_CLUSTERS
    points, _ = blobs()
    assert len(np.unique(cluster(points, 20, seed=0, max_clusters=4))) == 4


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
    # The blobs up to renaming: 6 (cluster, blob) pairs alone also hold for one cluster of everything.
    assert (
        len(set(clusters.tolist())) == 6 and len({(c, b) for c, b in zip(clusters, blob, strict=True)}) == 6
    )


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
