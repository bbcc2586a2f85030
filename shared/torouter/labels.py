"""Soft labels: the TO-Router training target.

For a prompt with observed expert scores ``s_j`` the label is

    y_j = exp(T * s_j) / sum_k exp(T * s_k)      (k over the observed experts)

and ``y_j = 0`` for unobserved experts. ``T`` (the temperature, 10 in the paper)
sets how sharply the label favours the best expert: ``T -> 0`` gives a uniform
label, large ``T`` a one-hot label on the best expert (shared among ties).
Because ``log y_j = T * s_j - log Z``, a model trained on these labels predicts
scores up to a per-prompt constant: ``s_j ~ log y_j / T + c``. Routers use that to
turn predicted label distributions back into quality estimates.
"""

from __future__ import annotations

import numpy as np

DEFAULT_TEMPERATURE = 10.0


def soft_labels(scores: np.ndarray, mask: np.ndarray | None = None,
                temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """``softmax(T * score)`` per row over the observed experts; 0 where unobserved."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scores = np.asarray(scores, dtype=np.float64)
    if mask is None:
        mask = ~np.isnan(scores)
    if not mask.any(axis=1).all():
        bad = int(np.flatnonzero(~mask.any(axis=1))[0])
        raise ValueError(f"row {bad} has no observed expert score")
    logits = np.where(mask, temperature * np.nan_to_num(scores), -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def quality_from_log_probs(log_probs: np.ndarray, temperature: float, offset: float = 0.0) -> np.ndarray:
    """Invert the soft label: ``log y / T + offset`` estimates each expert's score.

    The per-prompt constant ``log Z / T`` is unknown; it never changes which expert
    wins, so one global ``offset`` (fitted on the training data) only puts the
    estimates back on the score scale for display and budgets.
    """
    return np.asarray(log_probs, dtype=np.float64) / temperature + offset


def fit_offset(log_probs: np.ndarray, scores: np.ndarray, mask: np.ndarray, temperature: float) -> float:
    """The global offset that makes mean estimated and observed scores agree on training data."""
    residual = np.where(mask, np.nan_to_num(scores) - np.asarray(log_probs) / temperature, 0.0)
    return float(residual.sum() / max(int(mask.sum()), 1))
