"""Prompts from real traffic: OpenAI chat JSONL, LangSmith run exports, dedup and stratified sampling."""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from torouter.cli import app
from torouter.data import DataError
from torouter.prepare.pipeline import read_prompts
from torouter.traffic import dedup_prompts, read_langsmith_runs, read_openai_chat, sample_prompts


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_openai_chat_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}], "metadata": {"task": "geo"}},
        {"id": "x7", "messages": [{"role": "user", "content": [{"type": "text", "text": "2 + 2?"}]}]},
        {"messages": [{"role": "system", "content": "only a system prompt"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Tell me a joke"}], "task": "chitchat"},
    ])
    rows = read_openai_chat([path])
    assert [r["id"] for r in rows] == ["chat-1", "x7", "chat-4"]
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Capital of France?"}]
    assert rows[0]["task"] == "geo" and "answer" not in rows[0]
    assert rows[1]["prompt"] == "2 + 2?" and "task" not in rows[1]
    assert rows[2]["prompt"][-1] == {"role": "user", "content": "Tell me a joke"} and rows[2]["task"] == "chitchat"
    assert read_openai_chat([path], include_answers=True)[0]["answer"] == "Paris."
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "not chat format"}])
    with pytest.raises(DataError, match="bad.jsonl:1: expected an object with a 'messages' list"):
        read_openai_chat([bad])


LANGSMITH_RUNS = [
    {"id": "run-1", "name": "ChatOpenAI", "run_type": "llm",
     "inputs": {"messages": [[
         {"lc": 1, "type": "constructor", "id": ["langchain", "schema", "messages", "SystemMessage"],
          "kwargs": {"content": "You answer billing questions.", "type": "system"}},
         {"lc": 1, "type": "constructor", "id": ["langchain", "schema", "messages", "HumanMessage"],
          "kwargs": {"content": "Why was I charged twice?", "type": "human"}}]]},
     "outputs": {"generations": [[{"text": "Sorry about that...", "message": {}}]]},
     "extra": {"metadata": {"task": "billing"}}},
    {"id": "run-2", "name": "chain", "run_type": "chain", "inputs": {"question": "not a model call"}},
    {"id": "run-3", "name": "OpenAI", "run_type": "llm", "inputs": {"prompts": ["Summarise: the cat sat."]},
     "outputs": {"generations": [[{"text": "A cat sat."}]]}},
    {"id": "run-4", "name": "ChatAnthropic", "run_type": "chat_model",
     "inputs": {"messages": [{"role": "user", "content": "Write a haiku"}]}, "outputs": None},
    {"id": "run-5", "run_type": "chat_model",
     "inputs": {"messages": [[{"type": "human", "data": {"content": "first"}}],
                             [{"type": "human", "data": {"content": "second"}}]]}},
]


@pytest.mark.parametrize("shape", ["list", "object", "jsonl"])
def test_langsmith_run_exports(tmp_path, shape):
    path = tmp_path / "runs.json"
    if shape == "list":
        path.write_text(json.dumps(LANGSMITH_RUNS))
    elif shape == "object":
        path.write_text(json.dumps({"runs": LANGSMITH_RUNS}, indent=2))
    else:
        _write_jsonl(path, LANGSMITH_RUNS)
    rows = read_langsmith_runs([path])
    assert [r["id"] for r in rows] == ["run-1", "run-3", "run-4", "run-5#0", "run-5#1"]
    assert rows[0]["prompt"] == [{"role": "system", "content": "You answer billing questions."},
                                 {"role": "user", "content": "Why was I charged twice?"}]
    assert rows[0]["task"] == "billing" and rows[0]["run_name"] == "ChatOpenAI" and "answer" not in rows[0]
    assert rows[1]["prompt"] == "Summarise: the cat sat."
    assert [r["prompt"] for r in rows[3:]] == ["first", "second"]
    answers = {r["id"]: r.get("answer") for r in read_langsmith_runs([path], include_answers=True)}
    assert answers["run-1"] == "Sorry about that..." and answers["run-3"] == "A cat sat." and answers["run-4"] is None


def test_dedup_exact_and_near_identical():
    rows = [{"id": "a", "prompt": "What is the capital of France?"},
            {"id": "b", "prompt": "what is the capital of  france"},            # same up to case/punctuation
            {"id": "c", "prompt": [{"role": "user", "content": "What is the capital of France?"}]},
            {"id": "d", "prompt": "Please tell me what is the capital city of France today, thanks a lot"},
            {"id": "e", "prompt": "Please tell me what is the capital city of France today, thanks a lot!!"},
            {"id": "f", "prompt": "Please tell me what is the capital city of Spain today, thanks a lot"},
            {"id": "g", "prompt": "Write a poem about the sea"}]
    kept, dropped = dedup_prompts(rows)
    assert [r["id"] for r in kept] == ["a", "d", "f", "g"] and dropped == 3
    kept, dropped = dedup_prompts(rows, similarity=0.6)
    assert [r["id"] for r in kept] == ["a", "d", "g"] and dropped == 4      # f shares most 3-shingles with d
    with pytest.raises(DataError, match="similarity must be in"):
        dedup_prompts(rows, similarity=1.5)


def test_stratified_sampling_keeps_task_shares():
    rows = ([{"id": f"m{i}", "prompt": f"m{i}", "task": "math"} for i in range(60)]
            + [{"id": f"c{i}", "prompt": f"c{i}", "task": "code"} for i in range(30)]
            + [{"id": f"r{i}", "prompt": f"r{i}", "task": "rare"} for i in range(2)]
            + [{"id": f"n{i}", "prompt": f"n{i}"} for i in range(8)])
    sample = sample_prompts(rows, 20, seed=1)
    counts = Counter(r.get("task") for r in sample)
    assert len(sample) == 20 and len({r["id"] for r in sample}) == 20
    assert counts["math"] == 12 and counts["code"] == 6 and counts["rare"] >= 1 and counts[None] >= 1
    assert sample == sorted(sample, key=rows.index)                           # original order kept
    assert sample_prompts(rows, 20, seed=1) == sample                         # reproducible
    assert sample_prompts(rows, 20, seed=2) != sample
    assert sample_prompts(rows, 500) == rows
    with pytest.raises(DataError, match=">= 1"):
        sample_prompts(rows, 0)


def test_import_commands_write_prompts_prepare_reads(tmp_path):
    chat = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"Question number {i % 5}?"}], "task": "t" + str(i % 2)}
        for i in range(20)])
    runner = CliRunner()
    result = runner.invoke(app, ["import", "openai", str(chat), "--out", str(tmp_path / "p.jsonl"),
                                 "--max-prompts", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 prompts" in result.output and "20 read, 15 repeats dropped" in result.output
    assert len(read_prompts(tmp_path / "p.jsonl")) == 3
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(LANGSMITH_RUNS))
    result = runner.invoke(app, ["import", "langsmith", str(runs), "--out", str(tmp_path / "l.jsonl")])
    assert result.exit_code == 0, result.output
    assert [i.id for i in read_prompts(tmp_path / "l.jsonl")] == ["run-1", "run-3", "run-4", "run-5#0", "run-5#1"]
    missing = runner.invoke(app, ["import", "langsmith", str(tmp_path / "nope.json"), "--out", "x.jsonl"])
    assert missing.exit_code == 2 and "no such file" in missing.output
