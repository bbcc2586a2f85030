"""The Ray engine against the local engine, side by side in one run, on this machine.

A local Ray instance with 2 workers (``ray.init(num_cpus=2)``) against the local engine:

1. Data preparation with simulated experts that take 200 ms per call (``--experts`` experts,
   ``concurrency`` calls in flight each): calls/s and their share of the ideal
   (experts x concurrency / 0.2 s). Both engines go through ``prepare`` with the same
   manifest, prompts and SQLite cache format.
2. BERTScore scoring (the default offline MiniLM) of ``--pairs`` answers: pairs/s.
3. Batch routing of ``--route-prompts`` prompts with a kNN router on the static encoder:
   prompts/s.

How the Ray work splits (so the scaling to N machines can be read off): time inside the
actors' calls per call or per block (task time), time the driver spends committing results,
the cost of serialising one block of calls, and the one-off start of Ray and its actors.
Last, a paper estimate of a million prompts x 10 experts on N workers.

    python benchmarks/bench_ray.py [--prompts 400] [--experts 2] [--concurrency 8]
                                   [--pairs 256] [--route-prompts 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent


async def simulated(prompt, delay=0.2):
    """A remote API with constant latency (imported by name on the Ray workers)."""
    await asyncio.sleep(delay)
    return {"text": f"answer to {prompt}", "input_tokens": 12, "output_tokens": 20, "latency_s": delay}


def bench_prepare(executor, n_prompts: int, n_experts: int, concurrency: int, delay: float) -> dict:
    from torouter.prepare import prepare
    from torouter.prepare.manifest import parse_manifest

    manifest = parse_manifest([{"name": f"sim-{i}", "tier": "cloud", "concurrency": concurrency, "retries": 0,
                                "python": {"callable": "bench_ray:simulated", "kwargs": {"delay": delay}}}
                               for i in range(n_experts)])
    prompts = [{"id": f"q{i}", "prompt": f"prompt {i}"} for i in range(n_prompts)]
    ideal = n_experts * concurrency / delay
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        local = prepare(manifest, prompts, Path(tmp) / "local.jsonl", score=None, progress=False)
        out["local"] = {"calls": local.run.calls, "wall_s": local.run.elapsed_s, "calls_per_s": local.run.calls_per_s}
        # Ray: the same prepare, its calls made by the executor already connected to the cluster.
        from torouter.prepare import pipeline

        real_engine = pipeline._engine
        pipeline._engine = lambda *a, **k: _given(executor)
        try:
            ray_run = prepare(manifest, prompts, Path(tmp) / "ray.jsonl", score=None, progress=False, engine="ray")
        finally:
            pipeline._engine = real_engine
        same = _records(Path(tmp) / "ray.jsonl") == _records(Path(tmp) / "local.jsonl")
    timings = dict(executor.timings)
    out["ray"] = {"calls": ray_run.run.calls, "wall_s": ray_run.run.elapsed_s, "calls_per_s": ray_run.run.calls_per_s,
                  "task_s_per_call": timings.get("task_s", 0.0) / max(1, ray_run.run.calls),
                  "driver_commit_s": timings.get("driver_commit_s", 0.0),
                  "actors_start_s": timings.get("actors_start_s", 0.0),
                  "steady_calls_per_s": ray_run.run.calls / max(1e-9, timings.get("blocks_span_s", 0.0))}
    out["ideal"] = ideal
    out["same_records"] = same
    return out


class _given:
    """A context manager yielding an executor that is already running (Ray started once for all parts)."""

    def __init__(self, executor):
        self.executor = executor

    def __enter__(self):
        return self.executor

    def __exit__(self, *exc):
        return False


def _records(path: Path) -> list:
    return sorted(path.read_text().splitlines())


def serialization_per_block(ray, rows: int = 64) -> float:
    """Seconds to put one block of ``rows`` pending calls in the object store and read it back."""
    block = [{"key": "k" * 64, "record_id": f"q{i}", "prompt": json.dumps(f"prompt {i}" * 20), "reference": "null",
              "prompt_hash": "h" * 64} for i in range(rows)]
    started = time.perf_counter()
    for _ in range(20):
        ray.get(ray.put(block))
    return (time.perf_counter() - started) / 20


def bench_bertscore(executor, n_pairs: int) -> dict:
    from torouter.prepare import demo_prompts
    from torouter.prepare.pipeline import score_calls
    from torouter.prepare.scorers import ScorerConfig, make_scorer

    rows = demo_prompts()
    pairs = [(f"k{i}", rows[i % len(rows)]["prompt"][:200], rows[(i * 7) % len(rows)]["reference"][:200])
             for i in range(n_pairs)]
    config = ScorerConfig(metric="bertscore", device="cpu")
    started = time.perf_counter()
    local, _ = score_calls(pairs, make_scorer(config), None)  # model load included, as on a worker
    local_s = time.perf_counter() - started
    started = time.perf_counter()
    on_ray, _ = executor.score_calls(pairs, make_scorer(config), None)
    ray_s = time.perf_counter() - started
    same = all(abs(local[k] - on_ray[k]) < 1e-6 for k in local)
    return {"pairs": n_pairs, "local_s": local_s, "ray_s": ray_s, "local_per_s": n_pairs / local_s,
            "ray_per_s": n_pairs / ray_s, "same_scores": same}


def bench_route(n_prompts: int, actors: int) -> dict:
    """``torouter route`` on both engines: load the saved router, route every prompt."""
    from torouter.data import RoutingDataset
    from torouter.engines.ray_route import route_on_ray
    from torouter.routers import load_router, make_router
    from torouter.synthetic import make_synthetic

    records = make_synthetic(2000 + n_prompts, 1)
    # An MLP: batch-invariant choices (kNN over the synthetic prompts, which repeat templates, has exact
    # ties between neighbours that the batch shape can flip).
    router = make_router("mlp", backend="static", seed=0)
    router.fit(RoutingDataset(records[:2000]))
    prompts = [r.prompt for r in records[2000:]]
    with tempfile.TemporaryDirectory() as tmp:
        router.save(Path(tmp) / "router")
        started = time.perf_counter()
        local = load_router(Path(tmp) / "router").route(prompts, cost_weight=1.0)
        local_s = time.perf_counter() - started
        timings: dict[str, float] = {}
        started = time.perf_counter()
        on_ray = route_on_ray(Path(tmp) / "router", prompts, cost_weight=1.0, actors=actors, timings=timings)
        ray_s = time.perf_counter() - started
    return {"prompts": n_prompts, "local_s": local_s, "ray_s": ray_s, "local_per_s": n_prompts / local_s,
            "ray_per_s": n_prompts / ray_s, "task_s": timings.get("task_s", 0.0),
            "actors_start_s": timings.get("actors_start_s", 0.0),
            "steady_per_s": n_prompts / max(1e-9, timings.get("blocks_span_s", 0.0)), "same": local == on_ray}


def paper_estimate(driver_s_per_call: float, latency_s: float = 2.0, provider_limit: int = 64,
                   in_flight_per_worker: int = 64, worker_usd_per_h: float = 0.10,
                   usd_per_call: float = 0.00039) -> list[dict]:
    """A million prompts x 10 experts: calls, hours and dollars on N workers.

    Each hosted expert answers in ``latency_s`` and its provider allows ``provider_limit``
    calls in flight (the manifest's concurrency); a worker (1 CPU) holds up to
    ``in_flight_per_worker`` waiting calls; the driver commits each result in
    ``driver_s_per_call`` (measured). ``usd_per_call``: 500 input + 200 output tokens at
    $0.15 / $0.60 per million (a small hosted model).
    """
    calls, experts = 1_000_000 * 10, 10
    rows = []
    for workers in (1, 4, 16, 64):
        in_flight = min(workers * in_flight_per_worker, experts * provider_limit)
        rate = min(in_flight / latency_s, 1 / driver_s_per_call)
        hours = calls / rate / 3600
        rows.append({"workers": workers, "calls": calls, "calls_per_s": rate, "hours": hours,
                     "compute_usd": hours * workers * worker_usd_per_h, "api_usd": calls * usd_per_call})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--route-prompts", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    # The simulated experts are imported by name on the workers, which inherit this environment.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *sys.path])
    sys.path.insert(0, str(HERE))
    from torouter.engines.ray_prepare import ray_executor

    started = time.perf_counter()
    with ray_executor(num_cpus=args.workers) as executor:
        ray = executor.ray
        start_s = time.perf_counter() - started
        print(f"Ray {ray.__version__}: local instance with {args.workers} worker CPUs started in {start_s:.1f} s")

        prep = bench_prepare(executor, args.prompts, args.experts, args.concurrency, args.delay)
        ideal = prep["ideal"]
        print(f"\n1. prepare: {args.prompts} prompts x {args.experts} simulated experts ({args.delay * 1000:.0f} ms "
              f"per call, concurrency {args.concurrency} each); ideal {ideal:.0f} calls/s")
        print(f"   {'engine':8} {'calls':>6} {'wall s':>8} {'calls/s':>8} {'of ideal':>9}")
        for engine in ("local", "ray"):
            row = prep[engine]
            print(f"   {engine:8} {row['calls']:>6} {row['wall_s']:>8.2f} {row['calls_per_s']:>8.1f} "
                  f"{row['calls_per_s'] / ideal:>9.2f}")
        steady = prep["ray"]["steady_calls_per_s"]
        print(f"   {'ray*':8} {'':>6} {'':>8} {steady:>8.1f} {steady / ideal:>9.2f}   * once its actors run "
              f"(they took {prep['ray']['actors_start_s']:.1f} s to start)")
        print(f"   ray / local: {prep['ray']['calls_per_s'] / prep['local']['calls_per_s']:.2f}x in all, "
              f"{steady / prep['local']['calls_per_s']:.2f}x once started; same records: {prep['same_records']}")
        calls = prep["ray"]["calls"]
        block = serialization_per_block(ray)
        driver_per_call = prep["ray"]["driver_commit_s"] / max(1, calls)
        print(f"   split: task time {prep['ray']['task_s_per_call'] * 1000:.1f} ms per call (inside actors, "
              f"includes the {args.delay * 1000:.0f} ms wait); driver commit {driver_per_call * 1000:.2f} ms per call "
              f"({prep['ray']['driver_commit_s']:.2f} s in all); serialising a 64-call block "
              f"{block * 1000:.2f} ms; Ray start {start_s:.1f} s (once)")

        score = bench_bertscore(executor, args.pairs)
        print(f"\n2. BERTScore (MiniLM, CPU): {score['pairs']} pairs, model loads included")
        print(f"   local {score['local_s']:.2f} s ({score['local_per_s']:.1f} pairs/s) | ray {score['ray_s']:.2f} s "
              f"({score['ray_per_s']:.1f} pairs/s) -> {score['ray_per_s'] / score['local_per_s']:.2f}x; "
              f"same scores: {score['same_scores']}")

        route = bench_route(args.route_prompts, args.workers)
        print(f"\n3. batch routing: {route['prompts']} prompts, MLP router on the static encoder (router load "
              "included, as in torouter route)")
        print(f"   local {route['local_s']:.2f} s ({route['local_per_s']:.0f} prompts/s) | ray {route['ray_s']:.2f} s "
              f"({route['ray_per_s']:.0f} prompts/s) -> {route['ray_per_s'] / route['local_per_s']:.2f}x; "
              f"same choices: {route['same']}")
        print(f"   split: actors started and loaded the router in {route['actors_start_s']:.1f} s; then "
              f"{route['steady_per_s']:.0f} prompts/s ({route['steady_per_s'] / route['local_per_s']:.2f}x local); "
              f"task time {route['task_s']:.2f} s over {args.workers} actors")

    print("\n4. paper estimate: 1,000,000 prompts x 10 hosted experts (2 s per call, 64 in flight per provider, "
          "64 waiting calls per 1-CPU worker, $0.10 per worker-hour, $0.00039 per call)")
    print(f"   {'workers':>7} {'calls':>10} {'calls/s':>8} {'hours':>7} {'compute $':>10} {'API $':>8}")
    for row in paper_estimate(max(driver_per_call, 1e-6)):
        print(f"   {row['workers']:>7} {row['calls']:>10,} {row['calls_per_s']:>8.0f} {row['hours']:>7.1f} "
              f"{row['compute_usd']:>10.2f} {row['api_usd']:>8.0f}")


if __name__ == "__main__":
    main()
