"""Cost-aware choice: turn per-expert quality estimates into a pick and a fallback order.

The rule, applied at routing time so one trained router serves every budget::

    choose argmax_j  quality_j - cost_weight * cost_j

over the experts that are observed (quality not NaN), allowed, and priced at or
under ``max_cost``. Utilities within ``1e-12`` of each other count as a tie, and a
tie goes to the cheaper expert. If no allowed expert fits under ``max_cost`` the
cheapest allowed expert is chosen (a budget never leaves a query unanswered).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

TIE_TOLERANCE = 1e-12


def _utilities(quality: np.ndarray, costs: np.ndarray, cost_weight: float,
               max_cost: float | None, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if cost_weight < 0:
        raise ValueError(f"cost_weight must be >= 0, got {cost_weight}")
    quality = np.atleast_2d(np.asarray(quality, dtype=np.float64))
    costs = np.broadcast_to(np.asarray(costs, dtype=np.float64), quality.shape)
    usable = ~np.isnan(quality) & ~np.isnan(costs)
    if allowed is not None:
        usable &= np.broadcast_to(np.asarray(allowed, dtype=bool), quality.shape)
    if not usable.any(axis=1).all():
        row = int(np.flatnonzero(~usable.any(axis=1))[0])
        raise ValueError(f"no usable expert for prompt {row} (all unobserved or disallowed)")
    if max_cost is not None:
        affordable = usable & (costs <= max_cost)
        # A budget no expert meets falls back to the cheapest usable expert.
        cheapest = np.where(usable, costs, np.inf).argmin(axis=1)
        none_fit = ~affordable.any(axis=1)
        affordable[none_fit, cheapest[none_fit]] = True
        usable = affordable
    utility = np.where(usable, np.nan_to_num(quality) - cost_weight * np.nan_to_num(costs), -np.inf)
    return utility, costs


def choose(quality: np.ndarray, costs: np.ndarray, cost_weight: float = 0.0,
           max_cost: float | None = None, allowed: np.ndarray | None = None) -> np.ndarray:
    """Index of the chosen expert for each row of ``quality`` (n_prompts, n_experts)."""
    utility, costs = _utilities(quality, costs, cost_weight, max_cost, allowed)
    best = utility.max(axis=1, keepdims=True)
    tied = utility >= best - TIE_TOLERANCE
    return np.where(tied, costs, np.inf).argmin(axis=1)


def rank(quality: np.ndarray, costs: np.ndarray, cost_weight: float = 0.0,
         max_cost: float | None = None, allowed: np.ndarray | Sequence[bool] | None = None) -> list[int]:
    """All usable experts for one prompt, best first: the pick, then the fallback order."""
    mask = None if allowed is None else np.asarray(allowed, dtype=bool)
    utility, costs = _utilities(np.atleast_2d(quality), costs, cost_weight, max_cost, mask)
    utility, costs = utility[0].copy(), costs[0]
    order: list[int] = []
    # Apply choose's rule repeatedly so the first entry is always choose's pick.
    while np.isfinite(utility).any():
        tied = utility >= utility.max() - TIE_TOLERANCE
        pick = int(np.where(tied, costs, np.inf).argmin())
        order.append(pick)
        utility[pick] = -np.inf
    return order


METADATA_KEY = "torouter"
"""Key under which every adapter and the endpoint put a decision's metadata on a response."""


@dataclass
class Decision:
    """Why one prompt went where it went: the pick, the fallback order and the numbers behind it."""

    expert: str
    ranking: list[str]
    scores: dict[str, float]
    costs: dict[str, float]
    cost_weight: float
    max_cost: float | None = None
    routed_text: str = field(default="", repr=False)

    def as_metadata(self) -> dict:
        return {
            "expert": self.expert,
            "ranking": list(self.ranking),
            "scores": {k: round(float(v), 6) for k, v in self.scores.items()},
            "cost_weight": self.cost_weight,
            "max_cost": self.max_cost,
        }

    def outcome(self, answered_by: str, failures: Mapping[str, BaseException] | None = None,
                forced: bool = False) -> dict:
        """The routing metadata a response carries, the same in every adapter.

        ``expert`` answered; ``chosen`` is the router's pick; ``fallback`` and ``failures``
        say whether, and why, experts earlier in the ranking were passed over; ``forced``
        says the caller named the expert.
        """
        failed = {name: f"{type(exc).__name__}: {exc}" for name, exc in (failures or {}).items()}
        return {**self.as_metadata(), "expert": answered_by, "chosen": self.expert,
                "fallback": bool(failed), "failures": failed, "forced": forced}
