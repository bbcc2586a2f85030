"""Scorers on small hand-checked cases; the code sandbox refuses the network and stops runaways."""

import socket
import time

import pytest

from torouter.prepare.scorers import (ScoreError, ScorerConfig, choice_match, exact_match, extract_choice,
                                      extract_code, final_number, make_scorer, numeric_match, run_code_tests)


@pytest.mark.parametrize("answer, reference, expected", [
    ("Paris", "Paris", 1.0),
    ("  the Paris. ", "paris", 1.0),          # case, article, punctuation and spacing ignored
    ("William Shakespeare", "William  Shakespeare!", 1.0),
    ("Paris, France", "Paris", 0.0),
    ("", "Paris", 0.0),
])
def test_exact_match(answer, reference, expected):
    assert exact_match(answer, reference) == expected


@pytest.mark.parametrize("answer, reference, expected", [
    ("B", "B", 1.0),
    ("The answer is (C).", "C", 1.0),
    ("Answer: d", "D", 0.0),                  # a lower-case letter is a word, not an option label
    ("B. Carbon dioxide", "B", 1.0),
    ("A dolphin is a mammal, so option C.", "C", 1.0),  # the article "A" is not a pick
    ("I think (A) is wrong; the answer is B", "B", 1.0),
    ("Carbon dioxide", "B", 0.0),             # no label: no credit
    ("2", "2", 1.0),                           # ARC's numeric labels
    ("Yes, it does.", "yes", 1.0),
    ("There is no evidence either way, so the answer is maybe.", "maybe", 1.0),
    ("No. Antibiotics do not act on viruses.", "no", 1.0),
    ("Yes", "no", 0.0),
    ("Canberra", "Canberra", 1.0),            # a non-label reference falls back to exact match
])
def test_choice_match(answer, reference, expected):
    assert choice_match(answer, reference) == expected


def test_extract_choice_none_when_unclear():
    assert extract_choice("I am not sure.") is None
    assert extract_choice("It depends on the context", "yes/no/maybe") is None


@pytest.mark.parametrize("text, value", [
    ("She has 42 - 30 = 12 left.\n#### 12", 12),
    ("#### 1,680", 1680),
    ("The answer is $18.50 in total, after 3 packs", 18.5),
    ("First 3, then 7, so 10", 10),
    ("It takes 3/4 of an hour", 0.75),
    ("The temperature is -40 degrees", -40),
    ("no digits here", None),
])
def test_final_number(text, value):
    got = final_number(text)
    assert (got is None and value is None) or float(got) == pytest.approx(value)


def test_numeric_match():
    reference = "15 * 21 = 315 pages.\n#### 315"
    assert numeric_match("He reads 15 * 21 = 315 pages in three weeks.", reference) == 1.0
    assert numeric_match("#### 315.0", reference) == 1.0
    assert numeric_match("He reads 300 pages.", reference) == 0.0
    assert numeric_match("I don't know.", reference) == 0.0
    with pytest.raises(ScoreError, match="no number"):
        numeric_match("12", "Paris")


def test_extract_code():
    fenced = "Here it is:\n```python\ndef f(x):\n    return x + 1\n```\nThat adds one."
    assert extract_code(fenced) == "def f(x):\n    return x + 1\n"
    other_language = "```bash\nrm -rf /\n```\n```\ndef g():\n    return 2\n```"
    assert extract_code(other_language) == "def g():\n    return 2\n"
    unfenced = "Sure! Use this function:\ndef f(x):\n    return x * 2"
    assert extract_code(unfenced) == "def f(x):\n    return x * 2"


def test_code_scorer_passes_and_fails():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    scorer = make_scorer("code")
    answers = ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b",
               "I cannot write code.", "def add(a, b):\n    return a + b\nraise SystemExit(3)"]
    assert scorer.score(answers, [tests] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_code_sandbox_refuses_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                     f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))"):
            result = run_code_tests(code + "\ndef f():\n    return 1", "assert f() == 1", timeout_s=5)
            assert not result.passed and result.status == "failed"
            assert "not allowed" in result.detail
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the listening socket
    finally:
        server.close()


def test_code_sandbox_stops_runaway_loop_and_limits_memory():
    start = time.monotonic()
    result = run_code_tests("while True:\n    pass", "", timeout_s=1.5)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 10
    memory = run_code_tests("block = bytearray(3 * 2**30)", "", timeout_s=5, memory_mb=512)
    assert not memory.passed and "MemoryError" in memory.detail


def test_code_sandbox_blocks_processes_and_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    spawn = run_code_tests("import subprocess\nsubprocess.run(['true'])", "", timeout_s=5)
    assert not spawn.passed and "subprocess.Popen is not allowed" in spawn.detail
    env = run_code_tests("import os\nassert 'OPENAI_API_KEY' not in os.environ", "", timeout_s=5)
    assert env.passed
    files = run_code_tests("open('scratch.txt', 'w').write('x')\nimport os\nassert os.path.exists('scratch.txt')",
                           "", timeout_s=5)
    assert files.passed  # the answer runs in its own temp dir, where it may write


def test_bertscore_default_model_ranks_right_answers_higher():
    scorer = make_scorer(ScorerConfig("bertscore", device="cpu"))
    refs = ["The capital of France is Paris.", "Water boils at 100 degrees Celsius at sea level."]
    good = ["Paris is the capital of France.", "At sea level water boils at 100 °C."]
    bad = ["Bananas are rich in potassium.", "The stock market fell sharply on Monday."]
    good_scores = scorer.score(good, refs)
    bad_scores = scorer.score(bad, refs)
    assert all(0.0 <= s <= 1.0 for s in good_scores + bad_scores)
    assert all(g > b + 0.1 for g, b in zip(good_scores, bad_scores))
    assert scorer.score(["same words"], ["same words"])[0] == pytest.approx(1.0, abs=1e-4)
    mixed = scorer.score(["", "Paris is the capital of France.", "   "], [refs[0], refs[0], refs[1]])
    assert mixed[0] == 0.0 and mixed[2] == 0.0 and mixed[1] == pytest.approx(good_scores[0])
    assert scorer.config.signature == "bertscore:sentence-transformers/all-MiniLM-L6-v2:L6"


def test_scorer_config_errors():
    with pytest.raises(ScoreError, match="unknown metric"):
        ScorerConfig("bleu")
    with pytest.raises(ScoreError, match="choose one with --layer"):
        _ = ScorerConfig("bertscore", model="/some/local/model").signature
    assert ScorerConfig("bertscore", model="roberta-large").signature.endswith(":L17")
    with pytest.raises(ValueError, match="2 answers but 1 references"):
        make_scorer("exact").score(["a", "b"], ["a"])
