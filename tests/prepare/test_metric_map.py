"""A metric per task: metric maps, the loaders' natural metrics, and the metric each record keeps."""

import json

import pytest
from typer.testing import CliRunner

from torouter.cli import app
from torouter.data import RoutingDataset
from torouter.prepare import NATURAL_METRICS, JudgeConfig, MetricMap, ScoreError, make_scoring, prepare
from torouter.prepare import loaders

MODULE = '''
def solver(prompt):
    return {"text": "The answer is B. #### 12", "input_tokens": 5, "output_tokens": 5}

def grader(prompt):
    return {"text": "Grade: 10" if "#### 12" in prompt else "Grade: 1", "input_tokens": 5, "output_tokens": 2}
'''

MANIFEST = """
experts:
  - {name: solver, tier: cloud, python: {callable: "metric_mod:solver"}, price: {per_call: 0.01}}
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "metric_mod.py").write_text(MODULE)
    (tmp_path / "experts.yaml").write_text(MANIFEST)
    (tmp_path / "judge.yaml").write_text(
        'experts:\n  - {name: judge, tier: cloud, python: {callable: "metric_mod:grader"}}\n')
    prompts = [
        {"id": "g", "prompt": "5 + 7?", "reference": "5 + 7 = 12\n#### 12", "task": "gsm8k"},
        {"id": "a", "prompt": "Pick:\nA. x\nB. y", "reference": "B", "task": "arc-challenge"},
        {"id": "p", "prompt": "Is it?", "reference": "yes", "task": "pubmedqa"},
        {"id": "c", "prompt": "Say hi.", "task": "chat"},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _records(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_parse_metric_maps():
    assert MetricMap.parse("numeric").by_task == {"*": "numeric"}
    mapping = MetricMap.parse("gsm8k=numeric,mbpp=code,arc-challenge=choice,*=judge")
    assert mapping.for_task("gsm8k") == "numeric" and mapping.for_task("mbpp") == "code"
    assert mapping.for_task("chat") == "judge" and mapping.for_task(None) == "judge"
    auto = MetricMap.parse("auto")
    assert auto.for_task("gsm8k") == "numeric" and auto.for_task("mbpp") == "code"
    assert auto.for_task("pubmedqa") == "choice" and auto.for_task("chat") == "bertscore"
    assert MetricMap.parse("auto,*=judge").for_task("other") == "judge"
    assert MetricMap.parse("auto,gsm8k=exact").for_task("gsm8k") == "exact"
    assert MetricMap.parse("gsm8k=numeric").for_task("chat") is None       # not covered: unscored
    assert MetricMap.parse("*=none").for_task("x") is None
    for bad, message in [("gsm8k=nope", "unknown metric 'nope'"), ("=numeric", "names no task"),
                         ("gsm8k=numeric,,", "an empty item"), ("a=exact,a=code", "given twice")]:
        with pytest.raises(ScoreError, match=message):
            MetricMap.parse(bad)
    with pytest.raises(ScoreError, match="needs a judge"):
        make_scoring("*=judge")


def test_loaders_declare_their_natural_metric():
    assert set(NATURAL_METRICS) == set(loaders.LOADERS)
    rows = {
        "arc-challenge": loaders.arc_row({"id": "1", "question": "q", "choices": {"label": ["A"], "text": ["t"]},
                                          "answerKey": "A"}),
        "gsm8k": loaders.gsm8k_row({"question": "q", "answer": "#### 1"}, 0),
        "mbpp": loaders.mbpp_row({"task_id": 1, "text": "t", "test_list": ["assert True"]}),
        "pubmedqa": loaders.pubmedqa_row({"pubid": 1, "question": "q", "context": {"contexts": ["c"]},
                                          "final_decision": "yes"}),
    }
    for name, row in rows.items():
        assert row["task"] == name and NATURAL_METRICS[row["task"]] in ("choice", "numeric", "code")
    assert NATURAL_METRICS == {"arc-challenge": "choice", "gsm8k": "numeric", "mbpp": "code", "pubmedqa": "choice"}


def test_default_scores_each_benchmark_with_its_natural_metric(workdir, monkeypatch):
    import torouter.prepare.scorers as scorers

    bert_calls = []
    monkeypatch.setattr(scorers.BertScoreScorer, "_score",
                        lambda self, answers, refs: bert_calls.append(len(answers)) or [0.5] * len(answers))
    result = CliRunner().invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl",
                                      "--out", "data.jsonl", "--no-progress"])
    assert result.exit_code == 0, result.output
    records = _records(workdir / "data.jsonl")
    assert records["g"]["metric"] == "numeric" and records["g"]["responses"]["solver"]["score"] == 1.0
    assert records["a"]["metric"] == "choice" and records["a"]["responses"]["solver"]["score"] == 1.0
    assert records["p"]["metric"] == "choice" and records["p"]["responses"]["solver"]["score"] == 0.0
    assert "metric" not in records["c"] and records["c"]["responses"]["solver"]["score"] is None  # no reference
    assert bert_calls == []                                    # no bertscore task had a reference


def test_explicit_metric_keeps_the_old_behaviour(workdir):
    result = CliRunner().invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl",
                                      "--out", "data.jsonl", "--score", "exact", "--no-progress"])
    assert result.exit_code == 0, result.output
    records = _records(workdir / "data.jsonl")
    assert {records[i]["metric"] for i in "gap"} == {"exact"}
    assert records["g"]["responses"]["solver"]["score"] == 0.0       # exact, not numeric


def test_metric_map_with_judge_for_the_rest(workdir):
    summary = prepare("experts.yaml", "prompts.jsonl", workdir / "data.jsonl",
                      score="gsm8k=numeric,arc-challenge=choice,*=judge",
                      judge=JudgeConfig(judge="judge.yaml"), progress=False)
    records = _records(workdir / "data.jsonl")
    assert [records[i]["metric"] for i in "gapc"] == ["numeric", "choice", "judge", "judge"]
    assert records["p"]["responses"]["solver"]["score"] == 1.0      # the judge saw "#### 12" in the answer
    assert records["c"]["responses"]["solver"]["score"] == 1.0      # judged without a reference
    assert summary.judge.answers == 2 and summary.judge.calls_made == 2
    RoutingDataset.from_jsonl(workdir / "data.jsonl")             # still valid routing data

    rescored = CliRunner().invoke(app, ["score", "data.jsonl", "--metric", "gsm8k=exact,*=none", "--out",
                                        "r.jsonl"])
    assert rescored.exit_code == 0, rescored.output
    again = _records(workdir / "r.jsonl")
    assert again["g"]["metric"] == "exact" and again["g"]["responses"]["solver"]["score"] == 0.0
    assert again["c"]["metric"] == "judge"                          # untouched records keep theirs


def test_map_without_a_default_reports_unscored_tasks(workdir):
    summary = prepare("experts.yaml", "prompts.jsonl", workdir / "data.jsonl", score="gsm8k=numeric",
                      progress=False)
    assert any("no metric for task(s) arc-challenge, chat, pubmedqa" in p for p in summary.problems)


def test_old_records_without_a_metric_still_read(workdir):
    (workdir / "old.jsonl").write_text(json.dumps(
        {"id": "x", "prompt": "p", "reference": "12", "responses": {"e": {"score": 1.0, "cost": 0.1, "text": "12"}}})
        + "\n")
    data = RoutingDataset.from_jsonl(workdir / "old.jsonl")
    assert data.scores.tolist() == [[1.0]]
    result = CliRunner().invoke(app, ["score", "old.jsonl", "--metric", "numeric", "--out", "new.jsonl"])
    assert result.exit_code == 0, result.output
    assert _records(workdir / "new.jsonl")["x"]["metric"] == "numeric"
