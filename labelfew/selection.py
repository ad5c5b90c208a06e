"""Which images to label first: TypiClust and margin uncertainty, as pure numpy/scikit-learn functions.

TypiClust (Hacohen et al., ICML 2022, arXiv 2202.02794): cluster the self-supervised embeddings
into as many clusters as there will be labels, skip the clusters that labelled images already
cover, and take the most typical image of each remaining cluster, largest cluster first.
Typicality is the inverse mean Euclidean distance to the K nearest neighbours within the cluster
(K = 20, or half the cluster for small ones, as in the authors' code).

At larger budgets the opposite works better: images the model is least sure of (smallest margin
between its top two softmax scores), spread over the clusters so that one confusing region does
not take the whole budget. `mixed_split` says when to switch (the paper's budget phase change).

Every function is deterministic for its seed and works in chunks: no N×N matrix is ever built.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans

NEIGHBOURS = 20  # TypiClust's K for typicality
MIN_CLUSTER_SIZE = 5  # smaller clusters are outliers; TypiClust drops them, here they go last
MINIBATCH_ABOVE = 50_000  # images; above this k-means runs as MiniBatchKMeans
MAX_CANDIDATES = 10_000  # per cluster: a seeded sample of this many is scored in a larger cluster
CHUNK_ELEMENTS = 2**24  # distances held at once (64 MiB of float32)
MIXED_TYPICAL_PER_CLASS = 5  # mixed: typical picks until there are this many labels per class


@dataclass(frozen=True)
class Pick:
    """One chosen image.

    Attributes:
        row: index into the embeddings.
        cluster: its k-means cluster.
        reason: "typical" or "uncertain".
        score: its typicality (1 / mean kNN distance) or its margin (top-1 − top-2 probability).
    """

    row: int
    cluster: int
    reason: str
    score: float


def normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (cosine geometry, as kNN evaluation uses).

    Shape: (N, D) -> (N, D)
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def cluster(
    embeddings: np.ndarray, clusters: int, seed: int, minibatch_above: int = MINIBATCH_ABOVE
) -> np.ndarray:
    """k-means cluster of every row: KMeans for small folders, MiniBatchKMeans above `minibatch_above`.

    Shape: (N, D) -> (N,) integers in [0, clusters)
    """
    clusters = min(clusters, len(embeddings))
    if len(embeddings) > minibatch_above:
        model: KMeans | MiniBatchKMeans = MiniBatchKMeans(
            n_clusters=clusters, batch_size=max(4096, 4 * clusters), n_init=3, random_state=seed
        )
    else:
        model = KMeans(n_clusters=clusters, n_init=3, random_state=seed)
    return np.asarray(model.fit_predict(embeddings), dtype=np.int64)


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def mean_neighbour_distance(
    points: np.ndarray, members: np.ndarray, neighbours: int, chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """Mean Euclidean distance of each point to its `neighbours` nearest members, itself excluded.

    Every point must be one of the members (the one zero distance to itself is dropped). Distances
    are computed for as many points at a time as keep `chunk_elements` values in memory.

    Shape: points (P, D), members (M, D) -> (P,)
    """
    neighbours = min(neighbours, len(members) - 1)
    if neighbours < 1:
        return np.zeros(len(points), dtype=np.float64)
    member_norms = np.einsum("ij,ij->i", members, members)
    result = np.empty(len(points), dtype=np.float64)
    for rows in _chunks(len(points), max(1, chunk_elements // len(members))):
        block = points[rows]
        squared = np.einsum("ij,ij->i", block, block)[:, None] + member_norms[None, :] - 2 * block @ members.T
        nearest = np.partition(np.maximum(squared, 0), neighbours, axis=1)[:, : neighbours + 1]
        distances = np.sort(np.sqrt(nearest), axis=1)[:, 1:]  # the smallest is the point itself
        result[rows] = distances.mean(axis=1)
    return result


def typicality(
    points: np.ndarray,
    members: np.ndarray,
    neighbours: int = NEIGHBOURS,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> np.ndarray:
    """TypiClust's typicality, 1 / (mean distance to the K nearest members + 1e-5).

    K is `neighbours`, or half the members for a small cluster (the authors' rule).

    Shape: points (P, D), members (M, D) -> (P,)
    """
    neighbours = max(1, min(neighbours, len(members) // 2))
    return 1.0 / (mean_neighbour_distance(points, members, neighbours, chunk_elements) + 1e-5)


def _groups(clusters: np.ndarray, available: np.ndarray) -> dict[int, np.ndarray]:
    """Available rows of each cluster, without scanning the rows once per cluster."""
    rows = np.flatnonzero(available)
    order = rows[np.argsort(clusters[rows], kind="stable")]
    ids, starts = np.unique(clusters[order], return_index=True)
    return {int(i): part for i, part in zip(ids, np.split(order, starts[1:]), strict=True)}


def cluster_order(clusters: np.ndarray, labelled: np.ndarray) -> list[int]:
    """Clusters in TypiClust's order: uncovered first, then larger first; tiny clusters last.

    Shape: clusters (N,), labelled (N,) bool
    """
    sizes = np.bincount(clusters)
    covered = np.bincount(clusters[labelled], minlength=len(sizes))
    present = [int(c) for c in np.flatnonzero(sizes)]
    return sorted(present, key=lambda c: (sizes[c] < MIN_CLUSTER_SIZE, covered[c], -sizes[c], c))


def choose_typical(
    embeddings: np.ndarray,
    clusters: np.ndarray,
    labelled: np.ndarray,
    budget: int,
    seed: int = 0,
    neighbours: int = NEIGHBOURS,
    max_candidates: int = MAX_CANDIDATES,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> list[Pick]:
    """TypiClust: the most typical unlabelled image of each cluster, in `cluster_order`.

    When the budget exceeds the clusters the order repeats, each time with typicality recomputed
    among the images not yet taken. In a cluster larger than `max_candidates` a seeded sample of
    that many images is scored (against every member), which bounds the work at 1M images.

    Shape: embeddings (N, D), clusters (N,), labelled (N,) bool
    """
    random = np.random.default_rng(seed)
    taken = labelled.copy()
    picks: list[Pick] = []
    order = cluster_order(clusters, labelled)
    while len(picks) < budget and not taken.all():
        groups = _groups(clusters, ~taken)
        for cluster_id in order:
            if len(picks) == budget:
                break
            members = groups.get(cluster_id)
            if members is None:
                continue
            candidates = members
            if len(members) > max_candidates:
                candidates = np.sort(random.choice(members, size=max_candidates, replace=False))
            scores = typicality(embeddings[candidates], embeddings[members], neighbours, chunk_elements)
            best = int(np.argmax(scores))
            picks.append(Pick(int(candidates[best]), cluster_id, "typical", float(scores[best])))
            taken[candidates[best]] = True
    return picks


def margins(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability: small means the model cannot decide.

    Shape: (N, classes) -> (N,)
    """
    if probabilities.shape[1] < 2:
        return np.ones(len(probabilities))
    top_two = np.partition(probabilities, -2, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def choose_uncertain(
    margin: np.ndarray, clusters: np.ndarray, labelled: np.ndarray, budget: int
) -> list[Pick]:
    """The smallest-margin image of each cluster, most uncertain cluster first, one per cluster a round.

    Shape: margin (N,), clusters (N,), labelled (N,) bool
    """
    by_cluster = {
        cluster_id: rows[np.argsort(margin[rows], kind="stable")]
        for cluster_id, rows in _groups(clusters, ~labelled).items()
    }
    picks: list[Pick] = []
    for round_index in range(max((len(rows) for rows in by_cluster.values()), default=0)):
        heads = [
            (float(margin[rows[round_index]]), c) for c, rows in by_cluster.items() if len(rows) > round_index
        ]
        for value, cluster_id in sorted(heads):
            if len(picks) == budget:
                return picks
            picks.append(Pick(int(by_cluster[cluster_id][round_index]), cluster_id, "uncertain", value))
    return picks


def mixed_split(
    labelled: int, budget: int, classes: int, per_class: int = MIXED_TYPICAL_PER_CLASS
) -> tuple[int, int]:
    """How many of a `mixed` budget are typical and how many uncertain.

    Typical picks until labels and picks together reach `per_class` per class, uncertain ones
    after: TypiClust's low-budget regime ends at a few labels per class (arXiv 2202.02794, fig. 1).
    """
    typical = int(np.clip(per_class * classes - labelled, 0, budget))
    return typical, budget - typical
