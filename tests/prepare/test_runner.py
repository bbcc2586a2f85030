"""Fault injection for the runner: errors are recorded (never scored 0), retries back off, the run goes on."""

import asyncio
import json
import random
import sqlite3

import pytest

from torouter.data import RoutingDataset
from torouter.prepare import Answer, Backoff, CallCache, Expert, Job, Runner, is_transient, prepare
from torouter.prepare.experts import parse_manifest
from torouter.prepare.runner import retry_after


class RateLimitError(Exception):
    """Shaped like a provider SDK's 429 error."""

    status_code = 429

    def __init__(self, wait):
        super().__init__("rate limited")
        self.retry_after = wait


class ScriptedExpert(Expert):
    """An expert whose behaviour per call is given by a function of the prompt and attempt number."""

    def __init__(self, name, behaviour, **settings):
        spec = parse_manifest([{"name": name, "tier": "cloud", "python": {"callable": f"scripted.{name}"},
                                "price": {"per_call": 0.01}, **settings}]).experts[0]
        super().__init__(spec)
        self.behaviour = behaviour
        self.calls = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def agenerate(self, prompt, reference, timeout_s):
        attempt = self.calls[prompt] = self.calls.get(prompt, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.behaviour(prompt, attempt)
        finally:
            self.in_flight -= 1


async def good(prompt, attempt):
    await asyncio.sleep(0.005)
    return Answer(text=f"answer to {prompt}", input_tokens=5, output_tokens=3, latency_s=0.005)


async def raises(prompt, attempt):
    raise ValueError(f"malformed request for {prompt}")


async def hangs(prompt, attempt):
    await asyncio.sleep(30)


async def rate_limited_twice(prompt, attempt):
    if attempt <= 2:
        raise RateLimitError(wait=0.5 * attempt)
    return await good(prompt, attempt)


PROMPTS = [{"id": f"q{i}", "prompt": f"question {i}", "reference": f"answer to question {i}"} for i in range(6)]


def _experts():
    return [ScriptedExpert("good", good), ScriptedExpert("raises", raises, retries=3),
            ScriptedExpert("hangs", hangs, timeout_s=0.05, retries=1),
            ScriptedExpert("flaky", rate_limited_twice, retries=4)]


class RecordingSleep:
    def __init__(self):
        self.waits = []

    async def __call__(self, seconds):
        self.waits.append(seconds)


def test_faults_are_recorded_as_errors_and_the_run_goes_on(tmp_path):
    experts = _experts()
    out = tmp_path / "data.jsonl"
    summary = prepare(experts, PROMPTS, out, score="exact", progress=False, backoff=Backoff(base=0.001, cap=0.002))
    assert summary.run.done == {"good": 6, "raises": 0, "hangs": 0, "flaky": 6}
    assert summary.run.failed == {"good": 0, "raises": 6, "hangs": 6, "flaky": 0}
    good_e, raising, hanging, flaky = experts
    assert all(n == 1 for n in raising.calls.values())       # a ValueError is not retried
    assert all(n == 2 for n in hanging.calls.values())       # a timeout is retried (retries=1)
    assert all(n == 3 for n in flaky.calls.values())         # two 429s, then success

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    first = records[0]["responses"]
    assert first["good"]["score"] == 1.0 and first["good"]["cost"] == pytest.approx(0.01)
    assert first["flaky"]["score"] == 1.0
    assert first["raises"] == {"score": None, "error": "ValueError: malformed request for question 0"}
    assert first["hangs"] == {"score": None, "error": "TimeoutError: no answer within 0.05 s"}
    # Failed calls are unobserved for training, never a 0.
    data = RoutingDataset.from_jsonl(out)
    assert data.mask[:, data.experts.index("raises")].sum() == 0
    assert data.mask[:, data.experts.index("flaky")].all()


def test_rerun_uses_the_cache_and_retry_failed_calls_again(tmp_path):
    out = tmp_path / "data.jsonl"
    prepare(_experts(), PROMPTS, out, score="exact", progress=False, backoff=Backoff(base=0.001, cap=0.002))
    again = _experts()
    summary = prepare(again, PROMPTS, out, score="exact", progress=False)
    assert summary.run.calls == 0 and summary.cached_calls == 24
    assert all(not e.calls for e in again)
    retry = _experts()
    summary = prepare(retry, PROMPTS, out, score="exact", progress=False, retry_failed=True,
                      backoff=Backoff(base=0.001, cap=0.002))
    assert summary.run.calls == 12                          # only the 'raises' and 'hangs' calls
    assert set(retry[1].calls) == {p["prompt"] for p in PROMPTS} and not retry[0].calls


def test_backoff_grows_with_jitter_and_honours_retry_after():
    sleep = RecordingSleep()
    expert = ScriptedExpert("flaky", rate_limited_twice, retries=4)
    runner = Runner({"flaky": expert}, cache=None, backoff=Backoff(base=0.01, cap=10), sleep=sleep)
    result = asyncio.run(runner.call(expert, Job("k", "flaky", "q", "p", None, "h")))
    assert result["ok"] and result["attempts"] == 3
    assert sleep.waits[0] >= 0.5 and sleep.waits[1] >= 1.0   # at least what Retry-After asked for

    backoff = Backoff(base=1.0, cap=8.0, rng=random.Random(0))
    for n in range(1, 8):
        waits = [backoff.wait(n) for _ in range(200)]
        assert 0 <= min(waits) and max(waits) <= min(8.0, 2 ** (n - 1))
        assert len(set(waits)) > 100                        # jittered, not a fixed schedule


def test_retries_give_up_after_the_limit():
    sleep = RecordingSleep()

    async def always_503(prompt, attempt):
        err = RuntimeError("service unavailable")
        err.status_code = 503
        raise err

    expert = ScriptedExpert("down", always_503, retries=2)
    result = asyncio.run(Runner({"down": expert}, None, sleep=sleep).call(expert, Job("k", "down", "q", "p", None, "h")))
    assert result == {"ok": False, "error": "RuntimeError: service unavailable", "attempts": 3}
    assert len(sleep.waits) == 2


@pytest.mark.parametrize("exc, transient", [
    (TimeoutError(), True), (ConnectionResetError(), True), (RateLimitError(1), True),
    (type("APIConnectionError", (Exception,), {})(), True),
    (type("InternalServerError", (Exception,), {})(), True),
    (ValueError("bad input"), False), (KeyError("x"), False),
    (type("BadRequestError", (Exception,), {"status_code": 400})(), False),
])
def test_transient_errors(exc, transient):
    assert is_transient(exc) is transient


def test_retry_after_from_response_headers():
    class Response:
        headers = {"retry-after": "3"}

    err = Exception("slow down")
    err.response = Response()
    assert retry_after(err) == 3.0
    assert retry_after(ValueError()) is None


def test_per_expert_concurrency_limit(tmp_path):
    async def slow(prompt, attempt):
        await asyncio.sleep(0.02)
        return Answer(text="x", input_tokens=1, output_tokens=1)

    limited = ScriptedExpert("limited", slow, concurrency=3)
    wide = ScriptedExpert("wide", slow, concurrency=20)
    prompts = [{"id": f"q{i}", "prompt": f"p{i}"} for i in range(40)]
    prepare([limited, wide], prompts, tmp_path / "d.jsonl", score=None, progress=False)
    assert limited.max_in_flight == 3
    assert wide.max_in_flight == 20


def test_every_finished_call_is_committed_before_the_next(tmp_path):
    """The cache holds each call as soon as it finishes, readable by another connection."""
    seen = []
    cache_path = tmp_path / "calls.sqlite"

    async def observed(prompt, attempt):
        with sqlite3.connect(cache_path) as other:
            seen.append(other.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
        return Answer(text="x", input_tokens=1, output_tokens=1)

    expert = ScriptedExpert("one", observed, concurrency=1)
    prompts = [{"id": f"q{i}", "prompt": f"p{i}"} for i in range(5)]
    prepare([expert], prompts, tmp_path / "d.jsonl", cache=cache_path, score=None, progress=False)
    assert seen == [0, 1, 2, 3, 4]
    with CallCache(cache_path) as cache:
        assert cache.count("one", ok=True) == 5
        assert cache._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_duplicate_prompts_are_called_once_and_scored_per_reference(tmp_path):
    expert = ScriptedExpert("good", good)
    prompts = [{"id": "a", "prompt": "question 1", "reference": "answer to question 1"},
               {"id": "b", "prompt": "question 1", "reference": "something else"}]
    out = tmp_path / "d.jsonl"
    prepare([expert], prompts, out, score="exact", progress=False)
    assert expert.calls == {"question 1": 1}
    scores = [json.loads(line)["responses"]["good"]["score"] for line in out.read_text().splitlines()]
    assert scores == [1.0, 0.0]


def test_progress_shows_done_and_failed_per_expert(tmp_path):
    import io
    import re

    from rich.console import Console

    stream = io.StringIO()
    console = Console(file=stream, width=140, force_terminal=False, color_system=None)
    experts = [ScriptedExpert("good", good), ScriptedExpert("raises", raises)]
    prepare(experts, PROMPTS, tmp_path / "d.jsonl", score=None, progress=True, console=console)
    lines = stream.getvalue().splitlines()
    final = {line.split()[0]: line for line in lines[-3:]}
    assert re.search(r"6/6\s+0 failed\s+[\d.]+ calls/s", final["good"])
    assert re.search(r"6/6\s+6 failed", final["raises"])
    assert re.search(r"12/12\s+6 failed", final["all"])


SYNC_MODULE = '''
import threading
import time

from langchain_core.language_models.fake_chat_models import FakeListChatModel

lock = threading.Lock()
in_flight = {}
peak = {}
release = threading.Event()


def _enter(tag):
    with lock:
        in_flight[tag] = in_flight.get(tag, 0) + 1
        peak[tag] = max(peak.get(tag, 0), in_flight[tag])


def _leave(tag):
    with lock:
        in_flight[tag] -= 1


def slow(prompt, tag, delay):
    _enter(tag)
    try:
        time.sleep(delay)
    finally:
        _leave(tag)
    return {"text": f"{tag}: {prompt}", "input_tokens": 1, "output_tokens": 1}


def hung(prompt, tag, delay):
    # Blocks its thread until the test releases it (bounded, so no thread outlives the test by long).
    _enter(tag)
    try:
        release.wait(30)
    finally:
        _leave(tag)
    return {"text": "late", "input_tokens": 1, "output_tokens": 1}


class SlowSyncChat(FakeListChatModel):
    """A LangChain chat model with no async implementation of its own."""

    delay: float = 0.05

    def _call(self, messages, stop=None, run_manager=None, **kwargs):
        _enter("langchain")
        try:
            time.sleep(self.delay)
        finally:
            _leave("langchain")
        return "ok"
'''


@pytest.fixture
def sync_experts(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "sync_experts.py").write_text(SYNC_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("sync_experts", None)
    module = importlib.import_module("sync_experts")
    yield module
    module.release.set()


def _sync(name, function, concurrency, delay, **settings):
    return {"name": name, "tier": "cloud", "concurrency": concurrency, "retries": 0,
            "python": {"callable": f"sync_experts:{function}", "kwargs": {"tag": name, "delay": delay}}, **settings}


def test_sync_experts_really_run_concurrency_calls_at_once(sync_experts, tmp_path):
    """Blocking callables get threads of their own: concurrency 16 means 16 calls in flight."""
    manifest = parse_manifest([
        _sync("wide", "slow", 16, 0.05),
        _sync("narrow", "slow", 3, 0.05),
        {"name": "langchain", "tier": "cloud", "concurrency": 12, "retries": 0,
         "langchain": {"class": "sync_experts:SlowSyncChat", "kwargs": {"responses": ["ok"]}}},
    ])
    prompts = [{"id": f"q{i}", "prompt": f"p{i}"} for i in range(48)]
    summary = prepare(manifest, prompts, tmp_path / "d.jsonl", score=None, progress=False)
    assert summary.run.failed == {"wide": 0, "narrow": 0, "langchain": 0}
    assert sync_experts.peak == {"wide": 16, "narrow": 3, "langchain": 12}


def test_a_hung_sync_expert_does_not_starve_a_healthy_one(sync_experts, tmp_path):
    manifest = parse_manifest([
        _sync("hung", "hung", 8, 0.0, timeout_s=0.3),
        _sync("healthy", "slow", 4, 0.02, timeout_s=2.0),
    ])
    prompts = [{"id": f"q{i}", "prompt": f"p{i}"} for i in range(20)]
    summary = prepare(manifest, prompts, tmp_path / "d.jsonl", score=None, progress=False)
    assert summary.run.done["healthy"] == 20 and summary.run.failed["healthy"] == 0
    assert summary.run.failed["hung"] == 20
    # Calls queued behind the hung ones never start: the hung expert holds at most its 8 threads.
    assert sync_experts.peak["hung"] == 8


def test_a_non_finite_number_in_an_answer_is_recorded_as_missing(tmp_path):
    async def odd(prompt, attempt):
        return Answer(text="x", input_tokens=1, output_tokens=1, nll=float("nan"), latency_s=float("inf"))

    out = tmp_path / "d.jsonl"
    summary = prepare([ScriptedExpert("odd", odd)], PROMPTS[:2], out, score="exact", progress=False)
    assert summary.run.done == {"odd": 2}
    response = json.loads(out.read_text().splitlines()[0])["responses"]["odd"]
    assert "nll" not in response and "latency_s" not in response and response["score"] == 0.0
