"""``torouter prepare`` and ``torouter score`` from the command line."""

import json

import pytest
from typer.testing import CliRunner

from torouter.cli import app
from torouter.data import RoutingDataset

EXPERTS_MODULE = '''
def right(prompt):
    return {"text": "The answer is B. #### 12 yes", "input_tokens": 10, "output_tokens": 8}

def wrong(prompt):
    return {"text": "I would say D. #### 7 no", "input_tokens": 10, "output_tokens": 6}

def coder(prompt):
    return "```python\\ndef add(a, b):\\n    return a + b\\n```"
'''

MANIFEST = """
experts:
  - name: right
    tier: cloud
    python: {callable: "cli_experts:right"}
    price: {input_per_million: 1000, output_per_million: 2000}
  - name: wrong
    tier: edge
    python: {callable: "cli_experts:wrong"}
    price: {per_call: 0.0001}
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "cli_experts.py").write_text(EXPERTS_MODULE)
    (tmp_path / "experts.yaml").write_text(MANIFEST)
    prompts = [
        {"id": "mc", "prompt": "Pick one:\nA. x\nB. y", "reference": "B", "task": "mcq"},
        {"id": "math", "prompt": "What is 5 + 7?", "reference": "5 + 7 = 12\n#### 12", "task": "math"},
        {"id": "bio", "prompt": "Context: ...\nQuestion: ...?", "reference": "yes", "task": "biomed"},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_prepare_then_rescore(workdir):
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl",
                                 "--out", "data.jsonl", "--score", "choice", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 records to data.jsonl: 6 calls made" in result.output
    data = RoutingDataset.from_jsonl(workdir / "data.jsonl")
    right, wrong = data.experts.index("right"), data.experts.index("wrong")
    assert data.scores[:, right].tolist() == [1.0, 0.0, 1.0]  # B, (no letter for the math answer), yes
    assert data.scores[:, wrong].tolist() == [0.0, 0.0, 0.0]
    assert data.costs[0, right] == pytest.approx(10 * 1000 / 1e6 + 8 * 2000 / 1e6)
    assert data.costs[0, wrong] == pytest.approx(0.0001)

    again = runner.invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "prompts.jsonl",
                                "--out", "data.jsonl", "--score", "numeric", "--no-progress"])
    assert again.exit_code == 0 and "0 calls made" in again.output and "6 from the cache" in again.output
    assert "not scored: mc / right: reference has no number: 'B'" in again.output

    scored = runner.invoke(app, ["score", "data.jsonl", "--metric", "numeric", "--out", "numeric.jsonl"])
    assert scored.exit_code == 0, scored.output
    records = {r["id"]: r for r in map(json.loads, (workdir / "numeric.jsonl").read_text().splitlines())}
    assert records["math"]["responses"]["right"]["score"] == 1.0
    assert records["math"]["responses"]["wrong"]["score"] == 0.0
    assert records["mc"]["responses"]["right"]["score"] is None          # unscorable: unobserved, not 0
    assert records["mc"]["responses"]["right"]["text"] == "The answer is B. #### 12 yes"


def test_code_metric_from_cli(workdir):
    (workdir / "code.yaml").write_text('experts:\n  - {name: coder, tier: edge, python: {callable: "cli_experts:coder"}}\n')
    (workdir / "code.jsonl").write_text(json.dumps({"id": "c1", "prompt": "Write add(a, b).",
                                                     "reference": "assert add(1, 2) == 3", "task": "code"}) + "\n")
    result = CliRunner().invoke(app, ["prepare", "--experts", "code.yaml", "--prompts", "code.jsonl",
                                      "--out", "code_out.jsonl", "--score", "code", "--no-progress"])
    assert result.exit_code == 0, result.output
    record = json.loads((workdir / "code_out.jsonl").read_text())
    assert record["responses"]["coder"]["score"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--experts", "missing.yaml"], "missing.yaml: no such file"),
    (["--prompts", "nope.jsonl"], "nope.jsonl: no such file (or a named source: demo"),
    (["--score", "bleu"], "unknown metric 'bleu'"),
    (["--score", "code", "--sandbox", "docker"], "unknown sandbox 'docker'; choose one of namespaces, rlimits"),
])
def test_prepare_errors(workdir, args, message):
    base = {"--experts": "experts.yaml", "--prompts": "prompts.jsonl", "--out": "data.jsonl"}
    base.update(dict(zip(args[::2], args[1::2])))
    result = CliRunner().invoke(app, ["prepare", *[x for kv in base.items() for x in kv], "--no-progress"])
    assert result.exit_code == 2
    assert message in result.output
    assert not (workdir / "data.jsonl").exists()


def test_bad_prompt_line_names_file_and_line(workdir):
    (workdir / "bad.jsonl").write_text('{"id": "a", "prompt": "ok"}\n{"id": "b"}\n')
    result = CliRunner().invoke(app, ["prepare", "--experts", "experts.yaml", "--prompts", "bad.jsonl",
                                      "--out", "data.jsonl", "--no-progress"])
    assert result.exit_code == 2 and "bad.jsonl:2: missing 'prompt'" in result.output


def test_score_needs_answers(workdir):
    (workdir / "empty.jsonl").write_text(json.dumps({"id": "a", "prompt": "p", "responses": {"x": {"score": None}}}) + "\n")
    result = CliRunner().invoke(app, ["score", "empty.jsonl", "--metric", "exact", "--out", "o.jsonl"])
    assert result.exit_code == 2 and "no answers to score" in result.output
