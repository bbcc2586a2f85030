"""Cluster router: a prompt is expected to go as its cluster of training prompts went.

k-means (scikit-learn) groups the training prompts' normalised embeddings into
``n_clusters`` clusters; each expert's estimate for a prompt is that expert's mean
score over the prompt's cluster, shrunk toward its mean over all training prompts
by ``prior`` pseudo-observations::

    estimate_cj = (sum of observed scores of j in c + prior * mean_j) / (observed count of j in c + prior)

The estimates are expected scores (calibrated, unlike soft-label outputs), which is
what the cost-aware policy trades against price, and averaging over a whole cluster
keeps the per-prompt noise of binary correctness labels out of them.

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

from ..data import RoutingDataset
from ..encoders import DEFAULT_BACKEND, DEFAULT_ENCODER
from .base import EmbeddingRouter


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ClusterRouter(EmbeddingRouter):
    method = "cluster"
    supports_expert_profiles = True
    # What an added expert's cluster means shrink toward: "difficulty" or "mean" (see the module docstring).
    profile_target = "difficulty"
    # How many pseudo-observations an added expert's cluster means get: "auto" (measured) or "fit" (``prior``).
    profile_prior = "auto"

    def __init__(self, n_clusters: int = 8, prior: float = 5.0, seed: int = 0, encoder: str = DEFAULT_ENCODER,
                 device: str | None = None, backend: str = DEFAULT_BACKEND):
        self.n_clusters = n_clusters
        self.prior = prior
        self.seed = seed
        self.encoder = encoder
        self.device = device
        self.backend = backend

    def _fit(self, dataset: RoutingDataset) -> None:
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if self.prior < 0:
            raise ValueError(f"prior must be >= 0, got {self.prior}")
        from sklearn.cluster import KMeans

        embeddings = _normalise(self._fit_embeddings(dataset))
        k = min(self.n_clusters, len(np.unique(embeddings, axis=0)))
        kmeans = KMeans(n_clusters=k, n_init=4, random_state=self.seed).fit(embeddings)
        overall = dataset.mean_scores()
        scores = np.nan_to_num(dataset.scores)
        table = np.empty((k, len(dataset.experts)))
        sizes = np.bincount(kmeans.labels_, minlength=k)
        for c in range(k):
            members = kmeans.labels_ == c
            observed = dataset.mask[members].sum(axis=0)
            total = scores[members].sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                table[c] = (total + self.prior * overall) / (observed + self.prior)
            # An expert never observed in a cluster (and prior=0) falls back to its overall mean.
            table[c] = np.where(np.isfinite(table[c]), table[c], overall)
        self.centroids_ = kmeans.cluster_centers_.astype(np.float32)
        self.cluster_scores_ = table
        self.fit_info_["cluster_sizes"] = sizes.tolist()

    def clusters(self, embeddings: np.ndarray) -> np.ndarray:
        """Each prompt's cluster: the nearest centroid in Euclidean distance, as k-means assigned them."""
        x = _normalise(embeddings)
        return (2 * x @ self.centroids_.T - (self.centroids_ ** 2).sum(axis=1)).argmax(axis=1)

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
