"""Cost-aware choice: argmax quality - cost_weight * cost, ties to the cheaper, budgets, masks."""

from __future__ import annotations

import numpy as np
import pytest

from torouter.policy import TIE_TOLERANCE, Decision, choose, rank

NAN = float("nan")

# three experts: cheap/weak, mid, pricey/strong
COSTS = np.array([1.0, 2.0, 4.0])
QUALITY = np.array([[0.5, 0.7, 0.8]])


def test_cost_weight_zero_picks_best_quality():
    assert choose(QUALITY, COSTS).tolist() == [2]
    assert rank(QUALITY[0], COSTS) == [2, 1, 0]


def test_cost_weight_trades_quality_for_cost():
    # utilities at w=0.08: 0.42, 0.54, 0.48 -> mid
    assert choose(QUALITY, COSTS, cost_weight=0.08).tolist() == [1]
    assert rank(QUALITY[0], COSTS, cost_weight=0.08) == [1, 2, 0]
    # at w=0.3: 0.2, 0.1, -0.4 -> cheap
    assert choose(QUALITY, COSTS, cost_weight=0.3).tolist() == [0]
    assert rank(QUALITY[0], COSTS, cost_weight=0.3) == [0, 1, 2]


def test_choose_is_per_row():
    q = np.array([[0.5, 0.7, 0.8], [0.9, 0.1, 0.2], [0.1, 0.9, 0.2]])
    assert choose(q, COSTS).tolist() == [2, 0, 1]
    # costs may also be given per row
    per_row = np.array([[1.0, 2.0, 4.0], [5.0, 1.0, 1.0], [1.0, 9.0, 1.0]])
    # utilities: [0.4, 0.5, 0.4], [0.4, 0.0, 0.1], [0.0, 0.0, 0.1]
    assert choose(q, per_row, cost_weight=0.1).tolist() == [1, 0, 2]


def test_exact_tie_goes_to_cheaper_expert():
    q = np.array([[0.6, 0.6, 0.6]])
    costs = np.array([3.0, 1.0, 2.0])
    assert choose(q, costs).tolist() == [1]
    assert rank(q[0], costs) == [1, 2, 0]


def test_tie_created_by_cost_weight_goes_to_cheaper():
    # 0.7 - 1*0.3 == 0.6 - 1*0.2 == 0.4 (up to float rounding)
    q = np.array([[0.7, 0.6]])
    costs = np.array([0.3, 0.2])
    assert choose(q, costs, cost_weight=1.0).tolist() == [1]
    assert rank(q[0], costs, cost_weight=1.0) == [1, 0]


def test_near_tie_within_tolerance_goes_to_cheaper_but_real_gap_does_not():
    costs = np.array([2.0, 1.0])
    assert choose(np.array([[0.5 + 0.5 * TIE_TOLERANCE, 0.5]]), costs).tolist() == [1]
    assert choose(np.array([[0.5 + 1e-9, 0.5]]), costs).tolist() == [0]
    assert rank(np.array([0.5 + 1e-9, 0.5]), costs) == [0, 1]


def test_rank_agrees_with_choose_on_near_ties():
    # utilities differ by 0.2e-12 (< TIE_TOLERANCE): a tie, so the cheaper expert (1) must come first
    q = np.array([0.5 + 0.6e-12, 0.5 + 0.4e-12])
    costs = np.array([2.0, 1.0])
    assert choose(q[None], costs).tolist() == [1]
    assert rank(q, costs)[0] == 1


def test_max_cost_excludes_expensive_experts():
    assert choose(QUALITY, COSTS, max_cost=2.0).tolist() == [1]
    assert rank(QUALITY[0], COSTS, max_cost=2.0) == [1, 0]
    # the budget is inclusive
    assert choose(QUALITY, COSTS, max_cost=4.0).tolist() == [2]


def test_max_cost_no_expert_fits_picks_cheapest_usable():
    assert choose(QUALITY, COSTS, max_cost=0.5).tolist() == [0]
    assert rank(QUALITY[0], COSTS, max_cost=0.5) == [0]
    # the cheapest *usable*: expert 0 is unobserved here, so expert 1 is the fallback
    q = np.array([[NAN, 0.7, 0.8]])
    assert choose(q, COSTS, max_cost=0.5).tolist() == [1]
    # and the cheapest *allowed*
    assert choose(QUALITY, COSTS, max_cost=0.5, allowed=np.array([False, False, True])).tolist() == [2]


def test_nan_quality_is_unusable():
    q = np.array([[0.5, NAN, 0.4], [NAN, NAN, 0.1]])
    assert choose(q, COSTS).tolist() == [0, 2]
    assert rank(q[0], COSTS) == [0, 2]


def test_nan_cost_is_unusable():
    assert choose(QUALITY, np.array([1.0, 2.0, NAN])).tolist() == [1]


def test_no_usable_expert_raises():
    with pytest.raises(ValueError, match="no usable expert for prompt 1"):
        choose(np.array([[0.5, 0.6, 0.7], [NAN, NAN, NAN]]), COSTS)
    with pytest.raises(ValueError, match="no usable expert"):
        rank(QUALITY[0], COSTS, allowed=np.array([False, False, False]))


def test_allowed_mask():
    allowed = np.array([True, True, False])
    assert choose(QUALITY, COSTS, allowed=allowed).tolist() == [1]
    assert rank(QUALITY[0], COSTS, allowed=allowed) == [1, 0]
    per_row = np.array([[True, False, False], [False, False, True]])
    assert choose(np.vstack([QUALITY, QUALITY]), COSTS, allowed=per_row).tolist() == [0, 2]


@pytest.mark.parametrize("fn", [choose, rank])
def test_negative_cost_weight_rejected(fn):
    with pytest.raises(ValueError, match="cost_weight must be >= 0"):
        fn(QUALITY, COSTS, cost_weight=-0.1)


def test_one_dimensional_quality_is_one_prompt():
    assert choose(QUALITY[0], COSTS).tolist() == [2]


def test_decision_metadata():
    d = Decision(expert="b", ranking=["b", "a"], scores={"a": 0.1234567891, "b": 0.9}, costs={"a": 1.0, "b": 2.0},
                 cost_weight=0.5, max_cost=3.0, routed_text="hi")
    assert d.as_metadata() == {"expert": "b", "ranking": ["b", "a"], "scores": {"a": 0.123457, "b": 0.9},
                               "cost_weight": 0.5, "max_cost": 3.0}
    assert "hi" not in repr(d)
