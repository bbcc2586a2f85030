"""Kill -9 a ``torouter prepare`` mid-run; the restart redoes no finished call and loses none."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

N_PROMPTS = 150
EXPERTS = ("alpha", "beta")

EXPERT_MODULE = '''
import asyncio, os

async def answer(prompt, tag, delay):
    # Logged when the call starts: a call killed before its commit shows up in both runs.
    with open(os.environ["CALL_LOG"], "a") as log:
        log.write(f"{os.environ['RUN_TAG']}\\t{tag}\\t{prompt}\\n")
    await asyncio.sleep(delay)
    return {"text": f"{tag}: {prompt}", "input_tokens": 4, "output_tokens": 2}
'''


def _committed(cache):
    """(expert, prompt) of every call committed to the cache so far."""
    if not cache.exists():
        return set()
    with sqlite3.connect(f"file:{cache}?mode=ro", uri=True) as db:
        try:
            rows = db.execute("SELECT result FROM calls").fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return set()
    return {tuple(json.loads(r[0])["text"].split(": ", 1)) for r in rows}


@pytest.mark.slow
def test_kill_and_resume_redoes_nothing_and_loses_nothing(tmp_path):
    (tmp_path / "resume_experts.py").write_text(EXPERT_MODULE)
    experts = "experts:\n" + "".join(
        f"  - name: {name}\n    tier: cloud\n    concurrency: 3\n    retries: 0\n"
        f"    python: {{callable: 'resume_experts:answer', kwargs: {{tag: {name}, delay: 0.03}}}}\n"
        for name in EXPERTS)
    (tmp_path / "experts.yaml").write_text(experts)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "reference": f"question {i}"})
                               + "\n" for i in range(N_PROMPTS)))
    out, cache, log = tmp_path / "data.jsonl", tmp_path / "calls.sqlite", tmp_path / "calls.log"
    command = [sys.executable, "-m", "torouter.cli", "prepare", "--experts", "experts.yaml", "--prompts",
               str(prompts), "--out", str(out), "--cache", str(cache), "--score", "exact", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CALL_LOG": str(log)}
    total = N_PROMPTS * len(EXPERTS)

    first = subprocess.Popen(command, cwd=tmp_path, env={**env, "RUN_TAG": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_committed(cache)) < 40:
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline, "the first run made no progress"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = _committed(cache)
    assert 40 <= len(done_before) < total and not out.exists()

    second = subprocess.run(command, cwd=tmp_path, env={**env, "RUN_TAG": "2"}, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    redone = {(tag, prompt) for run, tag, prompt in calls if run == "2"}
    second_run_calls = [c for c in calls if c[0] == "2"]
    assert not redone & done_before                          # no finished call was made again
    assert len(second_run_calls) == total - len(done_before)  # every other call exactly once
    assert f"{total - len(done_before)} calls made" in second.stdout

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(N_PROMPTS))
    for record in records:
        assert set(record["responses"]) == set(EXPERTS)
        for name, response in record["responses"].items():
            assert response["text"] == f"{name}: {record['prompt']}" and response["score"] == 0.0
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == total
