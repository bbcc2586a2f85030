"""The paper's phase 1 end to end: every prompt to every expert, answers scored, routing data written.

``prepare`` reads a manifest and prompts, runs every (prompt, expert) call not yet in
the cache, scores the answers against each prompt's reference and writes the
routing dataset atomically. Killed and restarted with the same arguments it picks
up where it stopped. ``rescore`` (re)scores a routing-data file's recorded answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..data import (DataError, OutputPathError, Prompt, Record, check_id_and_prompt, check_writable,
                    iter_json_objects, iter_jsonl, validate_record, write_jsonl)
from .cache import CallCache, call_key, canonical_hash
from .backends import build_experts
from .base import Expert
from .manifest import Manifest, load_manifest
from .runner import Backoff, Job, Runner, RunStats
from .scorers import Scorer, ScoreError, ScorerConfig, make_scorer

SCORE_CHUNK = 512  # answers scored (and their scores committed) per batch


class PrepareError(RuntimeError):
    """prepare cannot go on (an output that cannot be written, nothing answered); the message says why."""


def _check_out(out: Path) -> None:
    try:
        check_writable(out)
    except OutputPathError as exc:
        raise PrepareError(str(exc)) from None


def _write_out(out: Path, records: Sequence[Record], saved_in: str) -> None:
    try:
        write_jsonl(out, records)
    except OSError as exc:
        raise PrepareError(f"{out}: cannot write: {exc.strerror or exc}; {saved_in}") from None


@dataclass
class PromptItem:
    """One line of a prompts file: ``{"id", "prompt", "reference", "task"}`` (other keys are kept)."""

    id: str
    prompt: Prompt
    reference: str | None = None
    task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _item(obj: Any, where: str) -> PromptItem:
    rid, prompt = check_id_and_prompt(obj, where)
    for key in ("reference", "task"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise DataError(f"{where}: '{key}' must be a string")
    extra = {k: v for k, v in obj.items() if k not in ("id", "prompt", "reference", "task", "responses")}
    return PromptItem(rid, prompt, obj.get("reference"), obj.get("task"), extra)


def prompt_items(rows: Iterable[Mapping[str, Any] | PromptItem], where: str = "prompts") -> list[PromptItem]:
    """Validate prompt rows (dicts or ``PromptItem``); ids must be unique."""
    items, seen = [], set()
    for i, row in enumerate(rows):
        item = row if isinstance(row, PromptItem) else _item(row, f"{where}[{i}]")
        if item.id in seen:
            raise DataError(f"{where}[{i}]: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise DataError(f"{where}: no prompts")
    return items


def read_prompts(path: str | os.PathLike) -> list[PromptItem]:
    """Prompts from a JSONL file (a routing-data file works too: its responses are ignored)."""
    items, seen = [], set()
    for obj, where in iter_json_objects(path):
        item = _item(obj, where)
        if item.id in seen:
            raise DataError(f"{where}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    return items


def demo_prompts_path() -> Path:
    return Path(str(resources.files("torouter.prepare").joinpath("prompts", "demo.jsonl")))


def demo_prompts(limit: int | None = None, tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The 64 prompts shipped with torouter: math, code, general knowledge and biomedical.

    The file interleaves the four tasks, so the first ``limit`` prompts stay balanced.
    Math references end with ``#### N``; code references are assert tests (each code
    row also carries a reference ``solution``); knowledge references are an option letter
    or a short answer; biomedical references are yes, no or maybe.
    """
    rows = [json.loads(line) for line in demo_prompts_path().read_text(encoding="utf-8").splitlines() if line]
    if tasks is not None:
        unknown = set(tasks) - {r["task"] for r in rows}
        if unknown:
            raise ValueError(f"unknown demo tasks {sorted(unknown)}")
        rows = [r for r in rows if r["task"] in tasks]
    return rows[:limit] if limit is not None else rows


def resolve_prompts(source: str | os.PathLike, limit: int | None = None) -> list[PromptItem]:
    """A prompts file, or a named source: ``demo`` or one of the loaders' benchmarks."""
    from .loaders import LOADERS, load_benchmark

    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    path = Path(source)
    if path.is_file():
        items = read_prompts(path)
    elif str(source) == "demo":
        items = prompt_items(demo_prompts(), "demo")
    elif str(source) in LOADERS:
        items = prompt_items(load_benchmark(str(source), limit=limit), str(source))
    else:
        raise DataError(f"{source}: no such file (or a named source: demo, {', '.join(LOADERS)})")
    return items[:limit] if limit is not None else items


def make_jobs(items: Sequence[PromptItem], experts: Sequence[Expert]) -> tuple[list[Job], dict[tuple[str, str], str]]:
    """Every (prompt, expert) call, deduplicated by cache key, and the key of each (record id, expert)."""
    jobs: dict[str, Job] = {}
    keys: dict[tuple[str, str], str] = {}
    for item in items:
        plain = canonical_hash({"prompt": item.prompt})
        with_ref = canonical_hash({"prompt": item.prompt, "reference": item.reference})
        for expert in experts:
            # An expert that computes the reference's NLL answers differently for another reference.
            prompt_hash = with_ref if expert.needs_reference else plain
            key = call_key(expert.name, expert.settings_hash, prompt_hash)
            keys[(item.id, expert.name)] = key
            if key not in jobs:
                jobs[key] = Job(key, expert.name, item.id, item.prompt, item.reference, prompt_hash)
    return list(jobs.values()), keys


def score_calls(pairs: Sequence[tuple[str, str, str]], scorer: Scorer, cache: CallCache | None = None,
                progress: bool = False) -> tuple[dict[str, float | None], list[tuple[str, str]]]:
    """Scores of ``(key, answer, reference)`` triples, reusing and filling the score cache.

    Returns the scores by key and ``(key, message)`` for answers left unscored (e.g. a
    reference with no number for the numeric metric).
    """
    signature = scorer.config.signature
    unique = list({key: (key, answer, reference) for key, answer, reference in pairs}.values())
    scores = cache.get_scores(signature, [key for key, _, _ in unique]) if cache is not None else {}
    todo = [p for p in unique if p[0] not in scores]
    problems: list[tuple[str, str]] = []
    batches = [todo[i:i + SCORE_CHUNK] for i in range(0, len(todo), SCORE_CHUNK)]
    chunks: Iterable[list[tuple[str, str, str]]] = batches
    if progress and len(batches) > 1:
        from rich.progress import track

        chunks = track(batches, description=f"scoring ({scorer.config.metric})", transient=True)
    for chunk in chunks:
        try:
            values: list[float | None] = list(scorer.score([a for _, a, _ in chunk], [r for _, _, r in chunk]))
        except ScoreError:
            values = []
            for key, answer, reference in chunk:  # find the pairs that cannot be scored
                try:
                    values.extend(scorer.score([answer], [reference]))
                except ScoreError as exc:
                    values.append(None)
                    problems.append((key, str(exc)))
        batch = {key: value for (key, _, _), value in zip(chunk, values)}
        if cache is not None:
            cache.put_scores(signature, batch)
        scores.update(batch)
    return scores, problems


@contextlib.contextmanager
def _engine(engine: str, ray_address: str | None, ray_cpus: int | None, progress: bool) -> Iterator[Any]:
    """None for the local engine; for ``ray``, an executor with ``run_calls`` and ``score_calls``
    running on a Ray cluster (imported only then: Ray is the optional ``torouter[ray]`` extra)."""
    from ..engines import check_engine

    if check_engine(engine) == "local":
        yield None
        return
    from ..engines.ray_prepare import ray_executor

    with ray_executor(ray_address, ray_cpus, progress) as executor:
        yield executor


@dataclass
class ExpertSummary:
    answered: int = 0
    failed: int = 0
    scored: int = 0
    total_cost: float = 0.0
    mean_score: float | None = None


@dataclass
class PrepareSummary:
    out: Path
    cache: Path
    records: int
    run: RunStats
    cached_calls: int
    experts: dict[str, ExpertSummary]
    problems: list[str] = field(default_factory=list)


def _response(result: Mapping[str, Any], expert: Expert, score: float | None) -> dict[str, Any]:
    if not result.get("ok"):
        return {"score": None, "error": result.get("error", "unknown error")}
    response: dict[str, Any] = {"score": score, "cost": expert.cost(result), "text": result["text"]}
    for key in ("latency_s", "input_tokens", "output_tokens", "nll"):
        value = result.get(key)
        if value is not None and (not isinstance(value, float) or math.isfinite(value)):
            response[key] = value
    if result.get("tokens_estimated"):
        response["tokens_estimated"] = True
    return response


def assemble(items: Sequence[PromptItem], experts: Sequence[Expert], keys: Mapping[tuple[str, str], str],
             results: Mapping[str, Mapping[str, Any]], scores: Mapping[tuple[str, str], float | None],
             where: str = "prepare") -> list[Record]:
    """Routing records from cached results and scores by ``(record id, expert)``.

    An expert with no result for a prompt is left out of that record.
    """
    records = []
    for item in items:
        responses = {}
        for expert in experts:
            key = keys[(item.id, expert.name)]
            if key in results:
                responses[expert.name] = _response(results[key], expert, scores.get((item.id, expert.name)))
        if not responses:
            continue
        obj = {"id": item.id, "prompt": item.prompt, "reference": item.reference, "task": item.task,
               **item.extra, "responses": responses}
        records.append(validate_record({k: v for k, v in obj.items() if v is not None}, f"{where}: {item.id}"))
    return records


def prepare(experts: str | os.PathLike | Manifest | Sequence[Expert],
            prompts: str | os.PathLike | Sequence[Mapping[str, Any] | PromptItem],
            out: str | os.PathLike, *, score: str | ScorerConfig | None = "bertscore",
            cache: str | os.PathLike | None = None, limit: int | None = None, retry_failed: bool = False,
            progress: bool = True, console=None, backoff: Backoff | None = None,
            durable: bool = False, engine: str = "local", ray_address: str | None = None,
            ray_cpus: int | None = None) -> PrepareSummary:
    """Query every expert on every prompt, score the answers and write the routing data to ``out``.

    ``cache`` defaults to ``<out>.cache.sqlite``; failed calls are kept as errors and tried
    again only with ``retry_failed``. ``score=None`` writes answers with ``score: null``
    (score them later with ``rescore``). ``engine="ray"`` makes the calls and scores the
    answers on a Ray cluster (``ray_address``, or a local instance of ``ray_cpus`` CPUs), with
    the same records and cache (see ``torouter.engines.ray_prepare``).
    """
    out = Path(out)
    _check_out(out)  # before any call is paid for
    if isinstance(experts, (str, os.PathLike)):
        experts = build_experts(load_manifest(experts))
    elif isinstance(experts, Manifest):
        experts = build_experts(experts)
    experts = list(experts)
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise PrepareError(f"duplicate expert names in {names}")
    if isinstance(prompts, (str, os.PathLike)):
        items = resolve_prompts(prompts, limit)
    else:
        items = prompt_items(prompts)[:limit]
    scorer = make_scorer(score) if score is not None else None
    if scorer is not None:
        scorer.config.signature  # noqa: B018 - a scorer that cannot run fails before any call
    cache_path = Path(cache) if cache is not None else out.with_name(out.name + ".cache.sqlite")

    with _engine(engine, ray_address, ray_cpus, progress) as executor, \
            CallCache(cache_path, durable=durable) as store:
        # Calls finished by Ray workers of a run whose driver was killed (see engines.ray_prepare;
        # no Ray needed to read them), whichever engine resumes it.
        from ..engines.ray_prepare import merge_shards

        merge_shards(store)
        jobs, keys = make_jobs(items, experts)
        done = store.get_many(j.key for j in jobs)
        pending = [j for j in jobs if j.key not in done or (retry_failed and not done[j.key].get("ok"))]
        runner = Runner({e.name: e for e in experts}, store, backoff=backoff, progress=progress, console=console)

        async def run() -> RunStats:
            try:
                return await runner.run(pending)
            finally:
                for expert in experts:
                    await expert.aclose()

        if executor is None:
            stats = asyncio.run(run())
        else:
            stats = executor.run_calls(pending, experts, store, backoff)
        results = store.get_many(keys.values())
        scores: dict[tuple[str, str], float | None] = {}
        problems: list[str] = []
        if scorer is not None:
            slots = {}  # (record id, expert) -> score key: the call and the reference it is scored against
            pairs = []
            for item in items:
                for expert in experts:
                    result = results.get(keys[(item.id, expert.name)])
                    if item.reference is None or result is None or not result.get("ok"):
                        continue
                    slot_key = canonical_hash([keys[(item.id, expert.name)], item.reference])
                    slots[(item.id, expert.name)] = slot_key
                    pairs.append((slot_key, result["text"], item.reference))
            scoring = score_calls if executor is None else executor.score_calls
            by_key, failures = scoring(pairs, scorer, store, progress)
            scores = {slot: by_key.get(slot_key) for slot, slot_key in slots.items()}
            names_of = {slot_key: f"{rid} / {name}" for (rid, name), slot_key in slots.items()}
            problems = [f"{names_of[key]}: {message}" for key, message in failures]
    records = assemble(items, experts, keys, results, scores)
    if not records:
        raise PrepareError("no expert answered any prompt; nothing to write")
    _write_out(out, records, f"all {len(results)} calls are saved in {cache_path}: run the same command "
                             "again to write it without making them again")
    return PrepareSummary(out=out, cache=cache_path, records=len(records), run=stats,
                          cached_calls=len(jobs) - len(pending), experts=_summaries(records, names),
                          problems=problems)


def _summaries(records: Sequence[Record], names: Sequence[str]) -> dict[str, ExpertSummary]:
    out = {name: ExpertSummary() for name in names}
    totals: dict[str, float] = {name: 0.0 for name in names}
    for record in records:
        for name, response in record.responses.items():
            summary = out.setdefault(name, ExpertSummary())
            if "error" in response:
                summary.failed += 1
                continue
            summary.answered += 1
            summary.total_cost += response.get("cost") or 0.0
            if response.get("score") is not None:
                summary.scored += 1
                totals[name] = totals.get(name, 0.0) + response["score"]
    for name, summary in out.items():
        if summary.scored:
            summary.mean_score = totals[name] / summary.scored
    return out


@dataclass
class RescoreSummary:
    records: int
    scored: int
    unscored: int
    mean_score: dict[str, float]
    problems: list[str]


def rescore(data: str | os.PathLike, out: str | os.PathLike, config: str | ScorerConfig = "bertscore",
            progress: bool = False, engine: str = "local", ray_address: str | None = None,
            ray_cpus: int | None = None) -> RescoreSummary:
    """Score every recorded answer of a routing-data file against its record's reference
    (``engine="ray"``: in batches on Ray actors, as ``prepare`` does)."""
    out = Path(out)
    _check_out(out)
    scorer = make_scorer(config)
    records = list(iter_jsonl(data))
    pairs, slots = [], {}
    for record in records:
        for name, response in record.responses.items():
            text = response.get("text")
            if record.reference is None or not isinstance(text, str) or response.get("error"):
                continue
            key = f"{record.id}\0{name}"
            if response.get("cost") is None:
                raise DataError(f"{data}: record {record.id!r}, expert {name!r}: a scored response needs 'cost'")
            pairs.append((key, text, record.reference))
            slots[key] = response
    if not pairs:
        raise DataError(f"{data}: no answers to score (records need 'reference' and responses need 'text')")
    with _engine(engine, ray_address, ray_cpus, progress) as executor:
        scoring = score_calls if executor is None else executor.score_calls
        scores, failures = scoring(pairs, scorer, None, progress)
    problems = [f"{key.replace(chr(0), ' / ')}: {message}" for key, message in failures]
    sums: dict[str, list[float]] = {}
    for key, response in slots.items():
        response["score"] = scores.get(key)
        if response["score"] is not None:
            sums.setdefault(key.split("\0", 1)[1], []).append(response["score"])
    _write_out(out, records, "nothing was written")
    scored = sum(len(v) for v in sums.values())
    return RescoreSummary(records=len(records), scored=scored, unscored=len(pairs) - scored,
                          mean_score={k: sum(v) / len(v) for k, v in sums.items()}, problems=problems)
