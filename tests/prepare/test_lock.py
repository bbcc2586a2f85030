"""One cache, one ``torouter prepare`` at a time: a second process refuses clearly instead of
making every call a second time."""

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from torouter.prepare import CacheError, CallCache

EXPERT_MODULE = '''
import asyncio, os, time

started = 0

async def answer(prompt):
    global started
    started += 1
    with open(os.environ["CALL_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\t{prompt}\\n")
    # With GATE set, calls after the first two wait (at most 60 s) for the gate file to appear.
    gate = os.environ.get("GATE")
    deadline = time.monotonic() + 60
    while gate and started > 2 and not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return {"text": prompt, "input_tokens": 1, "output_tokens": 1}
'''
N_PROMPTS = 40


def _committed(cache) -> int:
    if not cache.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{cache}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_a_second_process_on_the_same_cache_refuses_and_no_call_is_made_twice(tmp_path):
    (tmp_path / "lock_experts.py").write_text(EXPERT_MODULE)
    (tmp_path / "experts.yaml").write_text(
        "experts:\n  - {name: slow, tier: cloud, concurrency: 2, python: {callable: 'lock_experts:answer'}}\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n"
                               for i in range(N_PROMPTS)))
    cache, log = tmp_path / "calls.sqlite", tmp_path / "calls.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "CALL_LOG": str(log)}

    def command(out):
        return [sys.executable, "-m", "torouter.cli", "prepare", "--experts", "experts.yaml", "--prompts",
                str(prompts), "--out", str(tmp_path / out), "--cache", str(cache), "--score", "none",
                "--no-progress"]

    gate = tmp_path / "gate"
    first = subprocess.Popen(command("first.jsonl"), cwd=tmp_path, env={**env, "GATE": str(gate)},
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _committed(cache) < 2:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.02)
        second = subprocess.run(command("second.jsonl"), cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=60)
        assert first.poll() is None, "the first run ended before the second started; the test proves nothing"
        gate.touch()
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr
    assert f"{cache}: in use by another torouter process (pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr and not (tmp_path / "second.jsonl").exists()
    assert first.returncode == 0, err
    calls = log.read_text().splitlines()
    assert len(calls) == N_PROMPTS and {c.split("\t")[0] for c in calls} == {str(first.pid)}


def test_the_lock_is_held_while_the_cache_is_open_and_released_on_close(tmp_path):
    path = tmp_path / "calls.sqlite"
    with CallCache(path):
        with pytest.raises(CacheError, match=f"{path}: in use by another torouter process \\(pid {os.getpid()}"):
            CallCache(path)
    with CallCache(path) as again:  # released on close
        assert again.count() == 0
