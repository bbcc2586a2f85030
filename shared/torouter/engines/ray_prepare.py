"""``prepare`` and ``score`` on Ray Data: expert calls and scoring as ``map_batches`` actors.

Each expert's pending calls become a dataset whose blocks are answered by a pool of actors
of that expert (``ActorPoolStrategy``). The pool is sized so that actors times calls in
flight per actor equals the manifest's ``concurrency``: the limit holds across the whole
cluster, with no coordinator on the call path. A Hugging Face expert's actors ask for the
GPU its model needs (one each, when the cluster has GPUs and the manifest does not pin it to
the CPU). Every call goes through ``Runner.call``, so retries, timeouts, redaction and the
recorded error of a failing expert are exactly the local engine's.

Where finished calls are kept (the cache design): the run's SQLite cache
(``OUT.cache.sqlite``) stays the one file ``prepare`` reads, written by the driver only.
Each block a worker answers has its own small SQLite shard under ``<cache>.shards/``,
named after the block's calls and written with the same ``CallCache`` (WAL, one commit per
call, an OS lock while open), so a call counts as finished only once it is committed there.
The driver copies each block's results into the run's cache as they stream back, then
deletes the block's shard. What a lost worker finished stays in its shard and Ray retries the
block on another worker, which reads the shard first and makes only the calls it lacks; what
a killed driver had not yet copied is merged from the shards when the command is run again
(and at the end of every run). On a cluster of several machines the cache's folder must be
on storage every node mounts (NFS, a shared volume), like the output itself.

Scoring runs the same ``score_calls`` as the local engine, one batch of answers per
actor call, on GPU actors when the cluster has GPUs and the metric is BERTScore.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..prepare.base import Expert
from ..prepare.cache import CacheError, CacheLock, CallCache
from ..prepare.manifest import ManifestError
from ..prepare.pipeline import SCORE_CHUNK, PrepareError, score_calls
from ..prepare.runner import Backoff, Job, Runner, RunStats
from ..prepare.scorers import Scorer, ScoreError, ScorerConfig, make_scorer
from . import EngineError
from .ray_session import cluster_gpus, cluster_workers, ray_session

MAX_BLOCK_CALLS = 256
MAX_IN_FLIGHT_PER_ACTOR = 64  # calls of a hosted expert one actor waits on at once


def shard_dir(cache_path: Path) -> Path:
    """The folder of the per-block shards of the run whose cache is ``cache_path``."""
    return cache_path.with_name(cache_path.name + ".shards")


def merge_shards(store: CallCache) -> int:
    """Copy every shard's calls and scores into ``store``, then delete the shards; returns the calls merged.

    A shard another process still holds (a worker of a run in progress) is left alone.
    """
    folder = shard_dir(store.path)
    if not folder.is_dir():
        return 0
    merged = 0
    for shard in sorted(folder.glob("*.sqlite"), key=lambda p: p.stat().st_mtime):
        merged += _take_shard(shard, store)
    return merged


def _take_shard(shard: Path, store: CallCache | None) -> int:
    """Merge ``shard`` into ``store`` (unless None: its calls are there already) and delete it;
    0 when a worker still holds it."""
    lock = CacheLock(shard)
    try:
        lock.acquire()
    except CacheError:
        return 0
    try:
        merged = store.merge(shard) if store is not None and shard.exists() else 0
        for suffix in ("", "-wal", "-shm"):
            Path(f"{shard}{suffix}").unlink(missing_ok=True)
    finally:
        lock.release()
        lock.path.unlink(missing_ok=True)
    return merged


def _block_name(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]


class ExpertCalls:
    """A Ray Data actor of one expert: answers a block of calls, committing each to the block's shard."""

    def __init__(self, expert: Expert, shards: str, in_flight: int, backoff: Backoff | None):
        # The driver's expert object, not yet started (a backend registered only in the driver, or an
        # Expert built in code, arrives as it is); each actor starts its own copy.
        self.expert = expert
        self.shards = Path(shards)
        self.in_flight = in_flight
        self.loop = asyncio.new_event_loop()
        self.backoff = backoff
        # Ray restarts an actor whose constructor fails, without end: an expert that cannot start
        # (a bad import path, a model that does not load) fails the first block instead, and the run.
        self.start_error: BaseException | None = None
        try:
            self.loop.run_until_complete(self.expert.start())
        except Exception as exc:  # noqa: BLE001 - raised again, as it is, by __call__
            self.start_error = exc

    def __call__(self, block: Mapping[str, Any]) -> dict[str, list[Any]]:
        if self.start_error is not None:
            raise portable(self.start_error)
        started, started_at = time.perf_counter(), time.time()
        expert = self.expert
        keys = [str(k) for k in block["key"]]
        jobs = [Job(key, expert.name, str(rid), json.loads(str(prompt)), json.loads(str(ref)), str(ph))
                for key, rid, prompt, ref, ph in zip(keys, block["record_id"], block["prompt"], block["reference"],
                                                     block["prompt_hash"])]
        with CallCache(self.shards / f"{_block_name(keys)}.sqlite") as shard:
            # What a worker lost mid-block had finished is already here: make only the rest.
            results = shard.get_many(keys)
            todo = [job for job in jobs if job.key not in results]
            runner = Runner({expert.name: expert}, shard, backoff=self.backoff, progress=False)
            gate = asyncio.Semaphore(self.in_flight)

            async def one(job: Job) -> None:
                async with gate:
                    result = await runner.call(expert, job)
                shard.put(job.key, expert.name, expert.settings_hash, job.prompt_hash, result)
                results[job.key] = result

            async def run_all() -> None:
                await asyncio.gather(*(one(job) for job in todo))

            self.loop.run_until_complete(run_all())
        spent, n = time.perf_counter() - started, len(keys)
        # Timings for the work split (bench_ray.py): per call, and when the block ran (wall clock).
        return {"key": keys, "result": [json.dumps(results[k], ensure_ascii=False) for k in keys],
                "task_s": [spent / max(1, n)] * n, "started_at": [started_at] * n, "ended_at": [time.time()] * n}


def pool_size(concurrency: int, workers: int, heavy: bool) -> int:
    """Actors for an expert, always a divisor of its ``concurrency``, so that actors x calls in flight
    per actor is exactly the manifest's concurrency (the limit holds cluster-wide).

    A model run in the actor (``heavy``: a Hugging Face expert) gets as many actors as the cluster
    has workers for, one model each; a hosted API only waits on the network, so its calls share as
    few actors as hold them (up to ``MAX_IN_FLIGHT_PER_ACTOR`` each): fewer processes to start.
    """
    if heavy:
        return max(d for d in range(1, min(concurrency, workers) + 1) if concurrency % d == 0)
    return min(d for d in range(1, concurrency + 1)
               if concurrency % d == 0 and concurrency // d <= MAX_IN_FLIGHT_PER_ACTOR)


def _wants_gpu(expert: Expert, gpus: int) -> bool:
    if gpus == 0 or expert.kind != "huggingface":
        return False
    device = getattr(expert.options, "device", None)
    return device is None or str(device).startswith("cuda")


def portable(exc: BaseException) -> BaseException:
    """``exc`` as an error Ray can carry back to the driver: torouter's errors with only their message
    (an ``ExpertBuildError`` takes more arguments than its ``args`` hold, so it cannot be rebuilt there)."""
    for kind in (ManifestError, ScoreError, CacheError):
        if isinstance(exc, kind):
            return kind(str(exc))
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


class RayExecutor:
    """Runs ``prepare``'s calls and scoring on the connected Ray cluster."""

    def __init__(self, ray: Any):
        self.ray = ray
        self.workers = cluster_workers(ray)
        self.gpus = cluster_gpus(ray)
        self.timings: dict[str, float] = {}

    def run_calls(self, jobs: Sequence[Job], experts: Sequence[Expert], store: CallCache,
                  backoff: Backoff | None = None) -> RunStats:
        """Make ``jobs`` on the cluster, committing each result to ``store``; same ``RunStats`` as ``Runner``."""
        ray = self.ray
        started = time.perf_counter()
        by_expert: dict[str, list[Job]] = {e.name: [] for e in experts}
        for job in jobs:
            by_expert[job.expert].append(job)
        stats = RunStats(done={n: 0 for n, js in by_expert.items() if js},
                         failed={n: 0 for n, js in by_expert.items() if js})
        datasets = []
        for expert in experts:
            expert_jobs = by_expert[expert.name]
            if not expert_jobs:
                continue
            heavy = expert.kind == "huggingface"
            actors = pool_size(expert.concurrency, self.workers, heavy)
            in_flight = expert.concurrency // actors
            block_calls = max(1, min(MAX_BLOCK_CALLS, in_flight * 8, math.ceil(len(expert_jobs) / actors)))
            rows = [{"key": j.key, "record_id": j.record_id, "prompt": json.dumps(j.prompt, ensure_ascii=False),
                     "reference": json.dumps(j.reference), "prompt_hash": j.prompt_hash}
                    for j in expert_jobs]
            gpu = _wants_gpu(expert, self.gpus)
            dataset = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / block_calls))
            datasets.append(dataset.map_batches(
                ExpertCalls, batch_size=None, batch_format="numpy",
                fn_constructor_kwargs={"expert": expert, "shards": str(shard_dir(store.path)),
                                       "in_flight": in_flight, "backoff": backoff},
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1 if heavy else 1 / 8, num_gpus=1 if gpu else 0))
        names = {e.name: e for e in experts}
        by_key = {j.key: j for j in jobs}
        task_s = 0.0
        first_start, last_end = math.inf, 0.0
        run_started_at = time.time()
        if datasets:
            combined = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
            try:
                for batch in combined.iter_batches(batch_size=None, batch_format="numpy"):
                    commit_started = time.perf_counter()
                    first_start = min(first_start, float(min(batch["started_at"])))
                    last_end = max(last_end, float(max(batch["ended_at"])))
                    for key, result_json, task in zip(batch["key"], batch["result"], batch["task_s"]):
                        job = by_key[str(key)]
                        result = json.loads(str(result_json))
                        expert = names[job.expert]
                        store.put(job.key, expert.name, expert.settings_hash, job.prompt_hash, result)
                        (stats.done if result["ok"] else stats.failed)[expert.name] += 1
                        task_s += float(task)
                    # The block's calls are in the run's cache now: its shard is no longer needed.
                    _take_shard(shard_dir(store.path) / f"{_block_name([str(k) for k in batch['key']])}.sqlite",
                                None)
                    self.timings["driver_commit_s"] = (self.timings.get("driver_commit_s", 0.0)
                                                       + time.perf_counter() - commit_started)
            except (CacheError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - a Ray failure says what failed underneath
                cause = _root_cause(exc)
                if isinstance(cause, (ManifestError, CacheError)):
                    raise cause from None
                raise PrepareError(f"the Ray engine stopped: {type(cause).__name__}: {cause}; finished calls "
                                   "are saved: run the same command to resume") from None
        merge_shards(store)
        stats.elapsed_s = time.perf_counter() - started
        self.timings["calls_wall_s"] = stats.elapsed_s
        self.timings["task_s"] = task_s
        if last_end > 0:
            # Until the first block starts: scheduling and starting the actors (importing, building experts).
            self.timings["actors_start_s"] = first_start - run_started_at
            self.timings["blocks_span_s"] = last_end - first_start
        return stats

    def score_calls(self, pairs: Sequence[tuple[str, str, str]], scorer: Scorer, cache: CallCache | None = None,
                    progress: bool = False) -> tuple[dict[str, float | None], list[tuple[str, str]]]:
        """``pipeline.score_calls`` with the batches scored on actors; the same scores and problems."""
        ray = self.ray
        started = time.perf_counter()
        signature = scorer.config.signature
        unique = list({key: (key, answer, reference) for key, answer, reference in pairs}.values())
        scores = cache.get_scores(signature, [key for key, _, _ in unique]) if cache is not None else {}
        todo = [p for p in unique if p[0] not in scores]
        problems: list[tuple[str, str]] = []
        if todo:
            gpu = self.gpus > 0 and scorer.config.metric == "bertscore"
            actors = max(1, min(self.gpus if gpu else self.workers, math.ceil(len(todo) / SCORE_CHUNK) or 1))
            chunk = max(1, min(SCORE_CHUNK, math.ceil(len(todo) / actors)))
            rows = [{"key": k, "answer": a, "reference": r} for k, a, r in todo]
            dataset = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / chunk)).map_batches(
                ScoreBatch, batch_size=None, batch_format="numpy", fn_constructor_kwargs={"config": scorer.config},
                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=1 if gpu else 0)
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    found = {str(k): (None if math.isnan(float(v)) else float(v))
                             for k, v in zip(batch["key"], batch["score"])}
                    problems.extend((str(k), str(p)) for k, p in zip(batch["key"], batch["problem"]) if p)
                    if cache is not None:
                        cache.put_scores(signature, found)
                    scores.update(found)
            except Exception as exc:  # noqa: BLE001 - a Ray failure says what failed underneath
                cause = _root_cause(exc)
                if isinstance(cause, (ScoreError, CacheError)):
                    raise cause from None
                raise PrepareError(f"scoring on Ray stopped: {type(cause).__name__}: {cause}") from None
        self.timings["score_wall_s"] = time.perf_counter() - started
        return scores, problems


class ScoreBatch:
    """A Ray Data actor that scores blocks of ``(key, answer, reference)`` with one scorer."""

    def __init__(self, config: ScorerConfig):
        self.start_error: BaseException | None = None  # raised by __call__: see ExpertCalls
        try:
            self.scorer = make_scorer(config)
        except Exception as exc:  # noqa: BLE001
            self.start_error = exc

    def __call__(self, block: Mapping[str, Any]) -> dict[str, list[Any]]:
        if self.start_error is not None:
            raise portable(self.start_error)
        triples = [(str(k), str(a), str(r)) for k, a, r in zip(block["key"], block["answer"], block["reference"])]
        scores, problems = score_calls(triples, self.scorer, None, False)
        why = dict(problems)
        keys = [k for k, _, _ in triples]
        return {"key": keys, "score": [math.nan if scores.get(k) is None else scores[k] for k in keys],
                "problem": [why.get(k, "") for k in keys]}


@contextlib.contextmanager
def ray_executor(address: str | None = None, num_cpus: int | None = None,
                 progress: bool = False) -> Iterator[RayExecutor]:
    """A ``RayExecutor`` on a joined cluster (``address``) or a local Ray instance, for one run."""
    with ray_session(address, num_cpus, progress) as ray:
        yield RayExecutor(ray)


__all__ = ["EngineError", "ExpertCalls", "RayExecutor", "ScoreBatch", "merge_shards", "pool_size", "ray_executor",
           "shard_dir"]
