"""Which images to label first: TypiClust and margin uncertainty, as pure numpy/scikit-learn functions.

TypiClust (Hacohen et al., ICML 2022, arXiv 2202.02794): cluster the self-supervised embeddings
into as many clusters as there will be labels (at most 500), drop the clusters of 5 images or fewer
(outliers), and take the most typical image of each remaining cluster, those with the fewest
labelled images first, then the largest; round again while budget is left. Typicality is the
inverse mean Euclidean distance to the K nearest neighbours within the cluster (K = 20, or half the
cluster for small ones). The constants and the order are those of the authors' code
(avihu111/TypiClust, `deep-al/pycls/al/typiclust.py`); where it would fail (the larger clusters have
no images left for the budget) labelfew fills the rest from the small clusters as "outlier" picks.

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
MIN_CLUSTER_SIZE = 5  # clusters of this many images or fewer are outliers: TypiClust never picks from them
MAX_CLUSTERS = 500  # TypiClust's cap on k-means' k (MAX_NUM_CLUSTERS); past it the picks go round again
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
        reason: "typical", "uncertain", or "outlier" (a typical pick from a cluster of at most
            `MIN_CLUSTER_SIZE` images, made only when the larger clusters ran out of images).
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
    embeddings: np.ndarray,
    clusters: int,
    seed: int,
    minibatch_above: int = MINIBATCH_ABOVE,
    max_clusters: int = MAX_CLUSTERS,
) -> np.ndarray:
    """k-means cluster of every row: KMeans for small folders, MiniBatchKMeans above `minibatch_above`.

    `clusters` is capped at `max_clusters` (TypiClust's 500): at large budgets more clusters would
    each hold a handful of images, too few for typicality to mean density.

    Shape: (N, D) -> (N,) integers in [0, min(clusters, max_clusters))
    """
    clusters = min(clusters, len(embeddings), max_clusters)
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


def cluster_order(clusters: np.ndarray, labelled: np.ndarray, min_size: int = MIN_CLUSTER_SIZE) -> list[int]:
    """The clusters of more than `min_size` images (labelled ones count) in TypiClust's order: fewest
    labelled images first, then larger first. Smaller clusters are outliers and are left out (the
    authors' code drops them; ordering them last would still give each a pick when k = the budget).

    Shape: clusters (N,), labelled (N,) bool
    """
    sizes = np.bincount(clusters)
    covered = np.bincount(clusters[labelled], minlength=len(sizes))
    eligible = [int(c) for c in np.flatnonzero(sizes > min_size)]
    return sorted(eligible, key=lambda c: (covered[c], -sizes[c], c))


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
    """TypiClust: the most typical unlabelled image of each cluster of `cluster_order`, round after round.

    Each round recomputes typicality among the images not yet taken (as the authors' code does when
    the budget exceeds the clusters). Only when those clusters have no image left does the rest of
    the budget come from the clusters of `MIN_CLUSTER_SIZE` images or fewer, in the same way, with
    reason "outlier" (the authors' code fails there). In a cluster larger than `max_candidates` a
    seeded sample of that many images is scored (against every member), which bounds the work at 1M
    images.

    Shape: embeddings (N, D), clusters (N,), labelled (N,) bool
    """
    random = np.random.default_rng(seed)
    taken = labelled.copy()
    eligible = cluster_order(clusters, labelled)
    small = [c for c in cluster_order(clusters, labelled, min_size=0) if c not in set(eligible)]
    picks: list[Pick] = []
    for order, reason in ((eligible, "typical"), (small, "outlier")):
        while len(picks) < budget:
            groups = _groups(clusters, ~taken)
            left = [cluster_id for cluster_id in order if cluster_id in groups]
            if not left:
                break
            for cluster_id in left[: budget - len(picks)]:
                members = groups[cluster_id]
                candidates = members
                if len(members) > max_candidates:
                    candidates = np.sort(random.choice(members, size=max_candidates, replace=False))
                scores = typicality(embeddings[candidates], embeddings[members], neighbours, chunk_elements)
                best = int(np.argmax(scores))
                picks.append(Pick(int(candidates[best]), cluster_id, reason, float(scores[best])))
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
    after. The switch is labelfew's heuristic, not part of TypiClust: the paper (arXiv 2202.02794,
    fig. 1) finds typical picks better at a few labels per class and uncertainty better at many, but
    gives no rule for where the change happens.
    """
    typical = int(np.clip(per_class * classes - labelled, 0, budget))
    return typical, budget - typical
