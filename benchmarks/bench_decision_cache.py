"""What a repeated routing decision costs: the controller's decision cache against a fresh decision.

Agent loops, retries and RAG chains that condense then answer route the same question
several times; ``Controller`` caches decisions by routed text and the settings that
shape them. This script measures, side by side in one run on the shipped synthetic
data with the offline MiniLM k-NN router:

- a fresh decision (encoder pass, k-NN, ranking),
- a decision whose prediction is cached but whose settings are new (ranking only),
- a cached decision (look-up, plus extracting the routed text from the prompt),

as p50/p99 microseconds per ``decide`` call on a multi-turn prompt.

    python benchmarks/bench_decision_cache.py [--repeats 2000]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from torouter import Controller, RoutingDataset, make_router  # noqa: E402
from torouter.synthetic import make_synthetic  # noqa: E402


def percentiles(samples: list[float]) -> tuple[float, float]:
    values = np.asarray(samples) * 1e6
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()

    router = make_router("knn", k=5).fit(RoutingDataset(make_synthetic(200, seed=0)))
    questions = [r.prompt for r in make_synthetic(200, seed=1)][:50]

    def conversation(question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": question}]

    prompts = [conversation(q) for q in questions]
    rows = []

    uncached = Controller(router, cache_size=0)
    times = []
    for i in range(min(args.repeats, 200)):
        start = time.perf_counter()
        uncached.decide(prompts[i % len(prompts)])
        times.append(time.perf_counter() - start)
    rows.append(("fresh decision (encoder + k-NN + ranking)", *percentiles(times)))

    cached = Controller(router)
    for prompt in prompts:
        cached.decide(prompt)  # predictions now cached
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        cached.decide(prompts[i % len(prompts)], cost_weight=0.01 * (i + 1))  # new settings every call
        times.append(time.perf_counter() - start)
    rows.append(("prediction cached, new settings (ranking)", *percentiles(times)))

    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        cached.decide(prompts[i % len(prompts)])
        times.append(time.perf_counter() - start)
    rows.append(("decision cached", *percentiles(times)))

    print(f"{'decide() on a 4-turn prompt':45s} {'p50 us':>10s} {'p99 us':>10s}")
    for name, p50, p99 in rows:
        print(f"{name:45s} {p50:10.1f} {p99:10.1f}")
    print(f"cached decision vs fresh: {rows[0][1] / rows[2][1]:.0f}x faster at p50 (target: cached <= 50 us)")


if __name__ == "__main__":
    main()
