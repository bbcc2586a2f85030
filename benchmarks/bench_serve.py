"""Load and fault test of ``torouter serve`` on loopback: throughput, latency and resources under faults.

Starts ``torouter serve`` (a k-NN router on the synthetic data, bearer auth on) as a
subprocess on 127.0.0.1 and drives it with httpx. Its four experts are ``BenchExpert``s
(rule-based answers in microseconds); a flag file switches three of them to faults at run
time, so the healthy and the faulty runs share one server process:

* ``edge-small`` raises at once (an outage), ``code-7b`` hangs (a blocking call handed
  to a thread that never returns), ``med-7b`` is slow (0.3 s per answer, 0.1 s between
  streamed tokens); ``cloud-large`` stays healthy.

The run prints, side by side:

1. healthy experts: requests/s and p50/p99 latency, plain and streamed, and one at a
   time; the chosen expert called in-process is the floor the endpoint is compared with;
2. the same traffic with the faults on: how many requests were answered, p50/p99/max
   latency against the deadlines (``expert_s`` 1 s, 5 s for the slow expert; ``request_s`` 20 s);
3. 200 concurrent slow streams (the slow expert, clients that read slowly) while a
   separate process polls ``/health``: its latency must stay flat;
4. server RSS and thread count before, during and after 10,000 requests, 1,000 of them
   abandoned by their client mid-request (the server cancels their expert calls);
5. requests the server must refuse (a lone surrogate, a 5,000-digit integer,
   ``cost_weight: Infinity``) sent inside a burst of valid requests: the valid ones must
   all succeed.

The server and this client share the machine's cores, so the figures are for the whole loop.

    python benchmarks/bench_serve.py [--quick] [--requests 500] [--concurrency 16] [--rss-requests 10000]
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
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from langchain_core.outputs import ChatGenerationChunk  # noqa: E402

from langchain_torouter import RuleBasedFakeChatModel  # noqa: E402
from torouter.synthetic import EXPERTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAULTS = {"edge-small": "raise", "code-7b": "hang", "med-7b": "slow"}
EXPERT_S, REQUEST_S = 1.0, 20.0

# Polls /health from a process of its own (so the benchmark client's own event loop, busy
# with hundreds of streams, is not what gets measured) until the file argv[2] exists.
PROBE = """
import json, sys, time, os, httpx
latencies = []
with httpx.Client(base_url=sys.argv[1], timeout=30) as client:
    while not os.path.exists(sys.argv[2]):
        start = time.perf_counter()
        assert client.get("/health").status_code == 200
        latencies.append((time.perf_counter() - start) * 1e3)
        time.sleep(0.05)
print(json.dumps(latencies))
"""


class BenchExpert(RuleBasedFakeChatModel):
    """A rule-based expert that turns to ``fault`` while the file ``flag`` exists."""

    fault: Literal["raise", "hang", "slow"] = "slow"
    flag: str = ""
    delay: float = 0.3
    token_delay: float = 0.1

    def _faulty(self) -> bool:
        return bool(self.flag) and os.path.exists(self.flag)

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        if self._faulty():
            if self.fault == "raise":
                raise ConnectionError(f"{self.model_name} is unreachable")
            if self.fault == "hang":  # a blocking SDK call that never returns, handed to a thread
                await asyncio.to_thread(threading.Event().wait)
            await asyncio.sleep(self.delay)
        return self._generate(messages, stop=stop, **kwargs)

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        faulty = self._faulty()
        if faulty and self.fault != "slow":
            await self._agenerate(messages, stop=stop, **kwargs)
        async for chunk in super()._astream(messages, stop=stop, **kwargs):
            if faulty:
                await asyncio.sleep(self.token_delay)
            yield chunk


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(workdir: Path, token: str, flag: Path):
    """This benchmark's server: the ``BenchExpert`` experts behind a k-NN router, bearer auth on."""
    experts = {n: {"class": "bench_serve:BenchExpert",
                   "kwargs": {"model": n, "fault": FAULTS.get(n, "slow"), "flag": str(flag) if n in FAULTS else ""}}
               for n in EXPERTS}
    config = {"router": "router", "cost_weight": 50, "auth": {"token_env": "BENCH_TOROUTER_TOKEN"},
              "experts": experts,
              # The slow expert may take 5 s (its whole answer, or a gap in its stream); the others 1 s.
              "timeouts": {"expert_s": EXPERT_S, "request_s": REQUEST_S, "experts": {"med-7b": 5.0}},
              "limits": {"expert_threads": 8}}
    (workdir / "router.yaml").write_text(yaml.safe_dump(config))
    with running(workdir / "router.yaml", {"BENCH_TOROUTER_TOKEN": token}) as server:
        yield server


@contextlib.contextmanager
def running(config: Path, env: dict[str, str] | None = None):
    """``torouter serve --config config`` on a free loopback port, yielding its base URL and pid once
    ``/health`` answers; its stderr goes to ``server.log`` beside the config; stopped with SIGTERM
    (then killed) on exit. ``env`` is added to this process's environment."""
    workdir = config.parent
    port = free_port()
    path = [str(REPO / "benchmarks"), str(REPO), str(REPO / "shared"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(filter(None, path))}
    log = (workdir / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "torouter.cli", "serve", "--config", str(config),
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # up to 120 s to import and load the router
            if process.poll() is not None:
                raise RuntimeError(f"torouter serve exited: {(workdir / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("torouter serve did not come up in 120 s")
        yield base, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def memory(pid: int) -> tuple[float, int]:
    """Resident memory (MB) and thread count of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


async def load(call: Callable[[int], Awaitable[Any]], n: int, concurrency: int):
    """Run ``call(i)`` for i < n, at most ``concurrency`` at once: (wall seconds, latencies ms, results)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = [0.0] * n
    results: list[Any] = [None] * n

    async def one(i: int) -> None:
        async with gate:
            start = time.perf_counter()
            results[i] = await call(i)
            latencies[i] = (time.perf_counter() - start) * 1e3

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - start, latencies, results


def row(label: str, n: int, wall: float | None, latencies: list[float], extra: str = "") -> dict[str, float]:
    p50, p99, worst = (float(np.percentile(latencies, q)) for q in (50, 99, 100))
    rate = f"{n / wall:8.1f}" if wall else f"{'':>8}"
    print(f"{label:<46} {rate} {p50:9.1f} {p99:9.1f} {worst:9.1f}  {extra}")
    return {"rps": n / wall if wall else None, "p50_ms": p50, "p99_ms": p99, "max_ms": worst}


async def run(base: str, pid: int, token: str, prompts: list[str], flag: Path, args: argparse.Namespace) -> dict:
    n, concurrency = args.requests, args.concurrency
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as client:
        async def plain(i: int, model: str = "torouter") -> tuple[int, str, bool]:
            response = await client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]})
            if response.status_code != 200:
                return response.status_code, "", False
            body = response.json()
            return 200, body["model"], body["torouter"]["fallback"]

        async def streamed(i: int, model: str = "torouter", pause: float = 0.0) -> tuple[int, float | None]:
            start, first = time.perf_counter(), None
            async with client.stream("POST", "/v1/chat/completions", json={
                    "model": model, "stream": True,
                    "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}) as response:
                if response.status_code != 200:
                    await response.aread()
                    return response.status_code, None
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: "):
                        first = (time.perf_counter() - start) * 1e3
                    if line == "data: [DONE]":
                        return 200, first
                    if pause:
                        await asyncio.sleep(pause)
            return 599, first  # the stream ended without [DONE]

        print(f"{'':<46} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
        # 1. healthy experts
        await load(plain, min(n, 2 * concurrency), concurrency)  # warm up connections and the encoder
        wall, latencies, results = await load(plain, n, concurrency)
        chosen = [model for _, model, _ in results]
        out["healthy"] = row(f"healthy, plain, {concurrency} concurrent", n, wall, latencies,
                             f"{sum(s == 200 for s, _, _ in results)}/{n} answered")
        wall, latencies, results = await load(streamed, n, concurrency)
        out["healthy_stream"] = row("healthy, streamed: last event", n, wall, latencies,
                                    f"first event p50 {np.percentile([f for _, f in results], 50):.1f} ms")
        wall, latencies, _ = await load(plain, args.sequential, 1)
        out["healthy_sequential"] = row("healthy, plain, one at a time", args.sequential, wall, latencies)
        experts = {name: RuleBasedFakeChatModel(model=name) for name in EXPERTS}

        async def direct(i: int) -> None:
            await experts[chosen[i]].ainvoke([("user", prompts[i])])

        wall, latencies, _ = await load(direct, n, 1)
        out["direct"] = row("chosen expert in-process (no routing/HTTP)", n, wall, latencies)

        # 2. faults: one expert raising, one hanging, one slow
        flag.touch()
        wall, latencies, results = await load(plain, args.fault_requests, concurrency)
        answered = sum(s == 200 for s, _, _ in results)
        by = Counter(model for s, model, _ in results if s == 200)
        late = sum(lat > REQUEST_S * 1e3 for lat in latencies)
        out["faults"] = row(f"faults, plain, {concurrency} concurrent", args.fault_requests, wall, latencies,
                            f"{answered}/{args.fault_requests} answered, {late} past the {REQUEST_S:g} s deadline")
        out["faults"].update(answered=answered, late=late, answered_by=dict(by))
        wall, latencies, results = await load(streamed, args.fault_requests // 2, concurrency)
        answered_stream = sum(s == 200 for s, _ in results)
        out["faults_stream"] = row("faults, streamed: last event", args.fault_requests // 2, wall, latencies,
                                   f"{answered_stream}/{args.fault_requests // 2} answered")
        out["faults_stream"]["answered"] = answered_stream
        print(f"{'':<46} answered by {dict(by)}; deadlines: expert {EXPERT_S:g} s (med-7b 5 s), "
              f"request {REQUEST_S:g} s")

        # 3. 200 slow streams (the slow expert; clients pause 20 ms per event) while /health is polled
        stop = flag.with_name("probe-stop")
        prober = subprocess.Popen([sys.executable, "-c", PROBE, base, str(stop)], stdout=subprocess.PIPE, text=True)
        await asyncio.sleep(1.0)
        wall, latencies, results = await load(lambda i: streamed(i, "med-7b", pause=0.02), args.streams,
                                              args.streams)
        stop.touch()
        health = json.loads(prober.communicate(timeout=60)[0])
        completed = sum(s == 200 for s, _ in results)
        out["slow_streams"] = row(f"{args.streams} slow streams at once: whole stream", args.streams, wall, latencies,
                                  f"{completed}/{args.streams} completed")
        out["health"] = row("  /health meanwhile", len(health), None, health, f"{len(health)} probes")
        flag.unlink()

        # 4. RSS before and after many requests, some abandoned by their client mid-request
        await asyncio.sleep(1.0)
        rss_before, threads_before = memory(pid)
        flag.touch()  # med-7b slow again: the abandoned requests go to it and give up after 0.1 s
        abandoned_every = max(args.rss_requests // args.abandoned, 1)

        async def mixed(i: int) -> int:
            if i % abandoned_every == 0:
                try:
                    await client.post("/v1/chat/completions", timeout=0.1, json={
                        "model": "med-7b", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]})
                except httpx.TimeoutException:
                    return -1
                return 1
            return (await plain(i, "cloud-large"))[0]

        checkpoints: list[tuple[int, float, int]] = []
        results, start, quarter = [], time.perf_counter(), -(-args.rss_requests // 4)
        for first in range(0, args.rss_requests, quarter):
            _, _, part = await load(lambda i, first=first: mixed(first + i), min(quarter, args.rss_requests - first),
                                    concurrency * 2)
            results += part
            checkpoints.append((first + len(part), *memory(pid)))
        wall = time.perf_counter() - start
        flag.unlink()
        await asyncio.sleep(2.0)
        rss_after, threads_after = memory(pid)
        gave_up = sum(r == -1 for r in results)
        ok = sum(r == 200 for r in results)
        statuses = Counter(r for r in results if r not in (-1, 1))
        out["rss"] = {"before_mb": rss_before, "after_mb": rss_after, "threads_before": threads_before,
                      "threads_after": threads_after, "requests": args.rss_requests, "abandoned": gave_up,
                      "answered": ok, "statuses": dict(statuses), "rps": args.rss_requests / wall,
                      "checkpoints": [{"requests": n, "rss_mb": mb, "threads": t} for n, mb, t in checkpoints]}
        print(f"\nRSS {rss_before:.0f} MB -> {rss_after:.0f} MB ({rss_after - rss_before:+.0f} MB), threads "
              f"{threads_before} -> {threads_after}, over {args.rss_requests:,} requests in {wall:.0f} s "
              f"({ok:,} answered, {gave_up:,} abandoned by their client after 0.1 s, statuses {dict(statuses)}); "
              "along the way: "
              + ", ".join(f"{n:,}: {mb:.0f} MB" for n, mb, _ in checkpoints))

        # 5. requests that must be refused, inside a burst of valid ones
        poisons = {
            "lone surrogate": b'{"model": "torouter", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
            "5,000-digit integer": b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], '
                                   b'"max_tokens": ' + b"9" * 5000 + b"}",
            "cost_weight Infinity": b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], '
                                    b'"torouter": {"cost_weight": Infinity}}'}
        valid = [client.post("/v1/chat/completions", json={
            "model": "torouter", "messages": [{"role": "user", "content": prompts[i]}]}) for i in range(args.burst)]
        bad = [client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
               for body in poisons.values()]
        responses = await asyncio.gather(*valid, *bad)
        collateral = sum(r.status_code != 200 for r in responses[:args.burst])
        refused = {name: r.status_code for name, r in zip(poisons, responses[args.burst:])}
        out["poison"] = {"valid": args.burst, "collateral_failures": collateral, "poison_status": refused}
        print(f"poisoned burst: {collateral}/{args.burst} valid requests failed alongside; refused: "
              + ", ".join(f"{name} -> {status}" for name, status in refused.items()))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A smaller run (about a minute).")
    parser.add_argument("--requests", type=int, default=None, help="Requests per healthy pass (default 500).")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=200, help="Slow streams open at once.")
    parser.add_argument("--rss-requests", type=int, default=None,
                        help="Requests of the memory pass, a tenth of them abandoned (default 10,000).")
    args = parser.parse_args(argv)
    scale = 0.2 if args.quick else 1.0
    args.requests = args.requests or int(500 * scale)
    args.sequential = int(100 * scale)
    args.fault_requests = int(400 * scale)
    args.rss_requests = args.rss_requests or int(10_000 * scale)
    args.abandoned = args.rss_requests // 10
    args.burst = 30

    from torouter import RoutingDataset, make_router
    from torouter.synthetic import make_synthetic

    token = secrets.token_urlsafe(24)
    prompts = [str(r.prompt) for r in make_synthetic(max(args.requests, 240), seed=3)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_router("knn", k=5).fit(RoutingDataset(make_synthetic(240))).save(workdir / "router")
        print(f"loopback, k-NN router (MiniLM), BenchExpert experts, auth on, {os.cpu_count()} CPUs shared by "
              f"server and client{' (--quick)' if args.quick else ''}\n")
        flag = workdir / "faults-on"
        with serve(workdir, token, flag) as (base, pid):
            results = asyncio.run(run(base, pid, token, prompts, flag, args))
        log = (workdir / "server.log").read_text().splitlines()
    # What the server logged: its own warnings, and why requests failed (first failure named).
    warnings = Counter(line.split(": ", 2)[-1][:100] for line in log
                       if line.startswith("WARNING") and "chatcmpl-" not in line)
    failures = Counter(line.split(": ", 3)[-1].split(";")[0][:100] for line in log if "chatcmpl-" in line)
    overhead = results["healthy_sequential"]["p99_ms"] - results["direct"]["p99_ms"]
    print(f"\np99 overhead of the endpoint over calling the chosen expert directly, one at a time: {overhead:.1f} ms; "
          f"whole run {time.perf_counter() - started:.0f} s")
    print("server warnings:", dict(warnings.most_common(6)))
    print("request failures logged:", dict(failures.most_common(8)))
    print(json.dumps(results, default=float))
    return results


if __name__ == "__main__":
    main()
