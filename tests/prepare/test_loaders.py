"""Benchmark loaders on small local files in the hub's layout, and the shipped demo prompts."""

import json
import re

import pytest

from torouter.data import DataError
from torouter.prepare import demo_prompts, demo_prompts_path, load_benchmark, resolve_prompts
from torouter.prepare.loaders import load_arc_challenge, load_gsm8k, load_mbpp
from torouter.prepare.scorers import final_number, make_scorer, run_code_tests

ARC = [{"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a "
        "meteorite impact. Which is the most likely effect of this increase in rotation?",
        "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                             "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                    "label": ["A", "B", "C", "D"]},
        "answerKey": "C"}]
GSM8K = [{"question": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
          "muffins for her friends every day with four. She sells the remainder for $2 per egg. How much does "
          "she make every day?",
          "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 "
          "every day at the farmer's market.\n#### 18"},
         {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total "
          "does it take?", "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric "
          "is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3"}]
MBPP = [{"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given "
         "character from the string.",
         "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n"
         "            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-1,-1):  \r\n"
         "        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s ",
         "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                       'assert remove_Occ("PHP","P") == "H"'],
         "test_setup_code": "", "challenge_test_list": []}]
PUBMEDQA = [{"pubid": 21645374, "question": "Do mitochondria play a role in remodelling lace plant leaves during "
             "programmed cell death?",
             "context": {"contexts": ["Programmed cell death (PCD) is the regulated death of cells within an "
                                      "organism.", "The following paper elucidates the role of mitochondria."],
                         "labels": ["BACKGROUND", "RESULTS"], "meshes": ["Apoptosis"]},
             "long_answer": "Results depicted mitochondrial dynamics in vivo as PCD progresses.",
             "final_decision": "yes"}]


def _hub_layout(root, config, split, rows):
    """Write rows as the hub stores them: <root>/<config>/<split>-00000-of-00001.parquet."""
    import datasets

    folder = root / config
    folder.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return root


def test_arc_challenge(tmp_path):
    rows = load_arc_challenge(source=_hub_layout(tmp_path / "arc", "ARC-Challenge", "test", ARC))
    assert rows == [{"id": "arc-Mercury_7175875", "task": "arc-challenge", "reference": "C", "prompt": (
        "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely "
        "effect of this increase in rotation?\nA. Planetary density will decrease.\nB. Planetary years will "
        "become longer.\nC. Planetary days will become shorter.\nD. Planetary gravity will become stronger.\n"
        "Answer with the letter of the correct option.")}]


def test_gsm8k_from_hub_layout_and_jsonl(tmp_path):
    rows = load_gsm8k(source=_hub_layout(tmp_path / "gsm8k", "main", "test", GSM8K))
    assert [r["id"] for r in rows] == ["gsm8k-0", "gsm8k-1"]
    assert [float(final_number(r["reference"])) for r in rows] == [18.0, 3.0]
    assert rows[0]["prompt"].startswith("Janet's ducks") and rows[0]["task"] == "gsm8k"
    jsonl = tmp_path / "gsm8k.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    assert load_gsm8k(source=jsonl, limit=1) == rows[:1]


def test_mbpp_reference_tests_pass_with_the_reference_code(tmp_path):
    rows = load_mbpp(source=_hub_layout(tmp_path / "mbpp", "full", "test", MBPP))
    row = rows[0]
    assert row["id"] == "mbpp-11" and row["task"] == "mbpp"
    assert row["prompt"].endswith('Your code should pass this test:\nassert remove_Occ("hello","l") == "heo"')
    assert row["reference"].count("assert ") == 3
    assert run_code_tests(MBPP[0]["code"], row["reference"]).passed
    assert not run_code_tests("def remove_Occ(s, ch):\n    return s", row["reference"]).passed


def test_mbpp_sanitized_columns(tmp_path):
    sanitized = [{"task_id": 2, "prompt": "Write a function to find the shared elements from the given two lists.",
                  "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
                  "test_imports": [], "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == set((4,))"],
                  "source_file": "x"}]
    path = tmp_path / "sanitized.jsonl"
    path.write_text(json.dumps(sanitized[0]) + "\n")
    row = load_mbpp(source=path)[0]
    assert row["prompt"].startswith("Write a function to find the shared elements")
    assert run_code_tests(sanitized[0]["code"], row["reference"]).passed


def test_pubmedqa(tmp_path):
    rows = load_benchmark("pubmedqa", source=_hub_layout(tmp_path / "pqa", "pqa_labeled", "train", PUBMEDQA))
    assert rows[0]["id"] == "pubmedqa-21645374" and rows[0]["reference"] == "yes"
    assert rows[0]["prompt"].startswith("Context: Programmed cell death (PCD) is the regulated death")
    assert rows[0]["prompt"].endswith("Answer yes, no or maybe.")


def test_loader_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no answer column"}) + "\n")
    with pytest.raises(DataError, match="GSM8K row 0: missing column"):
        load_gsm8k(source=bad)
    with pytest.raises(DataError, match="no such file"):
        load_gsm8k(source=tmp_path / "missing")
    (tmp_path / "empty" / "main").mkdir(parents=True)
    with pytest.raises(DataError, match="no test-\\* data files"):
        load_gsm8k(source=tmp_path / "empty")
    with pytest.raises(DataError, match="unknown benchmark 'mmlu'"):
        load_benchmark("mmlu")


def test_hub_loading_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load openai/gsm8k .* Pass a local copy as source"):
        load_gsm8k(limit=1)


def test_demo_prompts_cover_four_tasks_with_checkable_references():
    rows = demo_prompts()
    assert len(rows) >= 60 and len({r["id"] for r in rows}) == len(rows)
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    assert set(by_task) == {"math", "code", "knowledge", "biomed"}
    assert all(len(v) >= 15 for v in by_task.values())
    for row in by_task["math"]:
        assert re.search(r"\n#### \d+$", row["reference"])
    scorer = make_scorer("code")
    solutions = [r["solution"] for r in by_task["code"]]
    references = [r["reference"] for r in by_task["code"]]
    assert scorer.score(solutions, references) == [1.0] * len(solutions)   # every test suite is right
    assert scorer.score(["def nothing():\n    pass"] * 3, references[:3]) == [0.0] * 3
    assert all(r["reference"] in ("yes", "no", "maybe") for r in by_task["biomed"])
    assert {r["reference"] for r in by_task["biomed"]} == {"yes", "no", "maybe"}
    letters = [r for r in by_task["knowledge"] if re.fullmatch("[A-D]", r["reference"])]
    assert len(letters) >= 8 and all("\nA. " in r["prompt"] for r in letters)
    # Interleaved: the first 8 prompts hold two of every task.
    assert sorted(r["task"] for r in demo_prompts(limit=8)) == sorted(["math", "code", "knowledge", "biomed"] * 2)
    assert demo_prompts_path().parent.name == "prompts"
    assert [i.id for i in resolve_prompts("demo", limit=3)] == [r["id"] for r in rows[:3]]
