"""Cluster router: a prompt is expected to go as its cluster of training prompts went.

k-means (scikit-learn) groups the training prompts' normalised embeddings into
``n_clusters`` clusters; each expert's estimate for a prompt is that expert's mean
score over the prompt's cluster, shrunk toward its mean over all training prompts
by ``prior`` pseudo-observations::

    estimate_cj = (sum of observed scores of j in c + prior * mean_j) / (observed count of j in c + prior)

The estimates are expected scores (calibrated, unlike soft-label outputs), which is
what the cost-aware policy trades against price, and averaging over a whole cluster
keeps the per-prompt noise of binary correctness labels out of them.

By default (``n_clusters=None``) the number of clusters is chosen at fit time from
``CLUSTER_GRID`` by cross-validation on the training data: the count whose held-out
prompts, each routed to the expert its cluster rates best, earn the highest mean score.
Too few clusters merge tasks that want different experts; too many average over
prompts too few to rank the experts. The best count depends on the data and the encoder
(RouterDC: 12 with MiniLM, 8 with the static encoder; RouterBench: 32 and 4), so it is
measured rather than fixed; ``fit_info_`` records the choice and every candidate's
held-out score.

The clusters are the prompt side and each expert's column of ``cluster_scores_`` its
profile, so an expert can be added (or re-profiled) from a few hundred scored prompts
and dropped without refitting anything (``add_expert``, ``drop_expert``; see
``routers/profiles.py``). A calibration sample reaches some clusters with a handful of
prompts only, so an added expert's cluster means are shrunk by the same ``prior``
toward a target that already knows how hard each cluster is: its calibration mean,
moved by the other experts' mean profile there (``profile_target = "difficulty"``;
``"mean"`` shrinks toward its calibration mean alone, as ``fit`` does; ``"regression"``
toward a ridge regression on the other experts' profiles), by a number of
pseudo-observations measured from the data (``profile_prior = "auto"``; ``"fit"``
uses ``prior``). The defaults are the best of these on RouterBench and RouterDC
(benchmarks/bench_expert_profiles.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data import RoutingDataset, _masked_mean
from ..encoders import DEFAULT_BACKEND, DEFAULT_ENCODER
from .base import EmbeddingRouter


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


CLUSTER_GRID = (4, 6, 8, 12, 16, 24, 32)
CV_FOLDS = 5
DEFAULT_CLUSTERS = 8  # where the data are too few to cross-validate


def _kmeans(embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means labels and float32 centroids of normalised embeddings (seeded, so refits agree)."""
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(embeddings)
    return kmeans.labels_, kmeans.cluster_centers_.astype(np.float32)


def _nearest(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each normalised embedding's nearest centroid in Euclidean distance, as k-means assigns them."""
    return (2 * embeddings @ centroids.T - (centroids ** 2).sum(axis=1)).argmax(axis=1)


def _cluster_table(labels: np.ndarray, k: int, scores: np.ndarray, prior: float) -> np.ndarray:
    """Each expert's mean observed score per cluster, shrunk toward its overall mean by ``prior``
    pseudo-observations (``scores`` holds NaN where an expert was not observed); a cluster where
    an expert was never observed (and ``prior`` 0) takes its overall mean, NaN if it was never
    observed at all, as ``RoutingDataset.mean_scores`` gives."""
    from .profiles import shrunk_group_means

    observed = ~np.isnan(scores)
    overall = _masked_mean(scores, observed)
    return np.column_stack([
        shrunk_group_means(labels[observed[:, j]], scores[observed[:, j], j], k, prior, np.full(k, overall[j]))
        for j in range(scores.shape[1])])


def cross_validated_routing(embeddings: np.ndarray, scores: np.ndarray, prior: float, grid=CLUSTER_GRID,
                            folds: int = CV_FOLDS, seed: int = 0) -> dict[int, float]:
    """For each cluster count, the mean held-out score of the expert each held-out prompt is routed to.

    That is what routing at cost weight 0 earns, measured without the test data: each fold's
    prompts go to the observed expert with the highest estimate from clusters fitted on the
    other folds. Squared error would favour many small clusters, whose estimates are closer
    on average yet rank experts no better (RouterDC: 32 clusters by squared error, 12 by this).
    Only counts below the distinct prompts of a training fold are tried; none at all when the
    data are too few for ``folds`` folds of at least ``min(grid)`` such prompts.
    """
    n = len(embeddings)
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, folds)
    fit_sets = [np.setdiff1d(order, held) for held in parts]
    room = min((len(np.unique(embeddings[f], axis=0)) for f in fit_sets), default=0) if n >= 2 * folds else 0
    candidates = [k for k in grid if k < room]
    earned = {k: 0.0 for k in candidates}
    routed = 0
    for held, fit in zip(parts, fit_sets):
        observed = ~np.isnan(scores[held])
        rows = observed.any(axis=1)
        routed += int(rows.sum())
        for k in candidates:
            labels, centroids = _kmeans(embeddings[fit], k, seed)
            table = _cluster_table(labels, k, scores[fit], prior)
            estimate = np.where(observed, table[_nearest(embeddings[held], centroids)], -np.inf)
            choice = estimate.argmax(axis=1)
            earned[k] += float(np.nan_to_num(scores[held][np.arange(len(held)), choice])[rows].sum())
    return {k: earned[k] / max(routed, 1) for k in candidates}


class ClusterRouter(EmbeddingRouter):
    method = "cluster"
    supports_expert_profiles = True
    # What an added expert's cluster means shrink toward: "difficulty" or "mean" (see the module docstring).
    profile_target = "difficulty"
    # How many pseudo-observations an added expert's cluster means get: "auto" (measured) or "fit" (``prior``).
    profile_prior = "auto"

    def __init__(self, n_clusters: int | None = None, prior: float = 5.0, seed: int = 0, encoder: str = DEFAULT_ENCODER,
                 device: str | None = None, backend: str = DEFAULT_BACKEND):
        self.n_clusters = n_clusters
        self.prior = prior
        self.seed = seed
        self.encoder = encoder
        self.device = device
        self.backend = backend

    def _fit(self, dataset: RoutingDataset) -> None:
        if self.n_clusters is not None and (isinstance(self.n_clusters, bool) or not isinstance(self.n_clusters, int)
                                            or self.n_clusters < 1):
            raise ValueError(f"n_clusters must be >= 1 or None (chosen by cross-validation), got {self.n_clusters!r}")
        if self.prior < 0:
            raise ValueError(f"prior must be >= 0, got {self.prior}")
        embeddings = _normalise(self._fit_embeddings(dataset))
        distinct = len(np.unique(embeddings, axis=0))
        n_clusters = self.n_clusters
        if n_clusters is None:
            routed = cross_validated_routing(embeddings, dataset.scores, self.prior, seed=self.seed)
            # Ties go to fewer clusters: the simpler partition.
            n_clusters = max(routed, key=lambda k: (routed[k], -k)) if routed else DEFAULT_CLUSTERS
            self.fit_info_["n_clusters"] = n_clusters
            self.fit_info_["n_clusters_chosen_by"] = (
                f"{CV_FOLDS}-fold cross-validation, mean held-out score of the expert each prompt is routed to"
                if routed else f"default {DEFAULT_CLUSTERS}: too few prompts to cross-validate")
            self.fit_info_["n_clusters_cv_score"] = {str(k): round(v, 6) for k, v in routed.items()}
        labels, centroids = _kmeans(embeddings, min(n_clusters, distinct), self.seed)
        self.centroids_ = centroids
        self.cluster_scores_ = _cluster_table(labels, len(centroids), dataset.scores, self.prior)
        self.fit_info_["cluster_sizes"] = np.bincount(labels, minlength=len(centroids)).tolist()

    def clusters(self, embeddings: np.ndarray) -> np.ndarray:
        """Each prompt's cluster: the nearest centroid in Euclidean distance, as k-means assigned them."""
        return _nearest(_normalise(embeddings), self.centroids_)

    def predict_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return self.cluster_scores_[self.clusters(embeddings)]

    def _set_profile(self, column: int, scored: RoutingDataset, scores: np.ndarray,
                     embeddings: np.ndarray | None) -> None:
        from .profiles import difficulty_target, empirical_prior, regression_target, shrunk_group_means

        if self.profile_target not in ("regression", "difficulty", "mean"):
            raise ValueError(f"profile_target must be 'regression', 'difficulty' or 'mean', "
                             f"got {self.profile_target!r}")
        if self.profile_prior not in ("auto", "fit"):
            raise ValueError(f"profile_prior must be 'auto' or 'fit', got {self.profile_prior!r}")
        x = self._embed(scored.texts()) if embeddings is None else embeddings
        groups = self.clusters(x)
        k = len(self.centroids_)
        others = np.delete(self.cluster_scores_, column, axis=1) if column < self.cluster_scores_.shape[1] \
            else self.cluster_scores_
        if self.profile_target == "regression":
            target = regression_target(groups, scores, others)
        elif self.profile_target == "difficulty":
            target = difficulty_target(groups, scores, others)
        else:
            target = np.full(k, float(scores.mean()))
        prior = self.prior
        if self.profile_prior == "auto":
            sizes = self.fit_info_.get("cluster_sizes")
            measured = empirical_prior(scores, target, groups, others,
                                       np.asarray(sizes) if isinstance(sizes, list) and len(sizes) == k else None)
            prior = measured if measured is not None else self.prior
        profile = shrunk_group_means(groups, scores, k, prior, target)
        if column == self.cluster_scores_.shape[1]:
            self.cluster_scores_ = np.column_stack([self.cluster_scores_, profile])
        else:
            self.cluster_scores_ = self.cluster_scores_.copy()
            self.cluster_scores_[:, column] = profile

    def _drop_profile(self, column: int) -> None:
        self.cluster_scores_ = np.delete(self.cluster_scores_, column, axis=1)

    def _get_state(self):
        return {"centroids": self.centroids_, "cluster_scores": self.cluster_scores_}, {}

    def _set_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any], path: Path) -> None:
        from .base import RouterFileError, state_array

        centroids = state_array(arrays, "centroids", (None, None), path)
        table = state_array(arrays, "cluster_scores", (None, None), path)
        if centroids.shape[0] != table.shape[0] or table.shape[1] != len(self.experts_):
            raise RouterFileError(f"{path}: cluster arrays {centroids.shape} / {table.shape} do not match "
                                  f"{len(self.experts_)} experts")
        self.centroids_ = centroids
        self.cluster_scores_ = table
