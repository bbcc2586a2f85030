"""Cluster router: a prompt is expected to go as its cluster of training prompts went.

k-means (scikit-learn) groups the training prompts' normalised embeddings into
``n_clusters`` clusters; each expert's estimate for a prompt is that expert's mean
score over the prompt's cluster, shrunk toward its mean over all training prompts
by ``prior`` pseudo-observations::

    estimate_cj = (sum of observed scores of j in c + prior * mean_j) / (observed count of j in c + prior)

The estimates are expected scores (calibrated, unlike soft-label outputs), which is
what the cost-aware policy trades against price, and averaging over a whole cluster
keeps the per-prompt noise of binary correctness labels out of them.
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

    def predict_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        # Nearest centroid in Euclidean distance, as k-means assigned the training prompts.
        x = _normalise(embeddings)
        nearest = (2 * x @ self.centroids_.T - (self.centroids_ ** 2).sum(axis=1)).argmax(axis=1)
        return self.cluster_scores_[nearest]

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
