"""What routing costs the endpoint: ``torouter serve`` with a real router against a constant one.

Starts ``torouter serve`` on loopback (as ``bench_serve.py`` does: instant rule-based
experts, bearer auth) once per router, and sends the same plain chat requests at 1, 16
and 64 concurrent clients. Routers, trained on the synthetic data:

- ``best-single``: a constant router (no encoder), the endpoint's ceiling;
- ``knn`` on MiniLM through sentence-transformers (the default backend);
- ``knn`` on the ``static`` backend (model2vec distilled from MiniLM; needs the ``fast`` extra).

Every request's prompt is distinct, so neither the prediction nor the decision cache
helps: each request costs one encoder pass (batched with the requests that arrive with it).
Prints requests/s and p50/p99 latency per router and concurrency, and each router's
throughput as a share of the constant router's. Server and client share the machine's cores.

    python benchmarks/bench_serve_routing.py [--requests 400] [--backends sentence-transformers,static]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from bench_serve import load, row, serve  # noqa: E402
from torouter import RoutingDataset, make_router  # noqa: E402
from torouter.synthetic import make_synthetic  # noqa: E402

CONCURRENCY = (1, 16, 64)


async def drive(base: str, token: str, prompts: list[str], n: int, concurrency: int) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=120) as client:
        async def plain(i: int) -> int:
            response = await client.post("/v1/chat/completions", json={
                "model": "torouter", "messages": [{"role": "user", "content": prompts[i]}]})
            return response.status_code

        await load(plain, min(n, 20), min(concurrency, 8))  # warm up: connections, first batches
        offset = min(n, 20)
        wall, latencies, codes = await load(lambda i: plain(offset + i), n, concurrency)
    failed = sum(code != 200 for code in codes)
    return {"wall": wall, "latencies": latencies, "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="Requests per router and concurrency.")
    parser.add_argument("--backends", default="sentence-transformers,static",
                        help="Encoder backends of the k-NN router to compare with the constant router.")
    args = parser.parse_args()
    token = secrets.token_urlsafe(24)
    os.environ["BENCH_TOROUTER_TOKEN"] = token
    n = args.requests
    # Distinct prompts (the synthetic generator's questions, numbered) so no request hits a cache.
    base_prompts = [str(r.prompt) for r in make_synthetic(240, seed=3)]
    routers = {"best-single (constant)": ("best-single", None)}
    for backend in filter(None, args.backends.split(",")):
        routers[f"knn, {backend}"] = ("knn", backend)
    train = RoutingDataset(make_synthetic(240))
    results: dict[tuple[str, int], dict] = {}
    print(f"loopback, instant rule-based experts, auth on, {os.cpu_count()} CPUs shared by server and client; "
          f"{n} distinct prompts per cell\n")
    print(f"{'router, concurrent clients':<46} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for label, (method, backend) in routers.items():
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            options = {"k": 5} if method == "knn" else {}
            if backend is not None:
                options["backend"] = backend
            make_router(method, **options).fit(train).save(workdir / "router")
            with serve(workdir, token, workdir / "no-faults") as (base, _pid):
                for concurrency in CONCURRENCY:
                    prompts = [f"{base_prompts[i % len(base_prompts)]} (#{concurrency}-{i})" for i in range(n + 20)]
                    result = asyncio.run(drive(base, token, prompts, n, concurrency))
                    extra = f"{result['failed']} failed" if result["failed"] else ""
                    results[(label, concurrency)] = row(f"{label}, {concurrency}", n, result["wall"],
                                                        result["latencies"], extra)
    constant = "best-single (constant)"
    print("\nthroughput with routing as a share of the constant router's (target >= 0.8x at 16 clients):")
    for label in routers:
        if label == constant:
            continue
        shares = [results[(label, c)]["rps"] / results[(constant, c)]["rps"] for c in CONCURRENCY]
        print(f"  {label:<32} " + "  ".join(f"{c} clients {s:.2f}x" for c, s in zip(CONCURRENCY, shares)))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"whole run {time.perf_counter() - started:.0f} s")
