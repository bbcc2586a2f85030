"""The paper's phase 1 end to end: every prompt to every expert, answers scored, routing data written.

``prepare`` reads a manifest and prompts, runs every (prompt, expert) call not yet in
the cache, scores the answers (each task with its metric: against the prompt's
reference, or by an LLM judge that needs none) and writes the routing dataset atomically. Killed and restarted with the same arguments it picks
up where it stopped. ``rescore`` (re)scores a routing-data file's recorded answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..data import (DataError, OutputPathError, Prompt, Record, check_id_and_prompt, check_writable,
                    iter_json_objects, iter_jsonl, prompt_text, validate_record, write_jsonl)
from .cache import CallCache, call_key, canonical_hash
from .backends import build_experts
from .base import Expert
from .judge import JudgeConfig, JudgeError, Judged, JudgeSummary, judge_answers, judge_expert
from .manifest import Manifest, load_manifest
from .runner import Backoff, Job, Runner, RunStats
from .scorers import MetricMap, Scorer, ScoreError, ScorerConfig, make_scorer

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
class Scoring:
    """How a run scores answers: a metric per task, the reference metrics' settings, the judge."""

    metrics: MetricMap
    options: ScorerConfig = field(default_factory=ScorerConfig)
    judge: JudgeConfig | None = None

    def scorer(self, metric: str) -> Scorer:
        return make_scorer(replace(self.options, metric=metric))


def make_scoring(score: str | ScorerConfig | Mapping[str, str] | MetricMap | Scoring | None,
                 options: ScorerConfig | None = None, judge: JudgeConfig | None = None) -> Scoring | None:
    """The scoring a ``score`` argument asks for (None: answers are left unscored).

    ``score`` is a metric, a metric map string (``gsm8k=numeric,*=judge``, ``auto``), a
    ``{task: metric}`` mapping or a ``ScorerConfig`` (whose settings ``options`` then are).
    Every metric is checked now, before any call is paid for.
    """
    if score is None:
        return None
    if isinstance(score, Scoring):
        scoring = score
    elif isinstance(score, ScorerConfig):
        scoring = Scoring(MetricMap({"*": score.metric}), options or score, judge)
    elif isinstance(score, MetricMap):
        scoring = Scoring(score, options or ScorerConfig(), judge)
    elif isinstance(score, str):
        scoring = Scoring(MetricMap.parse(score), options or ScorerConfig(), judge)
    else:
        scoring = Scoring(MetricMap(score), options or ScorerConfig(), judge)
    for metric in scoring.metrics.metrics:
        if metric == "judge":
            if scoring.judge is None:
                raise ScoreError("the judge metric needs a judge (--judge SPEC)")
        else:
            scoring.scorer(metric).config.signature  # noqa: B018 - a scorer that cannot run fails now
    return scoring


@dataclass
class Entry:
    """One recorded answer to score: its record, expert, text, and the key its score is cached under."""

    record_id: str
    expert: str
    prompt: Prompt
    task: str | None
    reference: str | None
    text: str
    score_key: str


@dataclass
class Scored:
    scores: dict[tuple[str, str], float | None] = field(default_factory=dict)
    details: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # record id -> metric
    problems: list[str] = field(default_factory=list)
    judge: JudgeSummary | None = None


def score_entries(entries: Sequence[Entry], scoring: Scoring, store: CallCache | None, *,
                  progress: bool = False, console=None, backoff: Backoff | None = None,
                  retry_failed: bool = False, score_calls=score_calls) -> Scored:
    """Score every entry with its task's metric: reference metrics through ``score_calls``
    (answers without a reference stay unscored; the Ray engine passes its own), the judge
    through ``judge_answers``."""
    out = Scored()
    by_metric: dict[str, list[Entry]] = {}
    unmapped: set[str] = set()
    for entry in entries:
        metric = scoring.metrics.for_task(entry.task)
        if metric is None:
            if not scoring.metrics.covers(entry.task):
                unmapped.add(str(entry.task))
            continue
        by_metric.setdefault(metric, []).append(entry)
    if unmapped:
        out.problems.append(f"no metric for task(s) {', '.join(sorted(unmapped))}: left unscored "
                            "(add TASK=METRIC or *=METRIC)")
    for metric, group in by_metric.items():
        if metric == "judge":
            continue
        scorable = [e for e in group if e.reference is not None]
        if not scorable:
            continue
        by_key, failures = score_calls([(e.score_key, e.text, e.reference) for e in scorable],  # type: ignore[misc]
                                       scoring.scorer(metric), store, progress)
        names = {e.score_key: f"{e.record_id} / {e.expert}" for e in scorable}
        out.problems.extend(f"{names[key]}: {message}" for key, message in failures)
        for e in scorable:
            out.scores[(e.record_id, e.expert)] = by_key.get(e.score_key)
            out.metrics[e.record_id] = metric
    if "judge" in by_metric:
        config = scoring.judge
        if config is None:
            raise ScoreError("the judge metric needs a judge (--judge SPEC)")
        if store is None:
            raise ScoreError("judging needs a call cache")
        group = by_metric["judge"]
        anchors = {e.record_id: e.text for e in group if e.expert == config.anchor}
        items = [Judged((e.record_id, e.expert), e.prompt, e.text, e.task, e.reference,
                        anchors.get(e.record_id)) for e in group]
        scores, details, summary = judge_answers(config, items, store, retry_failed=retry_failed,
                                                 backoff=backoff, progress=progress, console=console)
        out.scores.update(scores)
        out.details.update(details)
        out.judge = summary
        for e in group:
            out.metrics[e.record_id] = "judge"
        if config.mode == "pairwise":
            lost = sorted({e.record_id for e in group} - set(anchors))
            if lost:
                out.problems.append(f"{len(lost)} record(s) without an answer from the anchor "
                                    f"{config.anchor!r} cannot be judged pairwise (e.g. {lost[0]})")
        if summary.malformed:
            out.problems.append(f"{summary.malformed} judge verdict(s) unreadable after {config.attempts} "
                                "attempt(s): left unscored")
    return out


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
    judge: JudgeSummary | None = None


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
             where: str = "prepare", scored: Scored | None = None) -> list[Record]:
    """Routing records from cached results and scores by ``(record id, expert)``.

    An expert with no result for a prompt is left out of that record. A record scored
    this run names its metric (``"metric": "numeric"``); a judged response carries what the
    judge said (``"judge": {"grade": 8}``).
    """
    records = []
    for item in items:
        responses = {}
        for expert in experts:
            key = keys[(item.id, expert.name)]
            if key in results:
                responses[expert.name] = _response(results[key], expert, scores.get((item.id, expert.name)))
                detail = scored.details.get((item.id, expert.name)) if scored is not None else None
                if detail and "error" not in responses[expert.name]:
                    responses[expert.name]["judge"] = detail
        if not responses:
            continue
        extra = {k: v for k, v in item.extra.items() if k != "metric"}
        metric = scored.metrics.get(item.id) if scored is not None else None
        obj = {"id": item.id, "prompt": item.prompt, "reference": item.reference, "task": item.task,
               **extra, "metric": metric, "responses": responses}
        records.append(validate_record({k: v for k, v in obj.items() if v is not None}, f"{where}: {item.id}"))
    return records


def _experts(experts: str | os.PathLike | Manifest | Sequence[Expert]) -> list[Expert]:
    if isinstance(experts, (str, os.PathLike)):
        experts = build_experts(load_manifest(experts))
    elif isinstance(experts, Manifest):
        experts = build_experts(experts)
    experts = list(experts)
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise PrepareError(f"duplicate expert names in {names}")
    return experts


def _items(prompts: str | os.PathLike | Sequence[Mapping[str, Any] | PromptItem], limit: int | None) -> list[PromptItem]:
    if isinstance(prompts, (str, os.PathLike)):
        return resolve_prompts(prompts, limit)
    return prompt_items(prompts)[:limit]


@dataclass
class Selection:
    """Which prompts a run uses: how many were read, dropped as repeats, and sampled."""

    read: int
    duplicates: int = 0
    sampled_from: int | None = None
    tasks: dict[str, int] = field(default_factory=dict)


def select_prompts(prompts: str | os.PathLike | Sequence[Mapping[str, Any] | PromptItem], *, limit: int | None = None,
                   dedup: bool = False, similarity: float | None = None, max_prompts: int | None = None,
                   seed: int = 0) -> tuple[list[PromptItem], Selection]:
    """The prompts a run labels: read (the first ``limit``), repeats dropped (``dedup``, near-identical
    ones too with ``similarity``), then ``max_prompts`` of them sampled, stratified by task."""
    from ..traffic import dedup_prompts, sample_prompts, task_counts

    items = _items(prompts, limit)
    selection = Selection(read=len(items))
    if dedup or similarity is not None:
        items, selection.duplicates = dedup_prompts(items, similarity)
    if max_prompts is not None and max_prompts < len(items):
        selection.sampled_from = len(items)
        items = sample_prompts(items, max_prompts, seed)
    elif max_prompts is not None and max_prompts < 1:
        raise DataError(f"max_prompts must be >= 1, got {max_prompts}")
    selection.tasks = task_counts(items)
    return items, selection


DEFAULT_ANSWER_TOKENS = 256
"""Answer length assumed for an expert with no ``max_new_tokens`` when a run's cost is planned."""


@dataclass
class CallPlan:
    calls: int = 0
    cached: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    dollars: float = 0.0


@dataclass
class PreparePlan:
    """What a run would do before it does it: calls per expert and for the judge, and their expected cost."""

    prompts: int
    selection: Selection
    experts: dict[str, CallPlan]
    judge: CallPlan | None = None
    judge_name: str | None = None

    @property
    def expert_dollars(self) -> float:
        return sum(p.dollars for p in self.experts.values())

    @property
    def total_dollars(self) -> float:
        return self.expert_dollars + (self.judge.dollars if self.judge else 0.0)

    @property
    def dollars_per_prompt(self) -> float:
        return self.total_dollars / self.prompts if self.prompts else 0.0


def plan_prepare(experts: str | os.PathLike | Manifest | Sequence[Expert], items: Sequence[PromptItem],
                 score: str | ScorerConfig | Mapping[str, str] | MetricMap | None = "bertscore", *,
                 judge: JudgeConfig | None = None, cache: str | os.PathLike | None = None,
                 scorer_options: ScorerConfig | None = None, selection: Selection | None = None,
                 retry_failed: bool = False) -> PreparePlan:
    """The calls ``prepare`` would make and their expected dollars; makes none and writes nothing.

    Input tokens are estimated from the prompt (four characters a token); each answer is
    taken to be the expert's ``max_new_tokens`` long (``DEFAULT_ANSWER_TOKENS`` without
    one), so the cost is an upper estimate. Calls already in an existing ``cache`` are not
    counted. Judge calls are planned at one attempt each (a retried verdict costs more).
    """
    from .base import estimate_tokens
    from .judge import estimate_judge_cost

    experts = _experts(experts)
    scoring = make_scoring(score, scorer_options, judge)
    judge_obj = _check_judge(scoring, experts)
    jobs, keys = make_jobs(items, experts)
    done: dict[str, Any] = {}
    if cache is not None and Path(cache).is_file():
        with CallCache(cache, lock=False) as store:
            done = store.get_many(j.key for j in jobs)
    by_name = {e.name: e for e in experts}
    plans = {e.name: CallPlan() for e in experts}
    for job in jobs:
        plan = plans[job.expert]
        if job.key in done and (done[job.key].get("ok") or not retry_failed):
            plan.cached += 1
            continue
        expert = by_name[job.expert]
        tokens_in = estimate_tokens(prompt_text(job.prompt)) + estimate_tokens(expert.spec.generation.system_prompt
                                                                               or "")
        tokens_out = expert.spec.generation.max_new_tokens or DEFAULT_ANSWER_TOKENS
        plan.calls += 1
        plan.input_tokens += tokens_in
        plan.output_tokens += tokens_out
        plan.dollars += expert.spec.price.cost(tokens_in, tokens_out)
    result = PreparePlan(prompts=len(items), selection=selection or Selection(read=len(items)), experts=plans)
    if judge_obj is not None and scoring is not None and scoring.judge is not None:
        judged = [(item.prompt, item.reference) for item in items if scoring.metrics.for_task(item.task) == "judge"]
        answer_tokens = max((e.spec.generation.max_new_tokens or DEFAULT_ANSWER_TOKENS) for e in experts)
        calls, dollars = estimate_judge_cost(judge_obj, scoring.judge, judged, answer_tokens, len(experts))
        result.judge = CallPlan(calls=calls, dollars=dollars)
        result.judge_name = judge_obj.name
    return result


def _check_judge(scoring: Scoring | None, experts: Sequence[Expert]) -> Expert | None:
    """The judge, built (not started), after checking its anchor is one of the experts."""
    if scoring is None or scoring.judge is None or "judge" not in scoring.metrics.metrics:
        return None
    config = scoring.judge
    names = [e.name for e in experts]
    if config.mode == "pairwise" and config.anchor not in names:
        raise JudgeError(f"the judge's anchor {config.anchor!r} is not an expert (experts: {', '.join(names)})")
    judge = judge_expert(config.judge)
    if judge.name in names:
        raise JudgeError(f"the judge is named {judge.name!r} like an expert; give it another name")
    config.judge = judge
    return judge


def prepare(experts: str | os.PathLike | Manifest | Sequence[Expert],
            prompts: str | os.PathLike | Sequence[Mapping[str, Any] | PromptItem],
            out: str | os.PathLike, *, score: str | ScorerConfig | Mapping[str, str] | MetricMap | None = "bertscore",
            cache: str | os.PathLike | None = None, limit: int | None = None, retry_failed: bool = False,
            progress: bool = True, console=None, backoff: Backoff | None = None,
            durable: bool = False, judge: JudgeConfig | None = None,
            scorer_options: ScorerConfig | None = None, engine: str = "local", ray_address: str | None = None,
            ray_cpus: int | None = None) -> PrepareSummary:
    """Query every expert on every prompt, score the answers and write the routing data to ``out``.

    ``score`` is a metric, a metric per task (``"gsm8k=numeric,*=judge"``, ``"auto"``, a
    mapping) or a ``ScorerConfig``; ``judge`` is needed when a task is scored by the
    judge, whose calls share the cache. ``cache`` defaults to ``<out>.cache.sqlite``;
    failed calls are kept as errors and tried again only with ``retry_failed``.
    ``score=None`` writes answers with ``score: null`` (score them later with ``rescore``).
    ``engine="ray"`` makes the calls and scores the answers with reference metrics on a Ray
    cluster (``ray_address``, or a local instance of ``ray_cpus`` CPUs), with the same records
    and cache (see ``torouter.engines.ray_prepare``); judge calls run here.
    """
    out = Path(out)
    _check_out(out)  # before any call is paid for
    experts = _experts(experts)
    names = [e.name for e in experts]
    items = _items(prompts, limit)
    scoring = make_scoring(score, scorer_options, judge)
    _check_judge(scoring, experts)
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
        scored = Scored()
        if scoring is not None:
            entries = []
            for item in items:
                for expert in experts:
                    result = results.get(keys[(item.id, expert.name)])
                    if result is None or not result.get("ok"):
                        continue
                    score_key = canonical_hash([keys[(item.id, expert.name)], item.reference])
                    entries.append(Entry(item.id, expert.name, item.prompt, item.task, item.reference,
                                         result["text"], score_key))
            scored = score_entries(entries, scoring, store, progress=progress, console=console, backoff=backoff,
                                   retry_failed=retry_failed,
                                   score_calls=score_calls if executor is None else executor.score_calls)
    records = assemble(items, experts, keys, results, scored.scores, scored=scored)
    if not records:
        raise PrepareError("no expert answered any prompt; nothing to write")
    _write_out(out, records, f"all {len(results)} calls are saved in {cache_path}: run the same command "
                             "again to write it without making them again")
    return PrepareSummary(out=out, cache=cache_path, records=len(records), run=stats,
                          cached_calls=len(jobs) - len(pending), experts=_summaries(records, names),
                          problems=scored.problems, judge=scored.judge)


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
    judge: JudgeSummary | None = None


def rescore(data: str | os.PathLike, out: str | os.PathLike,
            config: str | ScorerConfig | Mapping[str, str] | MetricMap = "bertscore", progress: bool = False, *,
            judge: JudgeConfig | None = None, cache: str | os.PathLike | None = None,
            scorer_options: ScorerConfig | None = None, backoff: Backoff | None = None,
            retry_failed: bool = False, console=None, engine: str = "local", ray_address: str | None = None,
            ray_cpus: int | None = None) -> RescoreSummary:
    """Score every recorded answer of a routing-data file with its task's metric.

    Reference metrics need the record's reference; the judge does not. Judge calls are
    cached in ``cache`` (default ``<out>.cache.sqlite``), so an interrupted run resumes.
    ``engine="ray"`` scores with reference metrics in batches on Ray actors, as ``prepare``
    does.
    """
    out = Path(out)
    _check_out(out)
    scoring = make_scoring(config, scorer_options, judge)
    assert scoring is not None
    records = list(iter_jsonl(data))
    entries, slots = [], {}
    for record in records:
        for name, response in record.responses.items():
            text = response.get("text")
            if not isinstance(text, str) or response.get("error"):
                continue
            metric = scoring.metrics.for_task(record.task)
            if metric is None or (metric != "judge" and record.reference is None):
                continue
            key = f"{record.id}\0{name}"
            if response.get("cost") is None:
                raise DataError(f"{data}: record {record.id!r}, expert {name!r}: a scored response needs 'cost'")
            entries.append(Entry(record.id, name, record.prompt, record.task, record.reference, text, key))
            slots[(record.id, name)] = response
    if not entries:
        raise DataError(f"{data}: no answers to score (records need 'reference' and responses need 'text'; "
                        "the judge metric needs no reference)")
    experts = sorted({name for record in records for name in record.responses})
    judging = scoring.judge is not None and "judge" in scoring.metrics.metrics
    if judging:
        assert scoring.judge is not None
        if scoring.judge.mode == "pairwise" and scoring.judge.anchor not in experts:
            raise JudgeError(f"the judge's anchor {scoring.judge.anchor!r} answered no record "
                             f"(experts: {', '.join(experts)})")
        scoring.judge.judge = judge_expert(scoring.judge.judge)
    cache_path = Path(cache) if cache is not None else out.with_name(out.name + ".cache.sqlite")
    with _engine(engine, ray_address, ray_cpus, progress) as executor, \
            (CallCache(cache_path) if judging else contextlib.nullcontext()) as store:
        scored = score_entries(entries, scoring, store, progress=progress, console=console, backoff=backoff,
                               retry_failed=retry_failed,
                               score_calls=score_calls if executor is None else executor.score_calls)
    sums: dict[str, list[float]] = {}
    for (rid, name), response in slots.items():
        response["score"] = scored.scores.get((rid, name))
        detail = scored.details.get((rid, name))
        if detail:
            response["judge"] = detail
        else:
            response.pop("judge", None)
        if response["score"] is not None:
            sums.setdefault(name, []).append(response["score"])
    for record in records:
        if record.id in scored.metrics:
            record.extra["metric"] = scored.metrics[record.id]
    _write_out(out, records, "nothing was written")
    scored_count = sum(len(v) for v in sums.values())
    return RescoreSummary(records=len(records), scored=scored_count, unscored=len(entries) - scored_count,
                          mean_score={k: sum(v) / len(v) for k, v in sums.items()}, problems=scored.problems,
                          judge=scored.judge)
