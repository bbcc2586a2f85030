"""Adding, replacing and dropping an expert without retraining: how close to full retraining, for how many calls.

Leave-one-expert-out on RouterBench (11 LLMs, cost-aware: AIQ) and RouterDC (7 open
7B models, equal price: mean score at cost_weight 0 and the share of the
best-single-to-oracle gap closed). For each router (``cluster``, ``knn``) and each
expert in turn:

* **full**: the router trained on every expert (what retraining with the new expert
  gives, at the price of answering the whole training set with it);
* **added**: the router trained on the other experts, then ``add_expert`` from its
  scored answers to ``n`` training prompts, drawn at random or stratified over the
  router's clusters (the two strategies of ``torouter.calibration``), for each ``n`` and seed;
* **dropped**: the full router with ``drop_expert``, against the router retrained
  on the other experts (dropping should need no training and change nothing).

Printed side by side: the mean over held-out experts (and its spread over held-out
experts and seeds) of each figure for the added router minus the full router, how
often the held-out expert is chosen (at cost_weight 0) with the added and the full
router, and the calls each needs (``n`` against the training set's size). The cluster
router is run with both shrinkage targets for an added expert's profile
(``profile_target``: its calibration mean, or that mean moved by each cluster's
difficulty for the other experts), which is how the default was chosen.

Embeddings are computed once per data set and backend and cached (``--cache-dir``).

    python benchmarks/bench_expert_profiles.py [--quick] [--backend static] [--datasets routerbench,routerdc]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fast_routing import DATA, load  # noqa: E402

from torouter.calibration import stratified_sample, strata  # noqa: E402
from torouter.data import RoutingDataset  # noqa: E402
from torouter.encoders import Encoder  # noqa: E402
from torouter.evaluate import aiq, default_cost_weights, evaluate  # noqa: E402
from torouter.paths import cache_dir  # noqa: E402
from torouter.policy import choose  # noqa: E402
from torouter.routers import make_router  # noqa: E402

NS = (25, 50, 100, 200, 400)
ROUTERS = {"cluster": {"n_clusters": 16}, "knn": {}}
# The figure each data set is judged on (the targets) and the other one reported.
PRIMARY = {"routerbench": "aiq", "routerdc": "score_w0"}


def embeddings(name: str, split: str, dataset: RoutingDataset, backend: str, folder: Path) -> np.ndarray:
    """The prompts of one split encoded once per backend, cached by data set, split and ids."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{name}-{backend}.npz"
    if file.is_file():
        cached = np.load(file, allow_pickle=False)
        if f"{split}_ids" in cached and list(cached[f"{split}_ids"]) == dataset.ids:
            return cached[split]
    encoder = Encoder(backend=backend, device="cpu" if backend != "sentence-transformers" else None)
    start = time.perf_counter()
    x = encoder.encode(dataset.texts(), show_progress=False)
    print(f"  encoded {len(dataset)} {name} {split} prompts with {backend} in {time.perf_counter() - start:.0f} s",
          flush=True)
    old = dict(np.load(file, allow_pickle=False)) if file.is_file() else {}
    old.update({split: x, f"{split}_ids": np.array(dataset.ids)})
    np.savez(file, **old)
    return x


class Scorer:
    """The library's evaluation figures (same policy, same AIQ) for many quality matrices on one test set."""

    def __init__(self, test: RoutingDataset, cost_aware: bool):
        self.test = test
        self.cost_aware = cost_aware

    def __call__(self, router, quality: np.ndarray) -> dict:
        index = [self.test.experts.index(e) for e in router.experts_]
        scores, costs, mask = self.test.scores[:, index], self.test.costs[:, index], self.test.mask[:, index]
        keep = mask.any(axis=1)
        scores, costs, mask, quality = scores[keep], costs[keep], mask[keep], quality[keep]
        rows = np.arange(len(scores))
        expected = router.costs()
        weights = default_cost_weights(expected) if self.cost_aware else [0.0]
        points = []
        for w in weights:
            picks = choose(quality, expected, w, allowed=mask)
            points.append((float(costs[rows, picks].mean()), float(scores[rows, picks].mean()), picks))
        with np.errstate(invalid="ignore"):
            means = np.nanmean(np.where(mask, scores, np.nan), axis=0)
            mean_costs = np.nanmean(np.where(mask, costs, np.nan), axis=0)
        best = float(np.max(means))
        oracle = float(scores[rows, choose(np.nan_to_num(scores, nan=-1.0), costs, 0.0, allowed=mask)].mean())
        out = {"score_w0": points[0][1], "gap_closed": (points[0][1] - best) / (oracle - best),
               "share_w0": np.bincount(points[0][2], minlength=len(index)) / len(rows)}
        if self.cost_aware:
            out["aiq"] = aiq([p[0] for p in points], [p[1] for p in points], float(mean_costs.min()),
                             float(mean_costs.max()))
        return out


def run_dataset(name: str, args, results: list[dict]) -> None:
    train, test = load(name, args.data_dir)
    x_train = embeddings(name, "train", train, args.backend, args.cache_dir)
    x_test = embeddings(name, "test", test, args.backend, args.cache_dir)
    if args.max_test and len(test) > args.max_test:  # a seeded sample of the test set, for time
        keep = np.sort(np.random.default_rng(0).choice(len(test), args.max_test, replace=False))
        test, x_test = test.subset(keep), x_test[keep]
        print(f"  {name}: evaluating on {len(test)} test prompts drawn at random (--max-test)", flush=True)
    scorer = Scorer(test, cost_aware=name == "routerbench")
    experts = train.experts if not args.quick else train.experts[:: max(1, len(train.experts) // 4)]
    for method in args.methods:
        variants = args.cluster_variants if method == "cluster" else [None]
        params = dict(ROUTERS[method], backend=args.backend)
        full = make_router(method, **params).fit(train, embeddings=x_train)
        full_figures = scorer(full, full.predict_embeddings(x_test))
        if name == "routerbench":  # the fast scorer agrees with torouter.evaluate
            reference = evaluate(full, test, quality=full.predict_embeddings(x_test))["metrics"]["aiq"]
            assert abs(reference - full_figures["aiq"]) < 1e-9, (reference, full_figures["aiq"])
        print(f"{name} {method}: full retraining {fmt_figures(full_figures)}", flush=True)
        for held in experts:
            start = time.perf_counter()
            others = [e for e in train.experts if e != held]
            base = make_router(method, **params).fit(RoutingDataset(train.records, others), embeddings=x_train)
            without = scorer(base, base.predict_embeddings(x_test))
            dropped = copy.deepcopy(full).drop_expert(held)
            dropped_figures = scorer(dropped, dropped.predict_embeddings(x_test))
            results.append({"dataset": name, "method": method, "expert": held, "kind": "drop",
                            "retrained": strip(without), "dropped": strip(dropped_figures)})
            observed = np.flatnonzero(train.mask[:, train.experts.index(held)])
            for sampler in ("random", "stratified"):
                for seed in range(args.seeds):
                    # a draw of its own for every held-out expert and seed; the stratified draw is what
                    # torouter.calibration.choose_calibration(strategy="stratified") does
                    draw = 1000 * seed + train.experts.index(held)
                    groups = strata(base, x_train, draw) if sampler == "stratified" else None
                    order = np.random.default_rng(draw).permutation(observed)
                    for n in args.ns:
                        if groups is None:
                            chosen = np.sort(order[:n])
                        else:
                            chosen = stratified_sample(groups, n, draw)
                        calibration = train.subset(chosen)
                        for variant in variants:
                            added = copy.deepcopy(base)
                            if variant is not None:
                                added.profile_target, _, prior = variant.partition("/")
                                added.profile_prior = "auto" if prior == "auto" else "fit"
                            added.add_expert(held, calibration, embeddings=x_train[chosen])
                            figures = scorer(added, added.predict_embeddings(x_test))
                            results.append({
                                "dataset": name, "method": method if variant is None else f"{method}/{variant}",
                                "expert": held, "kind": "add", "sampler": sampler, "seed": seed, "n": n,
                                "calls": int(calibration.mask[:, train.experts.index(held)].sum()),
                                "full_calls": int(len(observed)),
                                "added": strip(figures), "full": strip(full_figures),
                                "share_added": float(figures["share_w0"][-1]),
                                "share_full": float(full_figures["share_w0"][full.experts_.index(held)]),
                            })
            print(f"  held out {held}: {time.perf_counter() - start:.0f} s; retrained without it "
                  f"{fmt_figures(without)}, full minus it {fmt_figures(dropped_figures)}", flush=True)


def strip(figures: dict) -> dict:
    return {k: float(v) for k, v in figures.items() if k != "share_w0"}


def fmt_figures(figures: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in strip(figures).items())


def summarise(results: list[dict]) -> list[str]:
    lines = ["| data | router | sample | n (calls) | " + "primary: added - full (mean ± sd) | "
             "gap closed: added - full | added expert chosen: added / full |",
             "|---|---|---|---|---|---|---|"]
    adds = [r for r in results if r["kind"] == "add"]
    keys = sorted({(r["dataset"], r["method"], r["sampler"], r["n"]) for r in adds})
    for data, method, sampler, n in keys:
        rows = [r for r in adds if (r["dataset"], r["method"], r["sampler"], r["n"]) == (data, method, sampler, n)]
        key = PRIMARY[data]
        diffs = [r["added"][key] - r["full"][key] for r in rows]
        # mean over held-out experts (each averaged over seeds), spread over experts and seeds
        per_expert = [statistics.fmean(r["added"][key] - r["full"][key] for r in rows if r["expert"] == e)
                      for e in sorted({r["expert"] for r in rows})]
        gap = statistics.fmean(r["added"]["gap_closed"] - r["full"]["gap_closed"] for r in rows)
        share_added = statistics.fmean(r["share_added"] for r in rows)
        share_full = statistics.fmean(r["share_full"] for r in rows)
        lines.append(f"| {data} | {method} | {sampler} | {n} | {key} {statistics.fmean(per_expert):+.4f} ± "
                     f"{statistics.pstdev(diffs):.4f} | {gap:+.3f} | {share_added:.1%} / {share_full:.1%} |")
    lines.append("")
    lines.append("| data | router | figure | retrained without the expert | full router, expert dropped | "
                 "max abs difference |")
    lines.append("|---|---|---|---|---|---|")
    drops = [r for r in results if r["kind"] == "drop"]
    for data, method in sorted({(r["dataset"], r["method"]) for r in drops}):
        rows = [r for r in drops if (r["dataset"], r["method"]) == (data, method)]
        key = PRIMARY[data]
        retrained = statistics.fmean(r["retrained"][key] for r in rows)
        dropped = statistics.fmean(r["dropped"][key] for r in rows)
        worst = max(abs(r["retrained"][key] - r["dropped"][key]) for r in rows)
        lines.append(f"| {data} | {method} | {key} | {retrained:.4f} | {dropped:.4f} | {worst:.4f} |")
    full_calls = {r["dataset"]: r["full_calls"] for r in adds}
    lines.append("")
    lines.append("Calls to add one expert: n (one answer per calibration prompt); full retraining: "
                 + ", ".join(f"{d} {c}" for d, c in sorted(full_calls.items())) + ".")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA, help="folder holding routerbench/ and routerdc/")
    parser.add_argument("--datasets", default="routerbench,routerdc")
    parser.add_argument("--methods", default="cluster,knn")
    parser.add_argument("--backend", default="sentence-transformers",
                        help="encoder backend (sentence-transformers is MiniLM itself; static is fastest)")
    parser.add_argument("--ns", default=",".join(map(str, NS)), help="calibration sample sizes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a quarter of the experts, one seed")
    parser.add_argument("--cache-dir", type=Path, default=cache_dir() / "bench-embeddings",
                        help="where the encoded prompts are kept between runs")
    parser.add_argument("--cluster-variants", default="difficulty/auto",
                        help="cluster profile of an added expert, TARGET/PRIOR: target difficulty or mean, "
                             "prior auto (measured) or fit (the router's prior), comma-separated")
    parser.add_argument("--max-test", type=int, default=0,
                        help="evaluate on this many test prompts drawn at random (0: the whole test set)")
    parser.add_argument("--json", type=Path, help="write every measurement as JSON")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    args.ns = [int(n) for n in args.ns.split(",")]
    args.cluster_variants = args.cluster_variants.split(",")
    if args.quick:
        args.seeds = 1
    results: list[dict] = []
    start = time.perf_counter()
    for name in args.datasets.split(","):
        run_dataset(name, args, results)
    print(f"\n{time.perf_counter() - start:.0f} s in all, backend {args.backend}\n")
    print("\n".join(summarise(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
