"""RouterBench benchmark: routers against the single experts, the oracle and a scikit-learn baseline.

Train on the three ``*_train.csv`` files of RouterBench (ARC-Challenge, MBPP,
Winogrande; 11 LLMs), evaluate on the three ``*_test.csv`` files. Reports, side by
side in one run: every router's AIQ, its best accuracy at GPT-4's cost, the cost at
which it matches GPT-4's accuracy, a temperature sweep for the soft-label MLP, and the
routing overhead (latency, throughput and memory) against the bare encoder.

    python benchmarks/bench_routerbench.py [--data-dir ../shared/data/routerbench] [--no-bert]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from torouter.data import RoutingDataset  # noqa: E402
from torouter.encoders import Encoder  # noqa: E402
from torouter.evaluate import edge_cloud_report, edge_rows, evaluate  # noqa: E402
from torouter.importers import read_routerbench  # noqa: E402
from torouter.routers import make_router  # noqa: E402

TASKS = ("arc_challenge", "mbpp", "winogrande")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "routerbench"
K_GRID = (1, 3, 5, 10, 20, 40, 80)
CLUSTER_GRID = (2, 3, 4, 6, 8, 12, 16, 24, 32)
TEMPERATURES = (1, 5, 10, 20, 50)


def load(data_dir: Path) -> tuple[RoutingDataset, RoutingDataset]:
    train = RoutingDataset(read_routerbench([data_dir / f"{t}_train.csv" for t in TASKS]))
    test = RoutingDataset(read_routerbench([data_dir / f"{t}_test.csv" for t in TASKS]), train.experts)
    return train, test


def row(name: str, report: dict, seconds: float | None = None) -> dict:
    m = report["metrics"]
    first = report["router"]["sweep"][0]
    return {"router": name, "aiq": m["aiq"], "score_w0": first["score"], "cost_w0": first["cost"],
            "quality_at_best_single_cost": m["quality_at_best_single_cost"],
            "cost_to_match_best_single": m["cost_to_match_best_single"], "gap_closed": m["gap_closed"],
            "below_experts_hull": m["below_experts_hull"], "fit_s": seconds}


def fit_eval(name, router, train, test, x_train, x_test, results):
    start = time.perf_counter()
    router.fit(train, embeddings=x_train) if x_train is not None else router.fit(train)
    seconds = time.perf_counter() - start
    quality = router.predict_embeddings(x_test) if x_test is not None else router.predict(test.texts())
    report = evaluate(router, test, quality=quality)
    results.append(row(name, report, seconds))
    print(format_row(results[-1]), flush=True)
    return router, report


def format_row(r: dict) -> str:
    match = r["cost_to_match_best_single"]
    fit = f"{r['fit_s']:.1f}" if r.get("fit_s") is not None else "-"
    return (f"| {r['router']} | {r['aiq']:.4f} | {r['score_w0']:.4f} | {r['cost_w0']:.2e} | "
            f"{r['quality_at_best_single_cost']:.4f} | {'%.2fx' % match if match is not None else 'not reached'} | "
            f"{r['gap_closed']:.1%} | {r['below_experts_hull']:.4f} | {fit} |")


def task_ceiling(train, test, results):
    """Routing on each test task's own per-expert mean accuracy: the best any task-level router can do.

    It reads the test labels, so it is a ceiling for comparison, not a router.
    """
    tasks = np.array([r.task for r in test.records])
    quality = np.zeros(test.scores.shape)
    for task in set(tasks):
        quality[tasks == task] = test.subset(np.flatnonzero(tasks == task)).mean_scores()
    reference = make_router("best-single").fit(train)
    report = evaluate(reference, test, quality=quality)
    results.append(row("task-level ceiling (reads test labels)", report))
    print(format_row(results[-1]), flush=True)


def tune(method: str, param: str, grid, train: RoutingDataset, x_train: np.ndarray) -> tuple[int, dict[int, float]]:
    """Pick ``param`` by AIQ on a held-out fifth of the training data (never the test set)."""
    order = np.random.default_rng(0).permutation(len(train))
    val, fit = sorted(order[: len(order) // 5]), sorted(order[len(order) // 5:])
    fit_set, val_set = train.subset(fit), train.subset(val)
    scores = {}
    for value in grid:
        router = make_router(method, **{param: value}).fit(fit_set, embeddings=x_train[fit])
        scores[value] = evaluate(router, val_set, quality=router.predict_embeddings(x_train[val]))["metrics"]["aiq"]
    return max(scores, key=scores.get), scores


def difficulty_ceiling(train, test, results):
    """Routing on each test prompt's true difficulty: a ceiling no prompt-only router can pass on difficulty alone.

    Difficulty is the share of all experts that answered the prompt correctly; per task and
    expert a logistic regression (fitted on the training prompts) maps it to that expert's
    chance of being right. It reads the test labels, and each expert's own answer leaks into
    its difficulty, so it flatters itself: an upper bound for difficulty-aware routing.
    """
    from sklearn.linear_model import LogisticRegression

    def difficulty(data):
        return np.nanmean(data.scores, axis=1)[:, None]

    train_tasks = np.array([r.task for r in train.records])
    test_tasks = np.array([r.task for r in test.records])
    d_train, d_test = difficulty(train), difficulty(test)
    quality = np.zeros(test.scores.shape)
    for task in set(test_tasks):
        rows, target = train_tasks == task, test_tasks == task
        for j in range(len(train.experts)):
            seen = rows & train.mask[:, j]
            model = LogisticRegression(C=10.0).fit(d_train[seen], train.scores[seen, j] > 0.5)
            quality[target, j] = model.predict_proba(d_test[target])[:, 1]
    reference = make_router("best-single").fit(train)
    report = evaluate(reference, test, quality=quality)
    results.append(row("difficulty ceiling (reads test labels)", report))
    print(format_row(results[-1]), flush=True)


def sklearn_baseline(train, test, x_train, x_test, results):
    """A plain scikit-learn MLP regressor on the same embeddings, routed by the same policy."""
    from sklearn.neural_network import MLPRegressor

    start = time.perf_counter()
    regressor = MLPRegressor(random_state=0, max_iter=500).fit(x_train, np.nan_to_num(train.scores, nan=0.0))
    seconds = time.perf_counter() - start
    reference = make_router("best-single").fit(train)  # supplies experts and expected costs
    report = evaluate(reference, test, quality=regressor.predict(x_test))
    results.append(row("sklearn MLPRegressor (baseline)", report, seconds))
    print(format_row(results[-1]), flush=True)


def overhead(router_dir: Path, prompts: list[str], repeats: int = 200) -> dict:
    """Single-prompt latency and batch throughput of routing against the bare encoder, same prompts."""
    from torouter.routers import load_router

    router = load_router(router_dir)
    encoder = router._encoder()
    encoder.encode(prompts[:8])
    router.predict(prompts[:8])
    single_router, single_encoder = [], []
    for i in range(repeats):
        text = [prompts[i % len(prompts)]]
        t0 = time.perf_counter()
        encoder.encode(text)
        t1 = time.perf_counter()
        router.route(text, cost_weight=100.0)
        t2 = time.perf_counter()
        single_encoder.append(t1 - t0)
        single_router.append(t2 - t1)
    batch = prompts[:512]
    t0 = time.perf_counter()
    encoder.encode(batch)
    t1 = time.perf_counter()
    router.route(batch, cost_weight=100.0)
    t2 = time.perf_counter()

    def pct(values, q):
        return float(np.percentile(values, q) * 1000)

    return {
        "router_p50_ms": pct(single_router, 50), "router_p99_ms": pct(single_router, 99),
        "encoder_p50_ms": pct(single_encoder, 50), "encoder_p99_ms": pct(single_encoder, 99),
        "p50_ratio": statistics.median(single_router) / statistics.median(single_encoder),
        "p99_ratio": pct(single_router, 99) / pct(single_encoder, 99),
        "router_batch_per_s": len(batch) / (t2 - t1), "encoder_batch_per_s": len(batch) / (t1 - t0),
        "batch_ratio": (t1 - t0) / (t2 - t1),
    }


_MEMORY_PROBE = """
import resource, sys
from torouter.routers import load_router
router = load_router(sys.argv[1])
router.route(["How many legs does a spider have?"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_ENCODER_PROBE = """
import resource
from torouter.encoders import Encoder
Encoder().encode(["How many legs does a spider have?"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_memory_mb(router_dir: Path) -> dict:
    """Peak RSS of a fresh process that loads the MLP router and routes one prompt, vs the encoder alone."""
    def run(code, *args):
        out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
        return int(out.stdout.strip().splitlines()[-1]) / 1024
    return {"router_peak_mb": run(_MEMORY_PROBE, str(router_dir)), "encoder_peak_mb": run(_ENCODER_PROBE)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--no-bert", action="store_true", help="skip fine-tuning the BERT router (slowest part)")
    parser.add_argument("--bert-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    parser.add_argument("--overhead-only", action="store_true",
                        help="train only the MLP router (T=10) and measure the routing overhead")
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        sys.exit(f"RouterBench data not found at {args.data_dir}; pass --data-dir")

    train, test = load(args.data_dir)
    print(f"RouterBench: {len(train)} training and {len(test)} test prompts, {len(train.experts)} experts")
    encoder = Encoder()
    start = time.perf_counter()
    x_train, x_test = encoder.encode(train.texts()), encoder.encode(test.texts())
    encode_s = time.perf_counter() - start
    print(f"encoded {len(train) + len(test)} prompts in {encode_s:.0f}s; "
          f"{encoder.count_truncated(train.texts())} training prompts exceed {encoder.max_length} tokens "
          "(the encoder reads their head)")

    results: list[dict] = []
    if args.overhead_only:
        router = make_router("mlp", temperature=10).fit(train, embeddings=x_train)
        report_overhead(router, test)
        return
    print("\n| router | AIQ | acc (w=0) | $/query (w=0) | best acc at <= GPT-4 cost | cost to match GPT-4 "
          "| gap closed | most below the experts' hull | fit s |\n|---|---|---|---|---|---|---|---|---|")
    _, base = fit_eval("best-single", make_router("best-single"), train, test, None, None, results)
    metrics = base["metrics"]
    best, oracle = base["best_single"], base["oracle"]
    sklearn_baseline(train, test, x_train, x_test, results)
    task_ceiling(train, test, results)
    difficulty_ceiling(train, test, results)
    fit_eval("knn k=1 (paper's 1NN)", make_router("knn", k=1), train, test, x_train, x_test, results)
    k, k_scores = tune("knn", "k", K_GRID, train, x_train)
    fit_eval(f"knn k={k} (tuned on a train split)", make_router("knn", k=k), train, test, x_train, x_test, results)
    clusters, cluster_scores = tune("cluster", "n_clusters", CLUSTER_GRID, train, x_train)
    fit_eval(f"cluster n_clusters={clusters} (tuned on a train split)", make_router("cluster", n_clusters=clusters),
             train, test, x_train, x_test, results)
    mlp_routers = {}
    for t in TEMPERATURES:
        mlp_routers[t], _ = fit_eval(f"mlp T={t}", make_router("mlp", temperature=t), train, test,
                                     x_train, x_test, results)
    if not args.no_bert:
        fit_eval(f"bert T=10 ({args.bert_epochs} epochs)", make_router("bert", epochs=args.bert_epochs),
                 train, test, None, None, results)

    print(f"\nbest single expert: {best['name']} accuracy {best['score']:.3f} at ${best['cost']:.2e}/query; "
          f"oracle {oracle['score']:.3f} at ${oracle['cost']:.2e}; single experts' hull AIQ "
          f"{metrics['aiq_experts']:.4f}")
    print(f"knn validation AIQ by k: {k_scores}")
    print(f"cluster validation AIQ by n_clusters: {cluster_scores}")

    edge = edge_cloud_report(mlp_routers[10], test, quality=mlp_routers[10].predict_embeddings(x_test))
    print(f"\nedge-to-cloud with the MLP router (T=10), edge = the cheapest model ({edge['edge']}):")
    print("| policy | answered locally | accuracy | $/query |\n|---|---|---|---|")
    for cells in edge_rows(edge, max_rows=8):
        print("| " + " | ".join(cells) + " |")

    cost, memory = report_overhead(mlp_routers[10], test)
    if args.out:
        args.out.write_text(json.dumps({"results": results, "overhead": cost, "memory": memory,
                                        "best_single": best, "oracle": oracle, "metrics": metrics,
                                        "edge_to_cloud": edge,
                                        "knn_validation_aiq": k_scores,
                                        "cluster_validation_aiq": cluster_scores, "encode_s": encode_s}, indent=2))


def report_overhead(router, test: RoutingDataset) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        router_dir = router.save(Path(tmp) / "mlp")
        cost = overhead(router_dir, test.texts())
        memory = peak_memory_mb(router_dir)
    print("\nrouting overhead (MLP router, T=10) against the bare encoder on the same prompts:")
    print(f"  single prompt p50: router {cost['router_p50_ms']:.2f} ms vs encoder {cost['encoder_p50_ms']:.2f} ms "
          f"({cost['p50_ratio']:.2f}x)")
    print(f"  single prompt p99: router {cost['router_p99_ms']:.2f} ms vs encoder {cost['encoder_p99_ms']:.2f} ms "
          f"({cost['p99_ratio']:.2f}x)")
    print(f"  batch of 512: router {cost['router_batch_per_s']:.0f}/s vs encoder {cost['encoder_batch_per_s']:.0f}/s "
          f"({cost['batch_ratio']:.2f}x)")
    print(f"  peak RSS: loaded MLP router {memory['router_peak_mb']:.0f} MB vs encoder alone "
          f"{memory['encoder_peak_mb']:.0f} MB")
    return cost, memory


if __name__ == "__main__":
    main()
