"""``torouter prepare`` under faults: a clear error naming the file and what to do, never a
traceback, and no finished call lost or paid for twice."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3

import pytest
from typer.testing import CliRunner

from torouter.cli import app
from torouter.prepare import Answer, CacheError, CallCache, Expert, PrepareError, prepare
from torouter.prepare.experts import parse_manifest

PROMPTS = [{"id": f"q{i}", "prompt": f"question {i}", "reference": f"answer {i}"} for i in range(40)]


class CountingExpert(Expert):
    """Answers after a short sleep and counts the calls it finished."""

    def __init__(self, name="counting", concurrency=4):
        spec = parse_manifest([{"name": name, "tier": "cloud", "concurrency": concurrency,
                                "python": {"callable": "counting.answer"}}]).experts[0]
        super().__init__(spec)
        self.finished: list[str] = []

    async def agenerate(self, prompt, reference, timeout_s):
        await asyncio.sleep(0.005)
        self.finished.append(prompt)
        return Answer(text=f"reply to {prompt} " + "x" * 200, input_tokens=3, output_tokens=3)


def _committed(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


# --------------------------------------------------------------------------- the output file


@pytest.mark.parametrize("layout", ["parent is a file", "out is a directory"])
def test_an_unwritable_out_fails_before_any_call(tmp_path, layout):
    if layout == "parent is a file":
        (tmp_path / "blocker").write_text("not a folder")
        out = tmp_path / "blocker" / "data.jsonl"
    else:
        out = tmp_path / "data.jsonl"
        out.mkdir()
    expert = CountingExpert()
    with pytest.raises(PrepareError) as caught:
        prepare([expert], PROMPTS, out, score=None, progress=False, cache=tmp_path / "calls.sqlite")
    assert str(out) in str(caught.value) and "cannot write" in str(caught.value)
    assert expert.finished == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_an_out_folder_without_write_permission_fails_before_any_call(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        expert = CountingExpert()
        with pytest.raises(PrepareError, match="cannot write"):
            prepare([expert], PROMPTS, locked / "data.jsonl", score=None, progress=False,
                    cache=tmp_path / "calls.sqlite")
        assert expert.finished == []
    finally:
        locked.chmod(0o700)


CLI_EXPERTS = '''
import os

def answer(prompt):
    with open(os.environ["CALL_LOG"], "a") as log:
        log.write(prompt + "\\n")
    return {"text": "ok", "input_tokens": 1, "output_tokens": 1}
'''


def test_the_cli_reports_an_unwritable_out_without_a_traceback_or_a_call(tmp_path, monkeypatch):
    (tmp_path / "cli_err_experts.py").write_text(CLI_EXPERTS)
    (tmp_path / "experts.yaml").write_text(
        "experts:\n  - {name: a, tier: cloud, python: {callable: 'cli_err_experts:answer'}}\n")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:3]))
    (tmp_path / "blocker").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALL_LOG", str(tmp_path / "calls.log"))
    result = CliRunner().invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl",
                                      "--out", "blocker/data.jsonl", "--cache", "calls.sqlite",
                                      "--score", "none", "--no-progress"])
    assert result.exit_code == 2 and "error: blocker/data.jsonl: cannot write" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "calls.log").exists()


def test_a_failed_final_write_says_the_calls_are_cached(tmp_path, monkeypatch):
    import torouter.prepare.pipeline as pipeline

    def disk_full(path, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_jsonl", disk_full)
    cache = tmp_path / "calls.sqlite"
    with pytest.raises(PrepareError) as caught:
        prepare([CountingExpert()], PROMPTS, tmp_path / "data.jsonl", score=None, progress=False, cache=cache)
    message = str(caught.value)
    assert f"{tmp_path / 'data.jsonl'}: cannot write: No space left on device" in message
    assert f"{len(PROMPTS)} calls are saved in {cache}" in message and "run the same command" in message


# --------------------------------------------------------------------------- disk full mid-run


def test_disk_full_mid_run_commits_what_finished_then_stops_with_a_clear_error(tmp_path, monkeypatch):
    cache_path = tmp_path / "calls.sqlite"
    original = CallCache.put
    puts = {"n": 0}

    def put(self, *args, **kwargs):
        puts["n"] += 1
        if puts["n"] == 6:  # one write fails the way a full disk makes SQLite fail
            raise CacheError(f"{self.path}: cannot save to the cache: database or disk is full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CallCache, "put", put)
    expert = CountingExpert(concurrency=4)
    with pytest.raises(CacheError) as caught:
        prepare([expert], PROMPTS, tmp_path / "data.jsonl", score=None, progress=False, cache=cache_path)
    message = str(caught.value)
    assert str(cache_path) in message and "database or disk is full" in message
    assert "run the same command" in message
    # Calls in flight when the write failed were finished and committed; none was started after.
    finished = len(expert.finished)
    assert 6 <= finished < len(PROMPTS)
    assert _committed(cache_path) == finished                # the failed write was retried at the end
    assert f"{finished} finished calls are saved" in message

    monkeypatch.setattr(CallCache, "put", original)
    again = CountingExpert()
    summary = prepare([again], PROMPTS, tmp_path / "data.jsonl", score=None, progress=False, cache=cache_path)
    assert len(again.finished) == len(PROMPTS) - finished and summary.records == len(PROMPTS)


def test_a_full_database_is_a_cache_error_naming_the_file(tmp_path):
    path = tmp_path / "calls.sqlite"
    with CallCache(path) as cache:
        cache._db.execute("PRAGMA max_page_count = 8")  # SQLite's own 'database or disk is full'
        with pytest.raises(CacheError) as caught:
            for i in range(1000):
                cache.put(f"k{i}", "e", "s", "h", {"ok": True, "text": "x" * 2000})
    assert str(path) in str(caught.value) and "database or disk is full" in str(caught.value)
    assert not isinstance(caught.value, sqlite3.Error) and caught.value.__cause__ is None


# --------------------------------------------------------------------------- a damaged cache


def _filled_cache(tmp_path, n=300):
    path = tmp_path / "calls.sqlite"
    with CallCache(path) as cache:
        for i in range(n):
            cache.put(f"k{i}", "e", "s", "h", {"ok": True, "text": f"answer {i} " + "y" * 500})
    return path


def test_a_cache_corrupted_mid_file_is_a_clear_error(tmp_path):
    path = _filled_cache(tmp_path)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 8192] = os.urandom(8192)
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError) as caught:
        with CallCache(path) as cache:
            cache.get_many(f"k{i}" for i in range(300))
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "cache file is damaged" in message and "move it aside" in message


def test_a_corrupted_cache_stops_prepare_before_any_call(tmp_path):
    path = _filled_cache(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[4096:4096 + 16384] = os.urandom(16384)
    path.write_bytes(bytes(raw))
    expert = CountingExpert()
    with pytest.raises(CacheError, match="cache file is damaged"):
        prepare([expert], PROMPTS, tmp_path / "data.jsonl", score=None, progress=False, cache=path)
    assert expert.finished == []


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "calls.sqlite"
    path.write_text("these are my notes, not a cache\n" * 200)
    with pytest.raises(CacheError, match=f"^{path}: .*not a torouter cache"):
        CallCache(path)


def test_a_zero_byte_cache_is_started_again_with_a_warning(tmp_path, caplog):
    path = tmp_path / "calls.sqlite"
    path.write_bytes(b"")
    expert = CountingExpert()
    with caplog.at_level(logging.WARNING):
        prepare([expert], PROMPTS[:5], tmp_path / "data.jsonl", score=None, progress=False, cache=path)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in m and "empty (0 bytes)" in m and "every call" in m for m in warned), warned
    assert len(expert.finished) == 5 and _committed(path) == 5


def test_the_cli_reports_a_damaged_cache_without_a_traceback(tmp_path, monkeypatch):
    path = _filled_cache(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[4096:4096 + 16384] = os.urandom(16384)
    path.write_bytes(bytes(raw))
    (tmp_path / "cli_err_experts.py").write_text(CLI_EXPERTS)
    (tmp_path / "experts.yaml").write_text(
        "experts:\n  - {name: a, tier: cloud, python: {callable: 'cli_err_experts:answer'}}\n")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:3]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALL_LOG", str(tmp_path / "calls.log"))
    result = CliRunner().invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl",
                                      "--out", "data.jsonl", "--cache", str(path), "--score", "none",
                                      "--no-progress"])
    assert result.exit_code == 2 and f"error: {path}: " in result.output and "cache file is damaged" in result.output
    assert not (tmp_path / "calls.log").exists()
