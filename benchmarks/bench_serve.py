"""Load test of ``torouter serve`` on loopback: what the HTTP endpoint adds over calling the expert.

Starts ``torouter serve`` (a k-NN router on the synthetic data, ``ChatRuleBased``
experts that answer in microseconds, bearer auth on) as a subprocess on 127.0.0.1,
sends a fixed number of chat completions with a fixed concurrency through httpx,
and prints requests per second and p50/p99 latency for:

* the server, plain and streamed (streamed: time to the last event, and to the first);
* ``ChatTORouter.ainvoke`` in-process on the same prompts (routing, no HTTP);
* the expert the server chose for each prompt, called directly in-process (no routing,
  no HTTP): the floor the endpoint is compared with;
* the same server and direct calls one at a time, for the latency a request pays when
  it does not queue behind others.

The p99 overhead is the server's p99 minus the direct expert call's. The server and
this client share the machine's cores, so the figures are for the whole loop. The
server routes concurrent requests in one router call; ``ChatTORouter.ainvoke`` routes
each call on its own, which is why it can trail the server under load.

    python benchmarks/bench_serve.py [--requests 500] [--concurrency 16] [--sequential 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from langchain_torouter import ChatRuleBased, ChatTORouter  # noqa: E402
from torouter import RoutingDataset, load_router, make_router  # noqa: E402
from torouter.synthetic import EXPERTS, make_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(workdir: Path, token: str):
    """``torouter serve`` on a free loopback port; stopped with SIGTERM (then killed) on exit."""
    config = {"router": "router", "cost_weight": 50, "auth": {"token_env": "BENCH_TOROUTER_TOKEN"},
              "experts": {n: {"class": "langchain_torouter:ChatRuleBased", "kwargs": {"model": n}} for n in EXPERTS}}
    (workdir / "router.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "BENCH_TOROUTER_TOKEN": token,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-m", "torouter.cli", "serve", "--config", str(workdir / "router.yaml"),
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # up to 120 s to import and load the router
            if process.poll() is not None:
                raise RuntimeError(f"torouter serve exited: {process.communicate()[1][-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("torouter serve did not come up in 120 s")
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def load(call: Callable[[int], Awaitable[float | None]], n: int, concurrency: int):
    """Run ``call(i)`` for i < n, at most ``concurrency`` at once: (wall seconds, latencies ms, extra)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = [0.0] * n
    extras: list[float | None] = [None] * n

    async def one(i: int) -> None:
        async with gate:
            start = time.perf_counter()
            extras[i] = await call(i)
            latencies[i] = (time.perf_counter() - start) * 1e3

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - start, latencies, [e for e in extras if e is not None]


def report(label: str, n: int, wall: float, latencies: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(latencies, 50), np.percentile(latencies, 99)
    print(f"{label:<44} {n / wall:8.1f} req/s   p50 {p50:8.2f} ms   p99 {p99:8.2f} ms")
    return {"rps": n / wall, "p50_ms": float(p50), "p99_ms": float(p99)}


async def run(base: str, token: str, prompts: list[str], experts: dict[str, ChatRuleBased], chat: ChatTORouter,
              concurrency: int, sequential: int) -> dict[str, dict[str, float]]:
    n = len(prompts)
    chosen: list[str] = [""] * n
    headers = {"Authorization": f"Bearer {token}"}
    results: dict[str, dict[str, float]] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as client:
        async def plain(i: int) -> None:
            response = await client.post("/v1/chat/completions", json={
                "model": "torouter", "messages": [{"role": "user", "content": prompts[i]}]})
            response.raise_for_status()
            chosen[i] = response.json()["model"]

        async def streamed(i: int) -> float:
            start = time.perf_counter()
            first = None
            async with client.stream("POST", "/v1/chat/completions", json={
                    "model": "torouter", "stream": True,
                    "messages": [{"role": "user", "content": prompts[i]}]}) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: "):
                        first = (time.perf_counter() - start) * 1e3
                    if line == "data: [DONE]":
                        break
            return first

        await load(plain, min(n, 2 * concurrency), concurrency)  # warm up connections and the encoder
        wall, latencies, _ = await load(plain, n, concurrency)
        results["server"] = report("server, plain (HTTP + auth + routing)", n, wall, latencies)
        wall, latencies, first = await load(streamed, n, concurrency)
        results["server_stream"] = report("server, streamed: last event", n, wall, latencies)
        print(f"{'server, streamed: first event':<44} {'':>14}   p50 {np.percentile(first, 50):8.2f} ms   "
              f"p99 {np.percentile(first, 99):8.2f} ms")
        wall, latencies, _ = await load(plain, sequential, 1)
        results["server_sequential"] = report("server, plain, one at a time", sequential, wall, latencies)

    async def routed(i: int) -> None:
        await chat.ainvoke([("user", prompts[i])])

    async def direct(i: int) -> None:
        await experts[chosen[i]].ainvoke([("user", prompts[i])])

    await load(routed, min(n, 2 * concurrency), concurrency)
    wall, latencies, _ = await load(routed, n, concurrency)
    results["chat_model"] = report("ChatTORouter.ainvoke in-process (no HTTP)", n, wall, latencies)
    wall, latencies, _ = await load(direct, n, concurrency)
    results["direct"] = report("chosen expert in-process (no routing/HTTP)", n, wall, latencies)
    wall, latencies, _ = await load(direct, sequential, 1)
    results["direct_sequential"] = report("chosen expert in-process, one at a time", sequential, wall, latencies)
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sequential", type=int, default=100, help="Requests for the one-at-a-time pass.")
    args = parser.parse_args(argv)

    token = secrets.token_urlsafe(24)
    records = make_synthetic(max(args.requests, 240), seed=3)
    prompts = [str(r.prompt) for r in records[: args.requests]]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_router("knn", k=5).fit(RoutingDataset(make_synthetic(240))).save(workdir / "router")
        experts = {name: ChatRuleBased(model=name) for name in EXPERTS}
        chat = ChatTORouter(experts=experts, router=load_router(workdir / "router"), cost_weight=50)
        print(f"{args.requests} requests, {args.concurrency} concurrent, loopback, k-NN router, "
              f"ChatRuleBased experts, {os.cpu_count()} CPUs shared by server and client\n")
        with serve(workdir, token) as base:
            results = asyncio.run(run(base, token, prompts, experts, chat, args.concurrency,
                                      min(args.sequential, args.requests)))
    overhead = results["server"]["p99_ms"] - results["direct"]["p99_ms"]
    alone = results["server_sequential"]["p99_ms"] - results["direct_sequential"]["p99_ms"]
    print(f"\np99 overhead of the endpoint over calling the chosen expert directly: {overhead:.2f} ms at "
          f"{args.concurrency} concurrent (p50 {results['server']['p50_ms'] - results['direct']['p50_ms']:.2f} ms), "
          f"{alone:.2f} ms one at a time "
          f"(p50 {results['server_sequential']['p50_ms'] - results['direct_sequential']['p50_ms']:.2f} ms)")
    print(json.dumps({"p99_overhead_ms": round(overhead, 3), "p99_overhead_sequential_ms": round(alone, 3),
                      **results}, default=float))
    return results


if __name__ == "__main__":
    main()
