"""k-nearest-neighbour router: a prompt is expected to go as its nearest training prompts went.

With ``k=1`` this is the paper's 1NN-Router: copy the nearest training prompt's
scores (hence the argmax of its soft label). With larger ``k`` each expert's
estimate is the mean (or similarity-weighted mean) of its scores over the
neighbours where it was observed, an estimate of its expected score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data import RoutingDataset
from ..encoders import DEFAULT_ENCODER
from .base import EmbeddingRouter, RouterFileError, state_array


class KNNRouter(EmbeddingRouter):
    method = "knn"

    def __init__(self, k: int = 1, weights: str = "uniform", encoder: str = DEFAULT_ENCODER,
                 device: str | None = None):
        self.k = k
        self.weights = weights
        self.encoder = encoder
        self.device = device

    def _fit(self, dataset: RoutingDataset) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance', got {self.weights!r}")
        self.embeddings_ = self._fit_embeddings(dataset)
        self.scores_ = dataset.scores.astype(np.float32)
        self.mean_scores_ = dataset.mean_scores()

    def predict_embeddings(self, queries: np.ndarray) -> np.ndarray:
        k = min(self.k, len(self.embeddings_))
        sims = queries @ self.embeddings_.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        neighbour_scores = self.scores_[top]  # (n, k, experts)
        if self.weights == "distance":
            w = np.clip(np.take_along_axis(sims, top, axis=1), 1e-6, None)
        else:
            w = np.ones(top.shape, dtype=np.float64)
        observed = ~np.isnan(neighbour_scores)
        w = w[:, :, None] * observed
        total = w.sum(axis=1)
        estimate = (np.nan_to_num(neighbour_scores) * w).sum(axis=1) / np.maximum(total, 1e-12)
        return np.where(total > 0, estimate, self.mean_scores_[None, :])

    def _get_state(self):
        return {"embeddings": self.embeddings_, "scores": self.scores_, "mean_scores": self.mean_scores_}, {}

    def _set_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any], path: Path) -> None:
        n_experts = len(self.experts_)
        self.embeddings_ = state_array(arrays, "embeddings", (None, None), path)
        self.scores_ = state_array(arrays, "scores", (len(self.embeddings_), n_experts), path)
        self.mean_scores_ = state_array(arrays, "mean_scores", (n_experts,), path)
        if not len(self.embeddings_):
            raise RouterFileError(f"{path}: saved array 'embeddings' is empty")
