"""Cost-quality evaluation of a router on held-out routing data.

Every single expert, random, best-single and the oracle are reported beside the
router, which is swept over ``cost_weight`` so one trained router traces a whole
cost-quality curve. The summary numbers:

* **AIQ** (RouterBench's Average Improvement in Quality): the area under the
  non-decreasing upper convex hull of a curve's (cost, quality) points over the
  single experts' cost range ``[c_min, c_max]``, divided by that range. The hull
  interpolates between points (mixing two settings at random reaches any point on
  the segment) and stays flat to the right of its best point; costs below its
  cheapest point count as quality 0.
* the router's best quality at a cost no higher than the best single expert's;
* the cost at which it first matches the best single expert's quality, as a
  fraction of that expert's cost;
* the share of the best-single-to-oracle quality gap it closes at ``cost_weight=0``;
* how far its hull falls below the single experts' hull at the worst budget it can
  meet, on the prompts every expert answered (0 when routing never does worse than
  picking experts alone).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .data import RoutingDataset, atomic_write
from .policy import TIE_TOLERANCE, choose
from .routers import RandomRouter
from .routers.base import Router

DEFAULT_SWEEP_POINTS = 61


def upper_hull(costs, qualities) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the non-decreasing upper convex hull of (cost, quality) points, by cost."""
    pts = sorted(set(zip(map(float, costs), map(float, qualities))))
    hull: list[tuple[float, float]] = []
    for p in pts:
        # Among equal costs only the best quality matters.
        if hull and hull[-1][0] == p[0]:
            hull.pop()
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] is on or below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    best = int(np.argmax([q for _, q in hull]))
    hull = hull[: best + 1]  # right of the best point the curve stays flat
    xs, ys = zip(*hull)
    return np.array(xs), np.array(ys)


def aiq(costs, qualities, c_min: float, c_max: float) -> float:
    """Area under the non-decreasing convex hull over ``[c_min, c_max]``, divided by the range."""
    if not c_max > c_min:
        raise ValueError(f"AIQ needs c_max > c_min, got [{c_min}, {c_max}]")
    xs, ys = upper_hull(costs, qualities)
    start = max(c_min, xs[0])
    if start >= c_max:
        return 0.0
    grid = np.unique(np.concatenate([[start, c_max], xs[(xs > start) & (xs < c_max)]]))
    values = np.interp(grid, xs, ys)  # constant beyond the last vertex
    area = float(np.sum((grid[1:] - grid[:-1]) * (values[1:] + values[:-1]) / 2))
    return area / (c_max - c_min)


def hull_values(costs, qualities, budgets) -> np.ndarray:
    """The convex hull's quality at each budget (0 below its cheapest point, flat past its best)."""
    xs, ys = upper_hull(costs, qualities)
    budgets = np.asarray(budgets, dtype=float)
    return np.where(budgets < xs[0], 0.0, np.interp(budgets, xs, ys))


def hull_shortfall(costs, qualities, expert_costs, expert_qualities, c_min: float, c_max: float) -> float:
    """The most a curve's hull falls below the single experts' hull at any budget it can meet.

    Budgets run from the curve's cheapest point (or ``c_min``, if it reaches lower) to
    ``c_max``. Below its cheapest point a curve has no setting at all, which AIQ counts as
    quality 0; a router's sweep usually stops a hair above the cheapest expert's own cost
    (where that expert was not observed it must pick another), so counting those budgets
    would report the whole height of the hull for every router. Both hulls are piecewise
    linear, so the largest gap lies at a vertex of one of them.
    """
    xs, _ = upper_hull(costs, qualities)
    ex, _ = upper_hull(expert_costs, expert_qualities)
    low = max(c_min, float(xs[0]))
    if low > c_max:
        return 0.0
    budgets = np.concatenate([[low, c_max], xs, ex])
    budgets = budgets[(budgets >= low) & (budgets <= c_max)]
    gap = hull_values(expert_costs, expert_qualities, budgets) - hull_values(costs, qualities, budgets)
    return float(max(gap.max(), 0.0))


def below_experts_hull(dataset: RoutingDataset, sweep_picks: list[np.ndarray]) -> float | None:
    """``hull_shortfall`` of a router's sweep, on the prompts that every expert answered.

    A single expert is scored only where it was observed, while a router answers every
    prompt (another expert where one is missing), so over the whole set the router's
    cheapest policy costs more than the cheapest expert alone and seems to fall short
    where the experts' hull climbs steeply. On the prompts all experts answered, both are
    scored alike. ``None`` where no prompt was answered by every expert, or all cost alike.
    """
    rows = np.flatnonzero(dataset.mask.all(axis=1))
    if not len(rows):
        return None
    costs, scores = dataset.costs[rows], dataset.scores[rows]
    expert_costs, expert_scores = costs.mean(axis=0), scores.mean(axis=0)
    c_min, c_max = float(expert_costs.min()), float(expert_costs.max())
    if not c_max > c_min:
        return None
    at = np.arange(len(rows))
    router_costs = [float(costs[at, picks[rows]].mean()) for picks in sweep_picks]
    router_scores = [float(scores[at, picks[rows]].mean()) for picks in sweep_picks]
    return hull_shortfall(router_costs, router_scores, expert_costs, expert_scores, c_min, c_max)


def point_stats(dataset: RoutingDataset, picks: np.ndarray) -> dict[str, Any]:
    """Mean score, cost and, where recorded, NLL, latency and throughput of one pick per record."""
    rows = np.arange(len(dataset))
    scores = dataset.scores[rows, picks]
    if np.isnan(scores).any():
        raise ValueError("a pick landed on an unobserved expert")
    out: dict[str, Any] = {"score": float(scores.mean()), "cost": float(dataset.costs[rows, picks].mean())}
    nll = dataset.nll[rows, picks]
    out["nll"] = float(np.nanmean(nll)) if not np.isnan(nll).all() else None
    latency = dataset.latency[rows, picks]
    if not np.isnan(latency).all():
        out["latency_s"] = float(np.nanmean(latency))
        tokens = dataset.output_tokens[rows, picks]
        both = ~np.isnan(latency) & ~np.isnan(tokens)
        out["throughput_tok_s"] = float(tokens[both].sum() / latency[both].sum()) if both.any() and latency[both].sum() > 0 else None
    else:
        out["latency_s"] = out["throughput_tok_s"] = None
    share = np.bincount(picks, minlength=len(dataset.experts)) / len(dataset)
    out["share"] = {e: float(s) for e, s in zip(dataset.experts, share) if s > 0}
    return out


def expert_stats(dataset: RoutingDataset) -> list[dict[str, Any]]:
    """Each expert alone, over the records where it was observed."""
    out = []
    for j, name in enumerate(dataset.experts):
        observed = np.flatnonzero(dataset.mask[:, j])
        if not len(observed):
            continue
        stats = point_stats(dataset.subset(observed), np.full(len(observed), j))
        stats.pop("share")
        out.append({"name": name, "n": int(len(observed)), **stats})
    return out


def default_cost_weights(costs: np.ndarray, points: int = DEFAULT_SWEEP_POINTS) -> list[float]:
    """0, then a geometric sweep from 'cost barely matters' to 'only cost matters'."""
    spread = float(np.nanmax(costs) - np.nanmin(costs))
    if not spread > 0:
        return [0.0]
    return [0.0] + [float(w) for w in np.geomspace(1e-4, 1e2, points - 1) / spread]


def evaluate(router: Router, dataset: RoutingDataset, cost_weights: list[float] | None = None,
             prices: dict[str, float] | None = None, quality: np.ndarray | None = None) -> dict[str, Any]:
    """The full report (a JSON-able dict) for ``router`` on ``dataset``.

    ``quality`` may pass precomputed ``router.predict`` output for the dataset's prompts.
    """
    data = RoutingDataset(dataset.records, router.experts_)
    if not data.mask.any(axis=1).all():
        raise ValueError("some evaluation records observe none of the router's experts")
    expected = router.costs(prices)
    weights = cost_weights if cost_weights is not None else default_cost_weights(expected)
    if quality is None:
        quality = router.predict(data.texts())
    sweep, sweep_picks = [], []
    for w in weights:
        picks = choose(quality, expected, w, allowed=data.mask)
        sweep.append({"cost_weight": float(w), **point_stats(data, picks)})
        sweep_picks.append(picks)

    experts = expert_stats(data)
    costs = [e["cost"] for e in experts]
    c_min, c_max = min(costs), max(costs)
    best = max(experts, key=lambda e: (e["score"], -e["cost"]))
    oracle_picks = choose(data.scores, data.costs, 0.0, allowed=data.mask)
    oracle = {"cost_weight": 0.0, **point_stats(data, oracle_picks)}
    random_router = RandomRouter(seed=0).fit(data)
    random = point_stats(data, choose(random_router.predict(data.texts()), expected, 0.0, allowed=data.mask))

    qualities = [p["score"] for p in sweep]
    sweep_costs = [p["cost"] for p in sweep]
    within = [p["score"] for p in sweep if p["cost"] <= best["cost"] * (1 + 1e-9)]
    matching = [p["cost"] for p in sweep if p["score"] >= best["score"] - 1e-12]
    gap = oracle["score"] - best["score"]
    metrics = {
        "aiq": aiq(sweep_costs, qualities, c_min, c_max) if c_max > c_min else None,
        "aiq_experts": aiq(costs, [e["score"] for e in experts], c_min, c_max) if c_max > c_min else None,
        "best_single": best["name"],
        "quality_at_best_single_cost": max(within) if within else None,
        "cost_to_match_best_single": (min(matching) / best["cost"]) if matching and best["cost"] > 0 else None,
        "gap_closed": (sweep[0]["score"] - best["score"]) / gap if weights[0] == 0 and gap > 0 else None,
        "below_experts_hull": below_experts_hull(data, sweep_picks),
        "cost_range": [c_min, c_max],
    }
    return {
        "n": len(data),
        "router": {"method": router.method, "params": router.get_params(), "sweep": sweep},
        "experts": experts,
        "random": random,
        "best_single": best,
        "oracle": oracle,
        "metrics": metrics,
    }


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def report_rows(report: dict[str, Any], max_sweep_rows: int = 8) -> list[tuple[str, ...]]:
    """Table rows: name, score, cost per query, NLL, tokens/s."""
    rows = []
    for e in report["experts"]:
        rows.append((e["name"], e))
    rows += [("random", report["random"]), (f"best-single ({report['best_single']['name']})", report["best_single"]),
             ("oracle", report["oracle"])]
    sweep = _frontier(report["router"]["sweep"])
    step = max(1, math.ceil(len(sweep) / max_sweep_rows))
    chosen = sweep[::step]
    if sweep and chosen[-1] is not sweep[-1]:
        chosen.append(sweep[-1])
    for p in chosen:
        rows.append((f"{report['router']['method']} (w={p['cost_weight']:.3g})", p))
    return [(name, _fmt(p["score"], ".4f"), _fmt(p["cost"], ".3e"), _fmt(p.get("nll"), ".3f"),
             _fmt(p.get("throughput_tok_s"), ".1f")) for name, p in rows]


def _frontier(sweep: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distinct points of a sweep, dropping repeats of the same (cost, score)."""
    seen, out = set(), []
    for p in sweep:
        key = (round(p["cost"], 12), round(p["score"], 9))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    m = report["metrics"]
    best = report["best_single"]
    lines = [f"records: {report['n']}   best single expert: {best['name']} "
             f"(score {best['score']:.4f} at ${best['cost']:.3e}/query)"]
    if m["aiq"] is not None:
        lines.append(f"AIQ: router {m['aiq']:.4f}   single experts' hull {m['aiq_experts']:.4f}")
    if m.get("below_experts_hull") is not None:  # reports saved before this figure existed lack it
        lines.append(f"most below the single experts' hull at any budget it meets: {m['below_experts_hull']:.4f}")
    lines.append(f"router's best score at <= best-single cost: {_fmt(m['quality_at_best_single_cost'], '.4f')}")
    match = m["cost_to_match_best_single"]
    lines.append("cost to match best-single score: " +
                 (f"{match:.3f}x its cost" if match is not None else "not reached"))
    lines.append(f"best-single-to-oracle gap closed at cost_weight=0: {_fmt(m['gap_closed'], '.1%')}")
    return lines


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"torouter evaluation ({report['router']['method']} router)")
    for col in ("expert / policy", "score", "$ / query", "NLL", "tok/s"):
        table.add_column(col, justify="left" if col == "expert / policy" else "right")
    for row in report_rows(report):
        table.add_row(*row)
    console = Console()
    console.print(table)
    for line in summary_lines(report):
        console.print(line)


def save_json(report: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda h: json.dump(report, h, indent=2))


def plot(report: dict[str, Any], path: str | Path, title: str | None = None) -> None:
    """Cost-quality plot: single experts, random, oracle, and the router's sweep with its hull."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for e in report["experts"]:
        ax.scatter(e["cost"], e["score"], color="tab:gray", zorder=3)
        ax.annotate(e["name"].split("/")[-1], (e["cost"], e["score"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    costs = [e["cost"] for e in report["experts"]]
    xs, ys = upper_hull(costs, [e["score"] for e in report["experts"]])
    ax.plot(list(xs) + [max(costs)], list(ys) + [ys[-1]], "--", color="tab:gray", label="single experts' hull")
    sweep = report["router"]["sweep"]
    ax.plot([p["cost"] for p in sweep], [p["score"] for p in sweep], "o", ms=3, color="tab:blue", alpha=0.5)
    hx, hy = upper_hull([p["cost"] for p in sweep], [p["score"] for p in sweep])
    aiq_value = report["metrics"].get("aiq")
    label = f"{report['router']['method']} router" + (f" (AIQ {aiq_value:.3f})" if aiq_value is not None else "")
    ax.plot(list(hx) + [max(costs)], list(hy) + [hy[-1]], "-", color="tab:blue", label=label)
    ax.scatter(report["random"]["cost"], report["random"]["score"], marker="x", color="tab:red", label="random")
    ax.scatter(report["oracle"]["cost"], report["oracle"]["score"], marker="*", s=120, color="tab:green", label="oracle")
    if min(costs) > 0 and max(costs) / min(costs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("mean cost per query ($)")
    ax.set_ylabel("mean score")
    ax.set_title(title or f"cost vs quality on {report['n']} held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def edge_cloud_report(router: Router, dataset: RoutingDataset, edge: str | None = None,
                      cost_weights: list[float] | None = None, prices: dict[str, float] | None = None,
                      quality: np.ndarray | None = None) -> dict[str, Any]:
    """Edge-to-cloud routing: answer locally unless a cloud expert's predicted gain is worth its cost.

    The rule is the cost-weight rule with the edge expert priced at its own (expected)
    cost, ties going to the edge. ``edge`` defaults to the cheapest expert. Each sweep
    point reports the share answered locally beside all-edge and all-cloud (the best
    cloud expert alone) on the same records.
    """
    data = RoutingDataset(dataset.records, router.experts_)
    expected = router.costs(prices)
    edge = edge or router.experts_[int(np.nanargmin(expected))]
    if edge not in router.experts_:
        raise ValueError(f"unknown edge expert {edge!r}; the router knows {router.experts_}")
    j_edge = router.experts_.index(edge)
    # Records where the edge expert was not observed cannot say what answering locally gives.
    keep = np.flatnonzero(data.mask[:, j_edge])
    data = data.subset(keep)
    if quality is None:
        quality = router.predict(data.texts())
    else:
        quality = np.asarray(quality)[keep]
    weights = cost_weights if cost_weights is not None else default_cost_weights(expected)
    sweep = []
    for w in weights:
        picks = _edge_picks(quality, expected, j_edge, w, data.mask)
        stats = point_stats(data, picks)
        stats["local_share"] = float(np.mean(picks == j_edge))
        sweep.append({"cost_weight": float(w), **stats})
    experts = {e["name"]: e for e in expert_stats(data)}
    cloud = [e for name, e in experts.items() if name != edge]
    best_cloud = max(cloud, key=lambda e: (e["score"], -e["cost"])) if cloud else None
    return {"n": len(data), "edge": edge, "all_edge": experts[edge], "all_cloud": best_cloud, "sweep": sweep}


def _edge_picks(quality, expected, edge: int, weight: float, mask) -> np.ndarray:
    """``choose``'s rule, except that any tie involving the edge expert stays local."""
    order = np.argsort(expected, kind="stable")
    tie_rank = np.empty_like(order)
    tie_rank[order] = np.arange(1, len(order) + 1)
    tie_rank[edge] = 0  # among tied experts the lowest rank wins: the edge first, then the cheaper
    utility = np.where(mask & ~np.isnan(quality), np.nan_to_num(quality) - weight * expected, -np.inf)
    tied = utility >= utility.max(axis=1, keepdims=True) - TIE_TOLERANCE
    return np.where(tied, tie_rank, len(order) + 1).argmin(axis=1)


def edge_rows(report: dict[str, Any], max_rows: int = 10) -> list[tuple[str, ...]]:
    """Table rows for an edge-to-cloud report: policy, local share, score, cost per query."""
    rows = [(f"all-edge ({report['edge']})", "100%", report["all_edge"])]
    if report["all_cloud"]:
        rows.append((f"all-cloud ({report['all_cloud']['name']})", "0%", report["all_cloud"]))
    sweep = _frontier(report["sweep"])
    step = max(1, math.ceil(len(sweep) / max_rows))
    for p in sweep[::step]:
        rows.append((f"edge-to-cloud (w={p['cost_weight']:.3g})", f"{p['local_share']:.0%}", p))
    return [(name, share, _fmt(p["score"], ".4f"), _fmt(p["cost"], ".3e")) for name, share, p in rows]


def print_edge_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"edge-to-cloud routing, edge = {report['edge']} ({report['n']} records)")
    for col in ("policy", "answered locally", "score", "$ / query"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for row in edge_rows(report):
        table.add_row(*row)
    Console().print(table)
