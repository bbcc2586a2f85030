"""Reference routers every report compares against: random, best-single and oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data import RoutingDataset
from .base import Router, RouterFileError, state_array


class RandomRouter(Router):
    """Uniform random quality estimates, so the pick at ``cost_weight=0`` is a random expert."""

    method = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _fit(self, dataset: RoutingDataset) -> None:
        self._rng = np.random.default_rng(self.seed)

    def _predict(self, texts: list[str]) -> np.ndarray:
        if not hasattr(self, "_rng"):
            self._rng = np.random.default_rng(self.seed)
        return self._rng.random((len(texts), len(self.experts_)))


class BestSingleRouter(Router):
    """Every prompt gets each expert's mean training score: the best expert on average wins."""

    method = "best-single"

    def __init__(self):
        pass

    def _fit(self, dataset: RoutingDataset) -> None:
        self.mean_scores_ = dataset.mean_scores()

    def _predict(self, texts: list[str]) -> np.ndarray:
        return np.tile(self.mean_scores_, (len(texts), 1))

    def _get_state(self):
        return {"mean_scores": self.mean_scores_}, {}

    def _set_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any], path: Path) -> None:
        self.mean_scores_ = state_array(arrays, "mean_scores", (len(self.experts_),), path)


class OracleRouter(Router):
    """Reads the true scores of the prompts it was fitted on: the upper bound in every report.

    It knows only those prompts; any other prompt is an error.
    """

    method = "oracle"

    def __init__(self):
        pass

    def _fit(self, dataset: RoutingDataset) -> None:
        self.texts_ = dataset.texts()
        self.scores_ = dataset.scores
        self._index = {t: i for i, t in enumerate(self.texts_)}

    def _predict(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            i = self._index.get(text)
            if i is None:
                raise KeyError(f"the oracle only knows the prompts it was fitted on; unknown prompt {text[:60]!r}")
            rows.append(self.scores_[i])
        return np.array(rows)

    def _get_state(self):
        return {"scores": self.scores_}, {"texts": self.texts_}

    def _set_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any], path: Path) -> None:
        texts = extra.get("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RouterFileError(f"{path}: saved state 'texts' must be a list of prompts")
        self.scores_ = state_array(arrays, "scores", (len(texts), len(self.experts_)), path)
        self.texts_ = texts
        self._index = {t: i for i, t in enumerate(self.texts_)}
