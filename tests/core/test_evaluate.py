"""AIQ, the upper hull and the evaluation report, on cases small enough to compute by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from torouter.data import Record, RoutingDataset
from torouter.evaluate import (
    edge_cloud_report,
    aiq,
    default_cost_weights,
    evaluate,
    expert_stats,
    hull_shortfall,
    plot,
    point_stats,
    print_report,
    report_rows,
    save_json,
    summary_lines,
    upper_hull,
)
from torouter.routers import make_router
from torouter.routers.base import Router


# --- upper hull ----------------------------------------------------------------------------

def test_upper_hull_drops_points_below_the_chord():
    xs, ys = upper_hull([1, 2, 3], [0.2, 0.3, 0.8])  # (2, 0.3) lies below the chord (1,.2)-(3,.8)
    assert xs.tolist() == [1, 3] and ys.tolist() == [0.2, 0.8]


def test_upper_hull_drops_collinear_points():
    xs, ys = upper_hull([1, 2, 3], [0.2, 0.5, 0.8])
    assert xs.tolist() == [1, 3]


def test_upper_hull_is_flat_right_of_best_point():
    # (3, 0.6) is worse and dearer than (2, 0.9): the curve ends at the best point
    xs, ys = upper_hull([1, 2, 3], [0.5, 0.9, 0.6])
    assert xs.tolist() == [1, 2] and ys.tolist() == [0.5, 0.9]


def test_upper_hull_keeps_best_quality_at_equal_cost():
    xs, ys = upper_hull([1, 1, 2], [0.3, 0.6, 0.7])
    assert xs.tolist() == [1, 2] and ys.tolist() == [0.6, 0.7]


def test_upper_hull_single_point():
    xs, ys = upper_hull([2.0], [0.4])
    assert xs.tolist() == [2.0] and ys.tolist() == [0.4]


@pytest.mark.parametrize("seed", range(5))
def test_upper_hull_properties_on_random_points(seed):
    rng = np.random.default_rng(seed)
    costs, quals = rng.random(25), rng.random(25)
    xs, ys = upper_hull(costs, quals)
    assert np.all(np.diff(xs) > 0)
    assert np.all(np.diff(ys) >= 0), "non-decreasing"
    slopes = np.diff(ys) / np.diff(xs)
    assert np.all(np.diff(slopes) <= 1e-12), "concave (upper convex hull)"
    assert xs[0] == costs.min()
    assert ys[-1] == quals.max()
    # every point lies on or under the curve (flat to the right of the best point)
    at_or_right = costs >= xs[0]
    assert np.all(quals[at_or_right] <= np.interp(costs[at_or_right], xs, ys) + 1e-12)
    # every vertex is one of the points
    assert set(zip(xs.tolist(), ys.tolist())) <= set(zip(costs.tolist(), quals.tolist()))


# --- AIQ -----------------------------------------------------------------------------------

def test_aiq_of_two_experts_by_hand():
    # a straight line from (1, 0.5) to (3, 0.9): mean height 0.7
    assert aiq([1, 3], [0.5, 0.9], 1, 3) == pytest.approx(0.7)


def test_aiq_interpolates_and_stays_flat_by_hand():
    # hull (0.5, .6) -> (2, .9); at c=1 the hull is .6 + .3 * (0.5 / 1.5) = .7
    # area on [1, 2] = (.7 + .9) / 2 = .8, on [2, 3] = .9 (flat) -> 1.7 / 2
    assert aiq([0.5, 2.0], [0.6, 0.9], 1, 3) == pytest.approx(0.85)


def test_aiq_counts_zero_below_cheapest_point():
    # nothing below c=2: [1, 2] contributes 0, [2, 3] contributes (.8 + 1.0) / 2 = .9
    assert aiq([2, 3], [0.8, 1.0], 1, 3) == pytest.approx(0.45)


def test_aiq_ignores_points_outside_range_except_through_the_hull():
    # a point beyond c_max still tilts the hull inside the range: hull (1,.5)-(5,.9), at 3: .7
    # area on [1, 3] = (.5 + .7) / 2 * 2 = 1.2 -> / 2 = .6
    assert aiq([1, 5], [0.5, 0.9], 1, 3) == pytest.approx(0.6)


def test_hull_shortfall_by_hand():
    experts = ([1, 3], [0.5, 0.9])  # experts' hull: .5 at 1, .7 at 2, .9 at 3
    # A curve on or above the experts' hull everywhere falls short nowhere.
    assert hull_shortfall([1, 2, 3], [0.5, 0.8, 0.9], *experts, 1, 3) == 0.0
    # A point at .6 under the experts' .7 at cost 2 does not count: mixing the curve's own
    # settings at 1 and 3 reaches the chord, as the experts' hull does.
    assert hull_shortfall([1, 2, 3], [0.5, 0.6, 0.9], *experts, 1, 3) == 0.0
    # Topping out at .8: short by .1 at budget 3.
    assert hull_shortfall([1, 3], [0.5, 0.8], *experts, 1, 3) == pytest.approx(0.1)
    # Budgets it cannot meet (under its cheapest point, 2) are AIQ's business, not this figure's:
    # from 2 up it is above the experts, and a curve under them from 2 up is short by the gap.
    assert hull_shortfall([2, 3], [0.95, 1.0], *experts, 1, 3) == 0.0
    assert hull_shortfall([2, 3], [0.6, 0.85], *experts, 1, 3) == pytest.approx(0.1)


def test_aiq_constant_curve():
    assert aiq([1, 2, 3], [0.4, 0.4, 0.4], 1, 3) == pytest.approx(0.4)


def test_aiq_all_points_beyond_range_is_zero():
    assert aiq([5, 6], [0.9, 1.0], 1, 3) == 0.0


def test_aiq_needs_a_range():
    with pytest.raises(ValueError, match="c_max > c_min"):
        aiq([1, 2], [0.1, 0.2], 2, 2)


def test_default_cost_weights():
    w = default_cost_weights(np.array([1.0, 3.0]))
    assert len(w) == 61
    assert w[0] == 0.0
    assert w[1] == pytest.approx(1e-4 / 2) and w[-1] == pytest.approx(1e2 / 2)
    assert all(a < b for a, b in zip(w, w[1:]))
    assert default_cost_weights(np.array([2.0, 2.0])) == [0.0]


# --- the report on a tiny hand-built dataset -----------------------------------------------

class FixedRouter(Router):
    """Predicts a fixed quality row per prompt text (deterministic test double)."""

    method = "fixed"

    def __init__(self, table: dict | None = None):
        self.table = table

    def _fit(self, dataset):
        pass

    def _predict(self, texts):
        return np.array([self.table[t] for t in texts], dtype=float)


# experts: cheap costs 1, pricey costs 3
SCORES = {  # prompt: (cheap score, pricey score)
    "p1": (1.0, 0.5),
    "p2": (0.0, 1.0),
    "p3": (0.5, 1.0),
    "p4": (0.5, 0.25),
}
# predicted (cheap, pricey); pricey wins at cost weight w iff q_pricey - q_cheap > 2 w
PREDICTED = {"p1": [0.9, 0.4], "p2": [0.05, 0.95], "p3": [0.5, 0.8], "p4": [0.5, 0.6]}


def _record(rid, cheap, pricey, **extra_pricey):
    responses = {"cheap": {"score": cheap, "cost": 1.0}}
    if pricey is not None:
        responses["pricey"] = {"score": pricey, "cost": 3.0, **extra_pricey}
    return Record(rid, rid, responses)


@pytest.fixture(scope="module")
def tiny():
    return RoutingDataset([_record(k, *v) for k, v in SCORES.items()])


@pytest.fixture(scope="module")
def fixed_router(tiny):
    return FixedRouter(PREDICTED).fit(tiny)


@pytest.fixture(scope="module")
def report(fixed_router, tiny):
    return evaluate(fixed_router, tiny, cost_weights=[0.0, 0.1, 0.3, 1.0])


def test_report_sweep_by_hand(report):
    sweep = report["router"]["sweep"]
    assert [p["cost_weight"] for p in sweep] == [0.0, 0.1, 0.3, 1.0]
    # w=0: cheap, pricey, pricey, pricey -> (1 + 1 + 1 + .25) / 4, cost (1 + 3 + 3 + 3) / 4
    # w=.1: p4 moves to cheap        -> (1 + 1 + 1 + .5) / 4,  cost 2
    # w=.3: p3 moves to cheap        -> (1 + 1 + .5 + .5) / 4, cost 1.5
    # w=1: all cheap                 -> (1 + 0 + .5 + .5) / 4, cost 1
    assert [p["score"] for p in sweep] == pytest.approx([0.8125, 0.875, 0.75, 0.5])
    assert [p["cost"] for p in sweep] == pytest.approx([2.5, 2.0, 1.5, 1.0])
    assert sweep[0]["share"] == {"cheap": 0.25, "pricey": 0.75}
    assert sweep[-1]["share"] == {"cheap": 1.0}


def test_report_experts_best_single_and_oracle_by_hand(report):
    experts = {e["name"]: e for e in report["experts"]}
    assert experts["cheap"]["score"] == pytest.approx(0.5) and experts["cheap"]["cost"] == pytest.approx(1.0)
    assert experts["pricey"]["score"] == pytest.approx(0.6875) and experts["pricey"]["cost"] == pytest.approx(3.0)
    assert experts["cheap"]["n"] == 4
    assert report["best_single"]["name"] == "pricey"
    # oracle: p1 cheap (1), p2 pricey (1), p3 pricey (1), p4 cheap (.5)
    assert report["oracle"]["score"] == pytest.approx(0.875)
    assert report["oracle"]["cost"] == pytest.approx(2.0)
    assert report["oracle"]["share"] == {"cheap": 0.5, "pricey": 0.5}
    assert report["n"] == 4
    assert 0.0 <= report["random"]["score"] <= 1.0
    assert sum(report["random"]["share"].values()) == pytest.approx(1.0)


def test_report_metrics_by_hand(report):
    m = report["metrics"]
    # hull of the sweep: (1,.5) (1.5,.75) (2,.875), flat after; over [1, 3]:
    # (.5+.75)/2*.5 + (.75+.875)/2*.5 + .875*1 = 1.59375 -> / 2
    assert m["aiq"] == pytest.approx(0.796875)
    # experts' hull: (1,.5)-(3,.6875): mean .59375
    assert m["aiq_experts"] == pytest.approx(0.59375)
    assert m["best_single"] == "pricey"
    # every sweep point costs <= 3; the best of them scores .875
    assert m["quality_at_best_single_cost"] == pytest.approx(0.875)
    # cheapest point with score >= .6875 is (1.5, .75): 1.5 / 3
    assert m["cost_to_match_best_single"] == pytest.approx(0.5)
    # (.8125 - .6875) / (.875 - .6875)
    assert m["gap_closed"] == pytest.approx(2 / 3)
    assert m["cost_range"] == [1.0, 3.0]
    assert report["router"]["method"] == "fixed"


def test_report_metrics_when_router_never_matches(fixed_router, tiny):
    m = evaluate(fixed_router, tiny, cost_weights=[1.0])["metrics"]
    assert m["quality_at_best_single_cost"] == pytest.approx(0.5)
    assert m["cost_to_match_best_single"] is None
    assert m["gap_closed"] is None  # the sweep does not start at cost_weight 0


def test_report_metrics_when_router_is_dearer_and_worse():
    # here cheap is the best single expert; a router that always picks pricey never reaches it
    data = RoutingDataset([_record("p1", 1.0, 0.5), _record("p2", 1.0, 0.0),
                           _record("p3", 0.5, 0.0), _record("p4", 0.5, 1.0)])
    router = FixedRouter({k: [0.0, 1.0] for k in SCORES}).fit(data)
    report = evaluate(router, data, cost_weights=[0.0])
    m = report["metrics"]
    assert m["best_single"] == "cheap"
    assert report["router"]["sweep"][0]["score"] == pytest.approx(0.375)
    assert m["quality_at_best_single_cost"] is None  # its only point costs 3 > 1
    assert m["cost_to_match_best_single"] is None
    # oracle: cheap, cheap, cheap, pricey -> .875; (.375 - .75) / (.875 - .75)
    assert m["gap_closed"] == pytest.approx(-3.0)
    assert "not reached" in "\n".join(summary_lines(report))


def test_prices_override_router_costs(fixed_router, tiny):
    # at pricey=1.1 the gap is only .1 per unit weight, so at w=1 p2 (diff .9 > .1) and p3 (.3 > .1) go pricey
    report = evaluate(fixed_router, tiny, cost_weights=[1.0], prices={"pricey": 1.1})
    assert report["router"]["sweep"][0]["share"] == {"cheap": 0.5, "pricey": 0.5}


def test_report_with_best_single_and_oracle_routers(tiny):
    best = evaluate(make_router("best-single").fit(tiny), tiny, cost_weights=[0.0])
    assert best["router"]["sweep"][0]["score"] == pytest.approx(0.6875)
    assert best["metrics"]["gap_closed"] == pytest.approx(0.0)
    oracle = evaluate(make_router("oracle").fit(tiny), tiny, cost_weights=[0.0])
    assert oracle["router"]["sweep"][0]["score"] == pytest.approx(0.875)
    assert oracle["metrics"]["gap_closed"] == pytest.approx(1.0)


def test_report_below_experts_hull_by_hand(report, tiny):
    # The router's hull (1, .5) -> (2, .875), flat after, lies above the experts' (1, .5) -> (3, .6875).
    assert report["metrics"]["below_experts_hull"] == 0.0
    # Only cost_weight 0, so always the pricey expert: the one budget it meets is 3, where it is
    # the experts' hull itself.
    best = evaluate(make_router("best-single").fit(tiny), tiny, cost_weights=[0.0])
    assert best["metrics"]["below_experts_hull"] == 0.0
    # Always the worse expert: p1 pricey .5, p2 cheap 0, p3 cheap .5, p4 pricey .25 -> (cost 2, .3125).
    # From budget 2 up its hull stays at .3125 while the experts' rises to .6875 at 3.
    worst = FixedRouter({"p1": [0, 1], "p2": [1, 0], "p3": [1, 0], "p4": [0, 1]}).fit(tiny)
    assert evaluate(worst, tiny, cost_weights=[0.0])["metrics"]["below_experts_hull"] == pytest.approx(0.375)


def test_below_experts_hull_compares_on_the_prompts_every_expert_answered():
    # cheap is missing on p4, so the oracle's cheapest policy must pay for pricey there: over all
    # four prompts that point is (1.5, .4375), under the experts' hull (cheap alone: cost 1, .5 over
    # its 3 prompts; pricey: 3, .6875), which reaches .5469 at 1.5. On p1-p3, which both answered,
    # the same policy is the cheap expert's own point, and the oracle is never under the hull.
    records = [_record(k, *v) for k, v in SCORES.items() if k != "p4"]
    records.append(Record("p4", "p4", {"pricey": {"score": 0.25, "cost": 3.0}}))
    data = RoutingDataset(records)
    report = evaluate(make_router("oracle").fit(data), data)
    cheapest = min(report["router"]["sweep"], key=lambda point: point["cost"])
    assert cheapest["cost"] == pytest.approx(1.5) and cheapest["score"] == pytest.approx(0.4375)
    whole_set = hull_shortfall([p["cost"] for p in report["router"]["sweep"]],
                               [p["score"] for p in report["router"]["sweep"]],
                               [e["cost"] for e in report["experts"]], [e["score"] for e in report["experts"]],
                               1.0, 3.0)
    assert whole_set == pytest.approx(0.5 + 0.1875 * 0.25 - 0.4375)
    assert report["metrics"]["below_experts_hull"] == 0.0
    # No prompt answered by every expert: nothing to compare on.
    sparse = RoutingDataset([Record("a", "a", {"cheap": {"score": 1.0, "cost": 1.0}}),
                             Record("b", "b", {"pricey": {"score": 1.0, "cost": 3.0}})])
    report = evaluate(FixedRouter({"a": [1.0, 0.0], "b": [0.0, 1.0]}).fit(sparse), sparse, cost_weights=[0.0])
    assert report["metrics"]["below_experts_hull"] is None
    assert not any("experts' hull at any budget" in line for line in summary_lines(report))


def test_unobserved_expert_is_never_picked_nor_counted():
    # pricey is unobserved on p2: the router wants it there but must fall back to cheap
    data = RoutingDataset([_record("p1", 1.0, 0.5), _record("p2", 0.0, None),
                           _record("p3", 0.5, 1.0), _record("p4", 0.5, 0.25)])
    router = FixedRouter({k: [0.0, 1.0] for k in SCORES}).fit(data)
    report = evaluate(router, data, cost_weights=[0.0])
    point = report["router"]["sweep"][0]
    # p1 .5, p2 cheap 0, p3 1, p4 .25
    assert point["score"] == pytest.approx(1.75 / 4)
    assert point["share"] == {"cheap": 0.25, "pricey": 0.75}
    pricey = next(e for e in report["experts"] if e["name"] == "pricey")
    # pricey's mean is over its 3 observed records, not 4 with a zero
    assert pricey["n"] == 3
    assert pricey["score"] == pytest.approx(1.75 / 3)


def test_evaluate_rejects_records_with_no_known_expert(fixed_router):
    data = RoutingDataset([Record("p1", "p1", {"other": {"score": 1.0, "cost": 1.0}})])
    with pytest.raises(ValueError, match="observe none of the router's experts"):
        evaluate(fixed_router, data, cost_weights=[0.0])


def test_precomputed_quality_is_used(fixed_router, tiny):
    quality = np.array([[0.0, 1.0]] * 4)
    report = evaluate(fixed_router, tiny, cost_weights=[0.0], quality=quality)
    assert report["router"]["sweep"][0]["share"] == {"pricey": 1.0}


def test_point_stats_nll_latency_throughput_by_hand():
    records = [
        Record("a", "a", {"m": {"score": 1.0, "cost": 2.0, "nll": 1.0, "latency_s": 2.0, "output_tokens": 100}}),
        Record("b", "b", {"m": {"score": 0.0, "cost": 4.0, "nll": 3.0, "latency_s": 3.0, "output_tokens": 50}}),
        Record("c", "c", {"m": {"score": 0.5, "cost": 0.0}}),
    ]
    stats = point_stats(RoutingDataset(records), np.array([0, 0, 0]))
    assert stats["score"] == pytest.approx(0.5)
    assert stats["cost"] == pytest.approx(2.0)
    assert stats["nll"] == pytest.approx(2.0)
    assert stats["latency_s"] == pytest.approx(2.5)
    assert stats["throughput_tok_s"] == pytest.approx(150 / 5)
    assert stats["share"] == {"m": 1.0}


def test_point_stats_without_nll_or_latency(tiny):
    stats = point_stats(tiny, np.zeros(4, dtype=int))
    assert stats["nll"] is None and stats["latency_s"] is None and stats["throughput_tok_s"] is None


def test_point_stats_rejects_pick_on_unobserved():
    data = RoutingDataset([_record("p1", 1.0, None), _record("p2", 0.0, 1.0)])
    with pytest.raises(ValueError, match="unobserved"):
        point_stats(data, np.array([1, 1]))


def test_expert_stats_skips_never_observed(tiny):
    data = RoutingDataset(tiny.records, experts=["cheap", "pricey", "ghost"])
    assert [e["name"] for e in expert_stats(data)] == ["cheap", "pricey"]


def test_report_is_json_and_renders(report, tmp_path, capsys):
    path = tmp_path / "r" / "report.json"
    save_json(report, path)
    assert json.loads(path.read_text())["metrics"]["aiq"] == pytest.approx(0.796875)
    lines = summary_lines(report)
    text = "\n".join(lines)
    assert "best single expert: pricey" in text
    assert "AIQ: router 0.7969" in text and "single experts' hull 0.5938" in text
    assert "0.500x its cost" in text
    assert "most below the single experts' hull at any budget it meets: 0.0000" in text
    assert "66.7%" in text
    names = [row[0] for row in report_rows(report)]
    assert names[:2] == ["cheap", "pricey"]
    assert "random" in names and "oracle" in names and "best-single (pricey)" in names
    assert any(n.startswith("fixed (w=") for n in names)
    print_report(report)
    assert "oracle" in capsys.readouterr().out
    png = tmp_path / "plot.png"
    plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["plot.png"]


# --- edge-to-cloud ---------------------------------------------------------------------------

def test_edge_cloud_report_keeps_ties_local_and_spans_all_edge_to_cloud():
    records = [
        Record("a", "easy question", {"edge": {"score": 1.0, "cost": 0.001}, "cloud": {"score": 1.0, "cost": 0.01}}),
        Record("b", "hard question", {"edge": {"score": 0.0, "cost": 0.001}, "cloud": {"score": 1.0, "cost": 0.01}}),
    ]
    data = RoutingDataset(records)
    oracle = make_router("oracle").fit(data)
    report = edge_cloud_report(oracle, data, cost_weights=[0.0, 1e6])
    assert report["edge"] == "edge"  # the cheapest expert by default
    quality_only, cost_only = report["sweep"]
    # At cost_weight 0 the tie on "a" stays local and "b" goes to the cloud.
    assert quality_only["local_share"] == 0.5
    assert quality_only["score"] == 1.0
    assert quality_only["cost"] == pytest.approx((0.001 + 0.01) / 2)
    assert cost_only["local_share"] == 1.0 and cost_only["score"] == 0.5
    assert report["all_edge"]["score"] == 0.5 and report["all_cloud"]["name"] == "cloud"
    with pytest.raises(ValueError, match="unknown edge expert"):
        edge_cloud_report(oracle, data, edge="nope")
