"""Overhead of ``ChatTORouter`` over the experts it routes to, with instant local experts.

Prints, for a k-NN router on the synthetic data and ``RuleBasedFakeChatModel`` experts (which
answer in microseconds, so what is measured is the adapter, not a model):

* the router's own routing latency (``Controller.decide``: encoder + k-NN + policy);
* ``ChatTORouter.invoke`` latency with that router, and with a router whose predictions
  are looked up from a table (routing cost ~0), i.e. invoke latency minus routing latency.
  Target: under 1 ms p50. The same for ``ainvoke``, whose routing runs in a worker thread;
* calling the chosen expert directly, for comparison;
* batch throughput: ``ChatTORouter.batch`` (one router call for the batch) against
  calling the chosen experts' own ``batch`` directly.

    python benchmarks/bench_langchain.py [--n 200] [--batch 64]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from langchain_torouter import RuleBasedFakeChatModel, ChatTORouter  # noqa: E402
from torouter import RoutingDataset, make_router  # noqa: E402
from torouter.synthetic import EXPERTS, make_synthetic  # noqa: E402

TARGET_MS = 1.0


def table_router(router, texts: list[str]):
    """A copy of ``router`` answering from precomputed predictions, so routing costs ~nothing."""
    table = dict(zip(texts, router.predict(texts)))
    fast = copy.copy(router)
    fast.predict = lambda prompts: np.stack([table[p] for p in prompts])
    return fast


def timed_ms(func, items, repeat: int = 1) -> list[float]:
    out = []
    for _ in range(repeat):
        for item in items:
            start = time.perf_counter()
            func(item)
            out.append((time.perf_counter() - start) * 1e3)
    return out


def summary(values: list[float]) -> str:
    return f"p50 {statistics.median(values):8.3f} ms   p95 {np.percentile(values, 95):8.3f} ms"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="prompts timed one by one")
    parser.add_argument("--batch", type=int, default=64, help="prompts per batch call")
    parser.add_argument("--cost-weight", type=float, default=50.0)
    args = parser.parse_args(argv)

    router = make_router("knn", k=5).fit(RoutingDataset(make_synthetic(240)))
    prompts = [r.prompt for r in make_synthetic(max(args.n, args.batch), seed=1)]
    experts = {name: RuleBasedFakeChatModel(model=name) for name in EXPERTS}
    routed = ChatTORouter(experts=experts, router=router, cost_weight=args.cost_weight)
    instant = ChatTORouter(experts=experts, router=table_router(router, prompts), cost_weight=args.cost_weight)
    chosen = {p: d.expert for p, d in zip(prompts, routed.controller.decide_many(prompts))}

    sample = prompts[: args.n]
    for p in sample[:20]:  # warm up encoder, callbacks, caches
        routed.invoke(p)
        instant.invoke(p)

    results: dict[str, list[float]] = {
        "routing (Controller.decide)": timed_ms(routed.controller.decide, sample),
        "ChatTORouter.invoke": timed_ms(routed.invoke, sample),
        "ChatTORouter.invoke, routing ~0": timed_ms(instant.invoke, sample, repeat=3),
        "chosen expert .invoke directly": timed_ms(lambda p: experts[chosen[p]].invoke(p), sample, repeat=3),
    }

    async def async_latencies() -> list[float]:
        out = []
        for p in sample:
            start = time.perf_counter()
            await instant.ainvoke(p)
            out.append((time.perf_counter() - start) * 1e3)
        return out

    results["ChatTORouter.ainvoke, routing ~0"] = asyncio.run(async_latencies())

    print(f"Latency over {len(sample)} prompts (router: k-NN on MiniLM, CPU; experts: RuleBasedFakeChatModel)")
    for name, values in results.items():
        print(f"  {name:36s} {summary(values)}")
    route_p50 = statistics.median(results["routing (Controller.decide)"])
    invoke_p50 = statistics.median(results["ChatTORouter.invoke"])
    overhead_p50 = statistics.median(results["ChatTORouter.invoke, routing ~0"])
    direct_p50 = statistics.median(results["chosen expert .invoke directly"])
    print(f"  invoke minus routing, p50                  {overhead_p50:8.3f} ms  "
          f"({'meets' if overhead_p50 < TARGET_MS else 'MISSES'} the {TARGET_MS:.0f} ms target; "
          f"{overhead_p50 - direct_p50:.3f} ms over calling the expert directly)")

    batch = prompts[: args.batch]
    by_expert: dict[str, list] = {}
    for p in batch:
        by_expert.setdefault(chosen[p], []).append(p)

    def throughput(func, repeat: int = 3) -> float:
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            func()
            best = min(best, time.perf_counter() - start)
        return len(batch) / best

    rates = {
        "ChatTORouter.batch": throughput(lambda: routed.batch(batch)),
        "ChatTORouter.batch, routing ~0": throughput(lambda: instant.batch(batch)),
        "chosen experts' .batch directly": throughput(
            lambda: [experts[name].batch(group) for name, group in by_expert.items()]),
        "ChatTORouter.invoke one by one": throughput(lambda: [routed.invoke(p) for p in batch], repeat=1),
        "routing only (decide_many)": throughput(lambda: routed.controller.decide_many(batch)),
    }
    print(f"Batch throughput, {len(batch)} prompts per call (best of 3)")
    for name, rate in rates.items():
        print(f"  {name:36s} {rate:10.0f} prompts/s")
    direct = rates["chosen experts' .batch directly"]
    print(f"  ChatTORouter.batch / direct                {rates['ChatTORouter.batch'] / direct:10.3f}x "
          "(bound by routing; see routing only)")
    print(f"  ChatTORouter.batch, routing ~0 / direct    {rates['ChatTORouter.batch, routing ~0'] / direct:10.3f}x")
    return {"routing_p50_ms": route_p50, "invoke_p50_ms": invoke_p50, "invoke_minus_routing_p50_ms": overhead_p50,
            "direct_p50_ms": direct_p50, **{f"{k} (prompts/s)": v for k, v in rates.items()}}


if __name__ == "__main__":
    main()
