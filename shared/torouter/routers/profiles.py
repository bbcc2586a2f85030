"""Expert profiles: change a trained router's pool of experts without retraining it.

The expert pool changes every few weeks (a model ships, a price drops, an endpoint
is retired), and answering the whole training set with every expert again for each
change is what makes routers expensive to keep. Routers whose estimates split into a
prompt side (clusters of prompts, neighbouring prompts) and a per-expert profile over
it can instead take a new expert from its scored answers to a small calibration
sample (``torouter calibration-set`` picks one), re-profile an updated expert the
same way, or drop one, leaving the prompt side and every other expert's profile as
they were. ``Router.add_expert`` and ``Router.drop_expert`` use the helpers here; the
``cluster`` and ``knn`` routers implement the profile itself.

Every change is recorded in the router's ``fit_info_["expert_changes"]`` (saved with
it): what was done to which expert, from how many scored prompts, and when.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import RoutingDataset

if TYPE_CHECKING:
    from .base import Router

CHANGES_KEY = "expert_changes"


class ExpertProfileError(ValueError):
    """An expert that cannot be added, replaced or dropped; the message says which and why."""


def calibration_rows(data: RoutingDataset, name: str) -> np.ndarray:
    """Indices of ``data``'s records where expert ``name`` has a score, else ExpertProfileError."""
    if not isinstance(data, RoutingDataset):
        raise TypeError(f"add_expert expects a RoutingDataset, got {type(data).__name__}")
    if not isinstance(name, str) or not name:
        raise ExpertProfileError(f"an expert name must be a non-empty string, got {name!r}")
    if name not in data.experts:
        raise ExpertProfileError(f"expert {name!r} has no responses in the calibration data "
                                 f"(it holds responses of {data.experts}); score its answers first "
                                 "(torouter prepare)")
    rows = np.flatnonzero(data.mask[:, data.experts.index(name)])
    if not len(rows):
        raise ExpertProfileError(f"expert {name!r} has no scored prompts in the calibration data "
                                 f"({len(data)} records, every score missing); score its answers first "
                                 "(torouter prepare, or torouter score)")
    return rows


def calibration_scores(data: RoutingDataset, name: str) -> tuple[RoutingDataset, np.ndarray, float]:
    """The records where ``name`` is scored, its scores there and its mean cost per query there."""
    rows = calibration_rows(data, name)
    j = data.experts.index(name)
    scored = data.subset(rows)
    return scored, data.scores[rows, j].astype(np.float64), float(data.costs[rows, j].mean())


def record_change(router: Router, action: str, name: str, n_prompts: int | None = None) -> None:
    """Append one entry to ``router.fit_info_["expert_changes"]``."""
    entry: dict[str, Any] = {"action": action, "expert": name}
    if n_prompts is not None:
        entry["n_prompts"] = int(n_prompts)
    entry["at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    changes = router.fit_info_.get(CHANGES_KEY)
    router.fit_info_[CHANGES_KEY] = [*changes, entry] if isinstance(changes, list) else [entry]


def unsupported(router: Router, what: str) -> ExpertProfileError:
    """The error of a router whose experts are not separable from its prompt side."""
    from . import ROUTERS

    able = sorted(m for m, cls in ROUTERS.items() if getattr(cls, "supports_expert_profiles", False))
    return ExpertProfileError(
        f"the {router.method!r} router cannot {what} an expert without retraining: its estimates do not "
        f"separate into a prompt side and per-expert profiles. Retrain it on data with every expert, "
        f"or use a router that can ({', '.join(repr(m) for m in able)})")


def shrunk_group_means(groups: np.ndarray, scores: np.ndarray, n_groups: int, prior: float,
                       target: np.ndarray) -> np.ndarray:
    """Each group's mean score, shrunk toward ``target[group]`` by ``prior`` pseudo-observations.

    A group with no scores (and ``prior`` 0) takes its target.
    """
    counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
    totals = np.bincount(groups, weights=scores, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (totals + prior * target) / (counts + prior)
    return np.where(np.isfinite(means), means, target)


def difficulty_target(groups: np.ndarray, scores: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Per-group shrinkage targets for a new expert: its mean, moved by how hard each group is.

    ``others`` is the ``(n_groups, n_experts)`` profile table of the experts already
    there; a group's difficulty is their mean profile there. The new expert's target
    is ``a + b * difficulty``, fitted by least squares to its calibration scores (``b``
    kept in [0, 2], and 0 when the calibration prompts cover a single level of
    difficulty), so a group the sample barely reached borrows from what every other
    expert did there rather than from the new expert's overall mean.
    """
    mean = float(scores.mean())
    if others.size == 0:
        return np.full(len(others), mean)
    difficulty = np.nanmean(others, axis=1)
    x = difficulty[groups]
    spread = float(((x - x.mean()) ** 2).sum())
    slope = float(((x - x.mean()) * (scores - mean)).sum() / spread) if spread > 1e-12 else 0.0
    slope = min(max(slope, 0.0), 2.0)
    return np.clip(mean + slope * (difficulty - x.mean()), 0.0, 1.0)


def add_expert(router: Router, name: str, data: RoutingDataset, embeddings: np.ndarray | None = None) -> None:
    """``Router.add_expert``: profile ``name`` from its scored records in ``data`` (replacing its old profile)."""
    router._check_fitted()
    if not getattr(router, "supports_expert_profiles", False):
        raise unsupported(router, "add")
    rows = calibration_rows(data, name)
    if embeddings is not None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or len(embeddings) != len(data):
            raise ValueError(f"{embeddings.shape} embeddings for {len(data)} calibration records; "
                             "pass one row per record of the calibration data")
        embeddings = embeddings[rows]
    j = data.experts.index(name)
    scores = data.scores[rows, j].astype(np.float64)
    cost = float(data.costs[rows, j].mean())
    replaced = name in router.experts_
    column = router.experts_.index(name) if replaced else len(router.experts_)
    router._set_profile(column, data.subset(rows), scores, embeddings)
    if not replaced:
        router.experts_.append(name)
    router.expert_costs_[name] = cost
    record_change(router, "replaced" if replaced else "added", name, len(rows))


def drop_expert(router: Router, name: str) -> None:
    """``Router.drop_expert``: forget ``name``'s profile; the other experts' estimates are unchanged."""
    router._check_fitted()
    if not getattr(router, "supports_expert_profiles", False):
        raise unsupported(router, "drop")
    if name not in router.experts_:
        raise ExpertProfileError(f"cannot drop expert {name!r}: the router has no profile for it; "
                                 f"its experts are {router.experts_}")
    if len(router.experts_) == 1:
        raise ExpertProfileError(f"cannot drop expert {name!r}: it is the router's only expert")
    column = router.experts_.index(name)
    router._drop_profile(column)
    del router.experts_[column]
    del router.expert_costs_[name]
    record_change(router, "dropped", name)


def empirical_prior(scores: np.ndarray, target: np.ndarray, groups: np.ndarray, others: np.ndarray,
                    sizes: np.ndarray | None = None) -> float | None:
    """Pseudo-observations to shrink a new expert's group means by, estimated from the data (empirical Bayes).

    The variance of one score around its true group mean (``noise``) over the variance
    of true group means around the difficulty-moved target (``spread``). ``spread`` is
    measured on the other experts' profiles (weighted by group ``sizes``), which are
    known well; ``noise`` is what is left of the calibration scores' squared distance
    to their targets once ``spread`` is taken out (at least half of it). None when
    there are no other experts or fewer than three groups.
    """
    n_groups = len(others)
    if others.shape[1] == 0 or n_groups < 3:
        return None
    w = np.ones(n_groups) if sizes is None else np.asarray(sizes, dtype=np.float64)
    difficulty = np.nanmean(others, axis=1)
    x = difficulty - np.average(difficulty, weights=w)
    spreads = []
    for profile in others.T:
        centred = profile - np.average(profile, weights=w)
        slope = float((w * x * centred).sum() / max((w * x * x).sum(), 1e-12))
        spreads.append(float(np.average((centred - slope * x) ** 2, weights=w)))
    spread = float(np.mean(spreads))
    total = float(np.mean((scores - target[groups]) ** 2))
    noise = max(total - spread, total / 2)
    if not spread > 1e-9 or not noise > 0:
        return None
    return noise / spread


RIDGE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def regression_target(groups: np.ndarray, scores: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Per-group shrinkage targets for a new expert from the profiles of the experts already there.

    The new expert's score on a prompt is regressed (ridge, its penalty chosen by
    leave-one-out error over the calibration prompts) on the other experts' profiles
    at the prompt's group, a factorised model whose prompt features are what every
    other expert does there: a new model that behaves like one the router knows (a
    fine-tune of it, a sibling) takes that expert's shape from a few prompts.
    """
    mean = float(scores.mean())
    if others.size == 0 or len(scores) < 3:
        return np.full(len(others), mean)
    features = np.nan_to_num(others[groups], nan=mean)
    centre = features.mean(axis=0)
    f = features - centre
    y = scores - mean
    best: tuple[float, np.ndarray] | None = None
    for penalty in RIDGE_GRID:
        inverse = np.linalg.inv(f.T @ f + penalty * np.eye(f.shape[1]))
        weights = inverse @ f.T @ y
        hat = np.einsum("ij,jk,ik->i", f, inverse, f)
        loo = float((((y - f @ weights) / np.maximum(1 - hat, 1e-6)) ** 2).mean())
        if best is None or loo < best[0]:
            best = (loo, weights)
    assert best is not None
    return np.clip(mean + (np.nan_to_num(others, nan=mean) - centre) @ best[1], 0.0, 1.0)
