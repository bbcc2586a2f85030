"""k-nearest-neighbour router: a prompt is expected to go as its nearest training prompts went.

With ``k=1`` this is the paper's 1NN-Router: copy the nearest training prompt's
scores (hence the argmax of its soft label). With larger ``k`` each expert's
estimate is the mean (or similarity-weighted mean) of its scores over the
neighbours where it was observed, an estimate of its expected score.

By default (``k=None``) ``k`` is chosen at fit time by cross-validation on the
training data: the value of ``K_GRID`` whose held-out estimates have the smallest
squared error against the observed scores. One neighbour is a poor default on 0/1
scores (RouterBench: AIQ 0.60 against 0.85 with many neighbours), and the best ``k``
depends on the data's size and noise, so it is measured rather than fixed.
``fit_info_`` records the chosen ``k`` and every candidate's error.

An expert can be added (or re-profiled) from its scores on a calibration sample and
dropped without refitting (``add_expert``, ``drop_expert``; see ``routers/profiles.py``).
An added expert has no scores on the training prompts, so its estimate for a prompt
is its mean over the nearest *calibration* prompts where it was scored, with its own
number of neighbours chosen by the same cross-validation on its calibration scores
(few calibration prompts choose many neighbours: the shrinkage toward its mean). The
other experts' estimates do not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data import RoutingDataset
from ..encoders import DEFAULT_BACKEND, DEFAULT_ENCODER
from .base import EmbeddingRouter, RouterFileError, state_array, state_number

K_GRID = (1, 3, 5, 10, 20, 40, 80, 160)
CV_FOLDS = 5


class KNNRouter(EmbeddingRouter):
    method = "knn"
    supports_expert_profiles = True

    def __init__(self, k: int | None = None, weights: str = "uniform", encoder: str = DEFAULT_ENCODER,
                 device: str | None = None, backend: str = DEFAULT_BACKEND):
        self.k = k
        self.weights = weights
        self.encoder = encoder
        self.device = device
        self.backend = backend

    def _fit(self, dataset: RoutingDataset) -> None:
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance', got {self.weights!r}")
        self.embeddings_ = self._fit_embeddings(dataset)
        self.scores_ = dataset.scores.astype(np.float32)
        self.mean_scores_ = dataset.mean_scores()
        if self.k is None:
            errors = cross_validated_errors(self.embeddings_, self.scores_, self.weights)
            self.k_ = min(errors, key=lambda k: (errors[k], k)) if errors else 1
            self.fit_info_["k"] = self.k_
            self.fit_info_["k_chosen_by"] = f"{CV_FOLDS}-fold cross-validation, squared error of the estimates"
            self.fit_info_["k_cv_error"] = {str(k): round(e, 6) for k, e in errors.items()}
        else:
            self.k_ = self.k
        self._no_profiles()

    def _no_profiles(self) -> None:
        """Calibration prompts of added experts: none yet (``profile_k_`` 0: the expert was trained)."""
        n_experts = self.scores_.shape[1]
        self.profile_embeddings_ = np.zeros((0, self.embeddings_.shape[1]), dtype=np.float32)
        self.profile_scores_ = np.zeros((0, n_experts), dtype=np.float32)
        self.profile_k_ = np.zeros(n_experts, dtype=np.int64)

    def predict_embeddings(self, queries: np.ndarray) -> np.ndarray:
        k = min(self.k_, len(self.embeddings_))
        sims = queries @ self.embeddings_.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        estimate = _estimate(sims, top, self.scores_, self.mean_scores_, self.weights)
        for j in np.flatnonzero(self.profile_k_):
            # An added expert: its neighbours are the calibration prompts where it was scored.
            rows = ~np.isnan(self.profile_scores_[:, j])
            scores = self.profile_scores_[rows, j][:, None]
            k_j = min(int(self.profile_k_[j]), len(scores))
            sims_j = queries @ self.profile_embeddings_[rows].T
            top_j = np.argpartition(-sims_j, k_j - 1, axis=1)[:, :k_j]
            estimate[:, j] = _estimate(sims_j, top_j, scores, self.mean_scores_[j:j + 1], self.weights)[:, 0]
        return estimate

    def _set_profile(self, column: int, scored: RoutingDataset, scores: np.ndarray,
                     embeddings: np.ndarray | None) -> None:
        x = np.asarray(self._embed(scored.texts()) if embeddings is None else embeddings, dtype=np.float32)
        if x.shape[1] != self.embeddings_.shape[1]:
            raise ValueError(f"calibration embeddings have {x.shape[1]} dimensions, the router's "
                             f"{self.embeddings_.shape[1]}; encode them with its encoder ({self.encoder!r}, "
                             f"backend {self.backend!r})")
        y = scores.astype(np.float32)[:, None]
        errors = cross_validated_errors(x, y, self.weights)
        k = min(errors, key=lambda k: (errors[k], k)) if errors else 1
        nan = np.float32(np.nan)
        if column == self.scores_.shape[1]:
            self.scores_ = np.column_stack([self.scores_, np.full(len(self.scores_), nan)])
            self.mean_scores_ = np.append(self.mean_scores_, float(scores.mean()))
            self.profile_scores_ = np.column_stack([self.profile_scores_, np.full(len(self.profile_scores_), nan)])
            self.profile_k_ = np.append(self.profile_k_, k)
        else:
            self.scores_ = self.scores_.copy()
            self.scores_[:, column] = nan
            self.mean_scores_ = self.mean_scores_.copy()
            self.mean_scores_[column] = float(scores.mean())
            self.profile_scores_ = self.profile_scores_.copy()
            self.profile_scores_[:, column] = nan
            self.profile_k_ = self.profile_k_.copy()
            self.profile_k_[column] = k
        new_rows = np.full((len(x), self.scores_.shape[1]), nan, dtype=np.float32)
        new_rows[:, column] = y[:, 0]
        self.profile_embeddings_ = np.vstack([self.profile_embeddings_, x])
        self.profile_scores_ = np.vstack([self.profile_scores_, new_rows])
        self._prune_profile_rows()

    def _drop_profile(self, column: int) -> None:
        self.scores_ = np.delete(self.scores_, column, axis=1)
        self.mean_scores_ = np.delete(self.mean_scores_, column)
        self.profile_scores_ = np.delete(self.profile_scores_, column, axis=1)
        self.profile_k_ = np.delete(self.profile_k_, column)
        self._prune_profile_rows()

    def _prune_profile_rows(self) -> None:
        """Forget calibration prompts no added expert is scored on any more."""
        keep = (~np.isnan(self.profile_scores_)).any(axis=1)
        self.profile_embeddings_ = self.profile_embeddings_[keep]
        self.profile_scores_ = self.profile_scores_[keep]

    def _get_state(self):
        arrays = {"embeddings": self.embeddings_, "scores": self.scores_, "mean_scores": self.mean_scores_}
        if self.profile_k_.any():
            arrays.update(profile_embeddings=self.profile_embeddings_, profile_scores=self.profile_scores_,
                          profile_k=self.profile_k_)
        return arrays, {"k": int(self.k_)}

    def _set_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any], path: Path) -> None:
        n_experts = len(self.experts_)
        self.embeddings_ = state_array(arrays, "embeddings", (None, None), path)
        self.scores_ = state_array(arrays, "scores", (len(self.embeddings_), n_experts), path)
        self.mean_scores_ = state_array(arrays, "mean_scores", (n_experts,), path)
        if not len(self.embeddings_):
            raise RouterFileError(f"{path}: saved array 'embeddings' is empty")
        # Routers saved before k was chosen at fit time hold it in params only.
        k = state_number(extra, "k", path) if "k" in extra else self.k
        if k is None or k != int(k) or k < 1:
            raise RouterFileError(f"{path}: the number of neighbours k must be a whole number >= 1, got {k!r}")
        self.k_ = int(k)
        self._no_profiles()
        if "profile_k" in arrays:  # routers saved before experts could be added have none
            self.profile_k_ = state_array(arrays, "profile_k", (n_experts,), path).astype(np.int64)
            self.profile_embeddings_ = state_array(arrays, "profile_embeddings",
                                                   (None, self.embeddings_.shape[1]), path)
            self.profile_scores_ = state_array(arrays, "profile_scores", (len(self.profile_embeddings_), n_experts),
                                               path)
            if (self.profile_k_ < 0).any():
                raise RouterFileError(f"{path}: saved array 'profile_k' holds a negative number of neighbours")


def _estimate(sims: np.ndarray, top: np.ndarray, scores: np.ndarray, mean_scores: np.ndarray,
              weights: str) -> np.ndarray:
    """Each expert's mean (or similarity-weighted mean) score over the neighbours ``top`` where it was observed."""
    neighbour_scores = scores[top]  # (n, k, experts)
    if weights == "distance":
        w = np.clip(np.take_along_axis(sims, top, axis=1), 1e-6, None)
    else:
        w = np.ones(top.shape, dtype=np.float64)
    observed = ~np.isnan(neighbour_scores)
    w = w[:, :, None] * observed
    total = w.sum(axis=1)
    estimate = (np.nan_to_num(neighbour_scores) * w).sum(axis=1) / np.maximum(total, 1e-12)
    return np.where(total > 0, estimate, mean_scores[None, :])


def cross_validated_errors(embeddings: np.ndarray, scores: np.ndarray, weights: str,
                           grid=K_GRID, folds: int = CV_FOLDS, seed: int = 0) -> dict[int, float]:
    """Mean squared error of each ``k``'s held-out estimates over the observed (prompt, expert) scores.

    Only values of ``k`` below the size of a training fold are tried; the folds are a
    seeded shuffle, so the choice is reproducible.
    """
    n = len(embeddings)
    folds = min(folds, n)
    if folds < 2:
        return {}
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, folds)
    candidates = [k for k in grid if k <= n - max(len(p) for p in parts)] or [1]
    squared = {k: 0.0 for k in candidates}
    count = 0
    for held in parts:
        fit = np.setdiff1d(order, held)
        x_fit, y_fit = embeddings[fit], scores[fit]
        y_held = scores[held]
        observed = ~np.isnan(y_held)
        # An expert never observed among a prompt's neighbours gets its mean over the fold, as in predict.
        observed_fit = ~np.isnan(y_fit)
        fallback = np.nan_to_num(y_fit).sum(axis=0) / np.maximum(observed_fit.sum(axis=0), 1)
        sims = embeddings[held] @ x_fit.T
        kmax = max(candidates)
        top = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
        # Nearest first, so the first k columns are the k nearest.
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1), axis=1)
        for k in candidates:
            estimate = _estimate(sims, top[:, :k], y_fit, fallback, weights)
            squared[k] += float(((estimate - np.nan_to_num(y_held)) ** 2)[observed].sum())
        count += int(observed.sum())
    return {k: squared[k] / max(count, 1) for k in candidates}
