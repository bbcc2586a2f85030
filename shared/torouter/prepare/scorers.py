"""Score recorded answers against the reference answer.

Metrics, every one on the [0, 1] scale the routing data uses:

``bertscore``  BERTScore F1 (the paper's BERTSim) through the ``bert-score`` package,
               batched on whatever device torch sees. The default model is the offline
               all-MiniLM-L6-v2; any model id bert-score knows (``roberta-large``) or a
               local path with an explicit layer works too.
``exact``      normalised exact match (case, punctuation, articles and spacing ignored).
``choice``     multiple-choice label match: letters (ARC), digits, or yes/no/maybe (PubMedQA).
``numeric``    the final number (GSM8K ``#### 18``, "the answer is 18", or the last number).
``code``       the reference's assert tests run against the code in the answer (MBPP), in
               the sandbox of :mod:`torouter.prepare.sandbox`: an unprivileged uid in its own
               namespaces, a read-only view of the Python installation only, no network,
               time, memory and process limits. 1.0 only when the tests ran to their end.
``judge``      an LLM judge grades the answer, with or without a reference
               (:mod:`torouter.prepare.judge`; the pipeline runs it, not ``make_scorer``).

A run may score each task with its own metric: ``MetricMap.parse("gsm8k=numeric,*=judge")``;
``auto`` gives the shipped loaders' tasks their natural metric and BERTScore to the rest.
"""

from __future__ import annotations

import os
import re
import string
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from ..encoders import DEFAULT_ENCODER, default_device, resolve_model
from .sandbox import MODES as SANDBOX_MODES
from .sandbox import Limits, SandboxError, run_python

METRICS = ("bertscore", "exact", "choice", "numeric", "code")
DEFAULT_BERTSCORE_MODEL = DEFAULT_ENCODER
# all-MiniLM-L6-v2 has 6 layers and bert-score has no default for it. Its last layer,
# the one trained for sentence similarity, separated right from wrong answers best on
# hand-checked pairs (F1 gap 0.21 against 0.07-0.10 for layers 1-5).
MINILM_LAYER = 6


class ScoreError(ValueError):
    """A scorer that cannot run as configured."""


@dataclass(frozen=True)
class ScorerConfig:
    metric: str = "bertscore"
    model: str | None = None          # bertscore: model id or path (default MiniLM)
    num_layers: int | None = None     # bertscore: layer whose embeddings are compared
    batch_size: int = 64
    device: str | None = None
    timeout_s: float = 10.0           # code: wall-clock limit per answer
    memory_mb: int = 1024             # code: address-space limit per answer
    workers: int | None = None        # code: answers tested in parallel
    processes: int = 16               # code: processes and threads per answer
    sandbox: str | None = None        # code: "namespaces" or "rlimits" (default: $TOROUTER_SANDBOX)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ScoreError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.batch_size <= 0 or self.processes <= 0:
            raise ScoreError("timeout_s, memory_mb, processes and batch_size must be positive")
        if self.sandbox is not None and self.sandbox not in SANDBOX_MODES:
            raise ScoreError(f"unknown sandbox {self.sandbox!r}; choose one of {', '.join(SANDBOX_MODES)}")

    @property
    def signature(self) -> str:
        """Identifies the scores this configuration produces (for the score cache)."""
        if self.metric == "bertscore":
            model = self.model or DEFAULT_BERTSCORE_MODEL
            return f"bertscore:{model}:L{bertscore_layer(model, self.num_layers)}"
        if self.metric == "code":
            # v2: a pass needs the tests to run to their end (an early exit(0) passed before).
            return f"code-v2:t{self.timeout_s:g}:m{self.memory_mb}:p{self.processes}"
        return self.metric


def bertscore_layer(model: str, num_layers: int | None) -> int:
    if num_layers is not None:
        if num_layers < 1:
            raise ScoreError(f"num_layers must be >= 1, got {num_layers}")
        return num_layers
    if model in (DEFAULT_BERTSCORE_MODEL, "all-MiniLM-L6-v2"):
        return MINILM_LAYER
    from bert_score.utils import model2layers

    if model in model2layers:
        return model2layers[model]
    raise ScoreError(f"bert-score has no default layer for {model!r}; choose one with --layer")


# --------------------------------------------------------------------------- text metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


_YES_NO = ("yes", "no", "maybe")


def extract_choice(answer: str, labels: str = "ABCDEFGHIJ") -> str | None:
    """The option label an answer picks, or None when it picks none clearly."""
    if labels == "yes/no/maybe":
        text = answer.lower()
        words = "|".join(_YES_NO)
        for pattern in (rf"answer\s*(?:is|:)\s*\**\s*({words})\b", rf"^\W*({words})\b", rf"\b({words})\b"):
            match = re.search(pattern, text)
            if match:
                return match.group(1)
        return None
    cls = f"[{re.escape(labels)}]"
    patterns = (
        rf"(?i:answer\s*(?:is|:)?\s*(?:option\s*)?)\**\(?({cls})\)?(?![A-Za-z0-9])",
        rf"^\s*\**\(?({cls})\)?(?:[.:)]|\s*$)",
        rf"\(({cls})\)",
        rf"(?i:option)\s+({cls})(?![A-Za-z0-9])",
    )
    for pattern in patterns:
        match = re.search(pattern, answer.strip())
        if match:
            return match.group(1)
    return None


def choice_match(answer: str, reference: str) -> float:
    ref = reference.strip()
    if ref.lower() in _YES_NO:
        return float(extract_choice(answer, "yes/no/maybe") == ref.lower())
    if re.fullmatch(r"[A-Za-z]", ref):
        return float((extract_choice(answer, "ABCDEFGHIJ") or "").upper() == ref.upper())
    if re.fullmatch(r"\d", ref):
        return float(extract_choice(answer, "123456789") == ref)
    return exact_match(answer, ref)


_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"


def _parse_number(text: str) -> Fraction | None:
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "")
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def final_number(text: str) -> Fraction | None:
    """The final answer as a number: after ``####``, after "answer is", else the last number."""
    if "####" in text:
        match = re.search(_NUMBER, text.rsplit("####", 1)[1])
        return _parse_number(match.group(0)) if match else None
    marked = re.findall(rf"(?i:answer\s*(?:is|:|=)\s*\**)({_NUMBER})", text)
    if marked:
        return _parse_number(marked[-1])
    numbers = re.findall(_NUMBER, text)
    return _parse_number(numbers[-1]) if numbers else None


def numeric_match(answer: str, reference: str) -> float:
    expected = final_number(reference)
    if expected is None:
        raise ScoreError(f"reference has no number: {reference[:80]!r}")
    got = final_number(answer)
    if got is None:
        return 0.0
    return float(abs(float(got) - float(expected)) <= 1e-6 * max(1.0, abs(float(expected))))


# --------------------------------------------------------------------------- code

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_CODE_START = re.compile(r"^(def |class |import |from \S+ import |@)")


def extract_code(answer: str) -> str:
    """The Python code in an answer: its fenced blocks, else everything from the first definition."""
    blocks = [body for lang, body in _FENCE.findall(answer) if lang.lower() in ("", "python", "py", "python3")]
    if blocks:
        return "\n\n".join(textwrap.dedent(b) for b in blocks)
    lines = answer.splitlines()
    for i, line in enumerate(lines):
        if _CODE_START.match(line):
            return "\n".join(lines[i:])
    return answer


@dataclass
class CodeResult:
    passed: bool
    status: str      # passed, failed, timeout
    detail: str = ""


def run_code_tests(code: str, tests: str, timeout_s: float = 10.0, memory_mb: int = 1024, *,
                   processes: int = 16, sandbox: str | None = None) -> CodeResult:
    """Run ``code`` followed by ``tests`` in the sandbox; passed means the tests ran to their end.

    Raises ScoreError when the sandbox cannot be built (nothing is scored on a weaker one
    unless ``sandbox="rlimits"`` or ``TOROUTER_SANDBOX=rlimits`` asks for it).
    """
    try:
        run = run_python(code + "\n\n" + tests + "\n", Limits(timeout_s=timeout_s, memory_mb=memory_mb,
                                                              processes=processes), mode=sandbox)
    except (SandboxError, ValueError) as exc:
        raise ScoreError(str(exc)) from exc
    if run.finished:
        return CodeResult(True, "passed")
    if run.status == "timeout":
        return CodeResult(False, "timeout", f"killed after {timeout_s:g} s")
    if run.exit_code in (-9, -24):  # SIGKILL / SIGXCPU: the CPU limit
        return CodeResult(False, "timeout", f"CPU limit of {max(1, int(timeout_s + 0.999))} s")
    if run.exit_code == 0:
        return CodeResult(False, "failed", "the program exited before its tests finished")
    tail = run.stderr.strip().splitlines()[-1:]
    return CodeResult(False, "failed", tail[0] if tail else f"exit status {run.exit_code}")


# --------------------------------------------------------------------------- scorers


class Scorer:
    def __init__(self, config: ScorerConfig):
        self.config = config

    def score(self, answers: Sequence[str], references: Sequence[str]) -> list[float]:
        if len(answers) != len(references):
            raise ValueError(f"{len(answers)} answers but {len(references)} references")
        if not answers:
            return []
        return self._score(list(answers), list(references))

    def _score(self, answers: list[str], references: list[str]) -> list[float]:
        fn = {"exact": exact_match, "choice": choice_match, "numeric": numeric_match}[self.config.metric]
        return [fn(a, r) for a, r in zip(answers, references)]


@lru_cache(maxsize=2)
def _bert_scorer(model: str, num_layers: int, device: str, batch_size: int):
    from bert_score import BERTScorer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return BERTScorer(model_type=resolve_model(model), num_layers=num_layers, device=device,
                      batch_size=batch_size)


class BertScoreScorer(Scorer):
    def _score(self, answers, references):
        model = self.config.model or DEFAULT_BERTSCORE_MODEL
        layer = bertscore_layer(model, self.config.num_layers)
        scores = [0.0] * len(answers)
        # An empty answer scores 0 (what bert-score means to do; its own empty-string path
        # fails under transformers 5).
        todo = [i for i, (a, r) in enumerate(zip(answers, references)) if a.strip() and r.strip()]
        if not todo:
            return scores
        scorer = _bert_scorer(model, layer, self.config.device or default_device(), self.config.batch_size)
        _, _, f1 = scorer.score([answers[i] for i in todo], [references[i] for i in todo],
                                batch_size=self.config.batch_size)
        # F1 is a cosine-based similarity; the routing data wants [0, 1].
        for i, value in zip(todo, f1.tolist()):
            scores[i] = min(1.0, max(0.0, float(value)))
        return scores


class CodeScorer(Scorer):
    def _score(self, answers, references):
        cfg = self.config
        workers = cfg.workers or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(lambda pair: run_code_tests(extract_code(pair[0]), pair[1], cfg.timeout_s,
                                                           cfg.memory_mb, processes=cfg.processes,
                                                           sandbox=cfg.sandbox), zip(answers, references))
            return [1.0 if r.passed else 0.0 for r in results]


SCORING_METRICS = (*METRICS, "judge", "none")
"""What a task may be scored with: a reference metric, the LLM judge, or nothing (``none``)."""


class MetricMap:
    """The metric of each task: ``by_task[task]``, else ``by_task["*"]``, else none.

    ``parse`` reads ``numeric`` (every task), ``gsm8k=numeric,mbpp=code,*=judge`` (one per
    task, ``*`` for the rest) or ``auto`` (the loaders' natural metrics, then ``*`` or
    BERTScore), items combined with commas; ``none`` leaves a task unscored.
    """

    def __init__(self, by_task: Mapping[str, str]):
        for task, metric in by_task.items():
            if metric not in SCORING_METRICS:
                raise ScoreError(f"unknown metric {metric!r} for task {task!r}; choose one of "
                                 f"{', '.join(SCORING_METRICS)}")
        self.by_task = dict(by_task)

    @classmethod
    def parse(cls, text: str) -> MetricMap:
        from .loaders import NATURAL_METRICS

        by_task: dict[str, str] = {}
        auto = False
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                raise ScoreError(f"metric map {text!r}: an empty item")
            if item == "auto":
                auto = True
                continue
            task, sep, metric = item.rpartition("=")
            task, metric = (task.strip() or "", metric.strip()) if sep else ("*", item)
            if sep and not task:
                raise ScoreError(f"metric map {text!r}: {item!r} names no task (use *=METRIC for the rest)")
            if task in by_task and by_task[task] != metric:
                raise ScoreError(f"metric map {text!r}: task {task!r} given twice")
            by_task[task] = metric
        if auto:
            by_task = {**NATURAL_METRICS, "*": "bertscore", **by_task}
        return cls(by_task)

    def for_task(self, task: str | None) -> str | None:
        """The metric scoring ``task`` (None: left unscored)."""
        metric = self.by_task.get(task, self.by_task.get("*")) if task is not None else self.by_task.get("*")
        return None if metric in (None, "none") else metric

    def covers(self, task: str | None) -> bool:
        return (task is not None and task in self.by_task) or "*" in self.by_task

    @property
    def metrics(self) -> set[str]:
        return {m for m in self.by_task.values() if m != "none"}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetricMap) and other.by_task == self.by_task

    def __repr__(self) -> str:
        return "MetricMap(" + ",".join(f"{t}={m}" for t, m in self.by_task.items()) + ")"


def make_scorer(config: ScorerConfig | str) -> Scorer:
    if isinstance(config, str):
        config = ScorerConfig(metric=config)
    if config.metric == "bertscore":
        return BertScoreScorer(config)
    if config.metric == "code":
        return CodeScorer(config)
    return Scorer(config)
