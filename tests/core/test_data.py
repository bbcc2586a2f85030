"""The routing-data format: validation errors, round-trips, prompt text and atomic writes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from torouter.data import (
    DataError,
    Record,
    RoutingDataset,
    atomic_write,
    content_text,
    iter_jsonl,
    iter_prompts,
    prompt_text,
    validate_record,
    write_jsonl,
)


def _line(rid="a", prompt="What is 2+2?", responses=None, **extra) -> str:
    obj = {"id": rid, "prompt": prompt,
           "responses": responses if responses is not None else {"m1": {"score": 1.0, "cost": 0.1}}}
    obj.update(extra)
    return json.dumps(obj)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = _line("ok-1")


# --- bad input: every message names the file and the line ----------------------------------

BAD_LINES = {
    "malformed JSON": ('{"id": "x", "prompt": "hi", "responses": {', "malformed JSON"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "missing id": (json.dumps({"prompt": "hi", "responses": {"m1": {"score": 1, "cost": 0}}}), "missing 'id'"),
    "missing prompt": (json.dumps({"id": "x", "responses": {"m1": {"score": 1, "cost": 0}}}), "missing 'prompt'"),
    "empty prompt": (_line("x", prompt="   "), "empty 'prompt'"),
    "empty message list": (_line("x", prompt=[]), "missing 'prompt'"),
    "message without content": (_line("x", prompt=[{"role": "user"}]), "prompt message 0"),
    "missing responses": (json.dumps({"id": "x", "prompt": "hi"}), "missing 'responses'"),
    "empty responses": (_line("x", responses={}), "missing 'responses'"),
    "response not an object": (_line("x", responses={"m1": 0.5}), "response of expert 'm1' must be an object"),
    "score above 1": (_line("x", responses={"m1": {"score": 1.5, "cost": 0.1}}), "score 1.5 outside [0, 1]"),
    "negative score": (_line("x", responses={"m1": {"score": -0.5, "cost": 0.1}}), "negative score"),
    "negative cost": (_line("x", responses={"m1": {"score": 0.5, "cost": -1}}), "negative cost -1"),
    "score as a string": (_line("x", responses={"m1": {"score": "0.5", "cost": 0.1}}), "score must be a number"),
    "score as a bool": (_line("x", responses={"m1": {"score": True, "cost": 0.1}}), "score must be a number"),
    "NaN string value": (_line("x", responses={"m1": {"score": "NaN", "cost": 0.1}}), "score must be a number"),
    "NaN literal": ('{"id": "x", "prompt": "hi", "responses": {"m1": {"score": NaN, "cost": 0.1}}}',
                    "NaN is not allowed"),
    "Infinity literal cost": ('{"id": "x", "prompt": "hi", "responses": {"m1": {"score": 0.5, "cost": Infinity}}}',
                              "Infinity is not allowed"),
    "scored without cost": (_line("x", responses={"m1": {"score": 0.5}}), "needs 'cost'"),
    "non-string task": (_line("x", task=3), "'task' must be a string"),
    "float id": (_line(1.5), "'id' must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_names_file_and_line(tmp_path, case):
    bad, expected = BAD_LINES[case]
    # the bad record sits on line 3, after a good record and a blank line
    path = _write(tmp_path / "data.jsonl", [GOOD, "", bad])
    with pytest.raises(DataError) as info:
        list(iter_jsonl(path))
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message
    assert expected in message


def test_nan_as_a_python_value_is_rejected():
    obj = {"id": "x", "prompt": "hi", "responses": {"m1": {"score": math.nan, "cost": 0.1}}}
    with pytest.raises(DataError, match=r"^where:7: expert 'm1': score is nan"):
        validate_record(obj, "where:7")
    obj = {"id": "x", "prompt": "hi", "responses": {"m1": {"score": 0.5, "cost": math.inf}}}
    with pytest.raises(DataError, match="cost is inf"):
        validate_record(obj, "where:7")


def test_duplicate_id_names_the_second_line(tmp_path):
    path = _write(tmp_path / "dup.jsonl", [_line("a"), _line("b"), _line("a")])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: duplicate id 'a'"):
        RoutingDataset.from_jsonl(path)
    # iter_prompts (routing input without responses) checks duplicates too
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: duplicate id 'a'"):
        list(iter_prompts(path))


def test_empty_file(tmp_path):
    for content in ("", "\n  \n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: empty file"):
            list(iter_jsonl(path))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no such file"):
        RoutingDataset.from_jsonl(path)
    with pytest.raises(DataError, match="no such file"):
        list(iter_prompts(path))


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_empty_dataset_rejected():
    with pytest.raises(DataError):
        RoutingDataset([])


# --- good input --------------------------------------------------------------------------

def test_iter_prompts_needs_no_responses(tmp_path):
    path = _write(tmp_path / "prompts.jsonl", [json.dumps({"id": 1, "prompt": "hi"}),
                                               json.dumps({"id": "b", "prompt": [{"role": "user", "content": "yo"}]})])
    assert list(iter_prompts(path)) == [("1", "hi"), ("b", [{"role": "user", "content": "yo"}])]


def test_round_trip_keeps_unknown_fields(tmp_path):
    obj = {"id": "r1", "prompt": "Q?", "reference": "A", "task": "qa",
           "responses": {"m1": {"score": 0.25, "cost": 0.002, "text": "A.", "my_metric": [1, 2]},
                         "m2": {"score": None, "cost": 0.01}},
           "source": {"dataset": "x", "row": 7}, "tags": ["t1"]}
    path = _write(tmp_path / "in.jsonl", [json.dumps(obj)])
    records = list(iter_jsonl(path))
    assert records[0].extra == {"source": {"dataset": "x", "row": 7}, "tags": ["t1"]}
    out = tmp_path / "out.jsonl"
    assert write_jsonl(out, records) == 1
    assert json.loads(out.read_text(encoding="utf-8")) == obj
    # and through RoutingDataset.to_jsonl
    out2 = tmp_path / "out2.jsonl"
    RoutingDataset(records).to_jsonl(out2)
    assert json.loads(out2.read_text(encoding="utf-8")) == obj


def test_non_ascii_round_trip(tmp_path):
    rec = Record(id="ü", prompt="Ça va? 日本", responses={"m": {"score": 1.0, "cost": 0.0}})
    path = tmp_path / "u.jsonl"
    write_jsonl(path, [rec])
    assert list(iter_jsonl(path))[0].prompt == "Ça va? 日本"


def test_int_id_becomes_string(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_line(17)])
    assert list(iter_jsonl(path))[0].id == "17"


def test_messages_list_prompt(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]
    path = _write(tmp_path / "m.jsonl", [_line("m", prompt=messages)])
    ds = RoutingDataset.from_jsonl(path)
    assert ds.records[0].prompt == messages
    assert ds.texts() == ["Be brief.\nCapital of Peru?"]
    assert ds.texts("last_user") == ["Capital of Peru?"]


def test_dataset_arrays_mask_unobserved():
    records = [
        Record("a", "p1", {"m1": {"score": 0.2, "cost": 1.0, "nll": 0.5, "latency_s": 2.0, "output_tokens": 10},
                           "m2": {"score": 0.8, "cost": 3.0}}),
        Record("b", "p2", {"m1": {"score": 0.6, "cost": 2.0}}),  # m2 missing
        Record("c", "p3", {"m1": {"score": 1.0, "cost": 3.0}, "m2": {"score": None, "cost": 5.0}}),  # m2 null
    ]
    ds = RoutingDataset(records)
    assert ds.experts == ["m1", "m2"]
    assert ds.mask.tolist() == [[True, True], [True, False], [True, False]]
    assert np.isnan(ds.scores[1, 1]) and np.isnan(ds.scores[2, 1])
    assert np.isnan(ds.costs[2, 1])  # a cost without a score is not used
    assert ds.nll[0, 0] == 0.5 and np.isnan(ds.nll[1, 0])
    assert ds.latency[0, 0] == 2.0 and ds.output_tokens[0, 0] == 10
    # means over observed entries only (m2's unobserved rows are not zeros)
    np.testing.assert_allclose(ds.mean_scores(), [0.6, 0.8])
    np.testing.assert_allclose(ds.mean_costs(), [2.0, 3.0])
    assert ds.ids == ["a", "b", "c"]
    assert len(ds) == 3


def test_explicit_expert_order_and_never_observed_expert():
    records = [Record("a", "p", {"m1": {"score": 0.5, "cost": 1.0}, "m2": {"score": 0.1, "cost": 2.0}})]
    ds = RoutingDataset(records, experts=["m2", "ghost"])
    assert ds.experts == ["m2", "ghost"]
    assert ds.scores[0, 0] == 0.1
    assert ds.mask.tolist() == [[True, False]]
    assert np.isnan(ds.mean_scores()[1]) and np.isnan(ds.mean_costs()[1])


def test_split_is_seeded_and_disjoint(synthetic_dataset):
    train, test = synthetic_dataset.split(0.25, seed=3)
    assert len(test) == 60 and len(train) == 180
    assert not set(train.ids) & set(test.ids)
    assert set(train.ids) | set(test.ids) == set(synthetic_dataset.ids)
    again_train, again_test = synthetic_dataset.split(0.25, seed=3)
    assert again_test.ids == test.ids
    other = synthetic_dataset.split(0.25, seed=4)[1]
    assert other.ids != test.ids
    with pytest.raises(ValueError):
        synthetic_dataset.split(1.0)


# --- prompt_text ---------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a Python function."},
    {"role": "assistant", "content": "def f(): pass"},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]},
    {"role": "tool", "content": "tool output"},
]


def test_prompt_text_conversation_reads_system_and_user_only():
    assert prompt_text(CONVERSATION, "conversation") == (
        "You are a helpful assistant.\nWrite a Python function.\nWhat is in this picture?")
    assert prompt_text(CONVERSATION) == prompt_text(CONVERSATION, "conversation")


def test_prompt_text_last_user():
    assert prompt_text(CONVERSATION, "last_user") == "What is in this picture?"


def test_prompt_text_last_user_skips_image_only_message():
    messages = [{"role": "user", "content": "Describe cats."},
                {"role": "user", "content": [{"type": "image", "source": {"data": "..."}}]}]
    # the image-only message has no text, so the latest user *text* is the earlier one
    assert prompt_text(messages, "last_user") == "Describe cats."
    assert prompt_text(messages, "conversation") == "Describe cats."


def test_prompt_text_human_role_and_default_role():
    assert prompt_text([{"role": "human", "content": "a"}, {"content": "b"}], "last_user") == "b"
    assert prompt_text([{"role": "human", "content": "a"}, {"content": "b"}], "conversation") == "a\nb"


def test_prompt_text_plain_string_and_bad_mode():
    assert prompt_text("hello", "last_user") == "hello"
    assert prompt_text("hello", "conversation") == "hello"
    with pytest.raises(ValueError, match="route_on"):
        prompt_text([{"role": "user", "content": "x"}], "everything")


def test_content_text_blocks():
    blocks = ["plain", {"type": "text", "text": "one"}, {"type": "image_url", "image_url": {}},
              {"type": "text", "text": ""}, {"type": "text", "text": "two"}]
    assert content_text(blocks) == "plain\none\ntwo"
    assert content_text(None) == ""
    assert content_text("s") == "s"


# --- atomic writes -------------------------------------------------------------------------

def test_write_jsonl_is_atomic_when_rows_raise(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("original\n", encoding="utf-8")

    def rows():
        yield {"id": "1", "prompt": "a"}
        yield {"id": "2", "prompt": "b"}
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_jsonl(path, rows())
    assert path.read_text(encoding="utf-8") == "original\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_write_jsonl_refuses_nan_and_leaves_no_file(tmp_path):
    path = tmp_path / "new.jsonl"
    with pytest.raises(ValueError):
        write_jsonl(path, [{"id": "1", "x": float("nan")}])
    assert list(tmp_path.iterdir()) == []


def test_write_jsonl_counts_and_creates_parents(tmp_path):
    path = tmp_path / "deep" / "dir" / "out.jsonl"
    assert write_jsonl(path, ({"id": str(i)} for i in range(3))) == 3
    assert [json.loads(x)["id"] for x in path.read_text(encoding="utf-8").splitlines()] == ["0", "1", "2"]


def test_atomic_write_replaces_existing(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old", encoding="utf-8")
    atomic_write(path, lambda h: h.write("new"))
    assert path.read_text(encoding="utf-8") == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_non_utf8_line_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((_line("a") + "\n").encode() + '{"id": "b", "prompt": "caf\xe9"}\n'.encode("latin-1"))
    for read in (lambda: list(iter_jsonl(path)), lambda: list(iter_prompts(path)),
                 lambda: RoutingDataset.from_jsonl(path)):
        with pytest.raises(DataError) as info:
            read()
        message = str(info.value)
        assert message.startswith(f"{path}:2: ") and "not valid UTF-8" in message and "0xe9" in message


def test_deeply_nested_json_names_file_and_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    deep = '{"id": "x", "prompt": "hi", "responses": {"m": {"score": 0.5, "cost": 0.1, "extra": ' + \
        "[" * 100_000 + "]" * 100_000 + "}}}"
    path.write_text(_line("a") + "\n" + deep + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(iter_jsonl(path))
    assert str(info.value).startswith(f"{path}:2: ") and "nested too deeply" in str(info.value)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_line("a") + "\n").encode())
    assert [r.id for r in iter_jsonl(path)] == ["a"]


def test_check_writable_names_the_path_and_the_reason(tmp_path):
    from torouter.data import OutputPathError, check_writable

    (tmp_path / "file").write_text("")
    with pytest.raises(OutputPathError, match=rf"^{re.escape(str(tmp_path / 'file' / 'x.jsonl'))}: cannot write "
                                              rf"there: {re.escape(str(tmp_path / 'file'))} is not a folder"):
        check_writable(tmp_path / "file" / "x.jsonl")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputPathError, match="is a folder"):
        check_writable(tmp_path / "dir")
    check_writable(tmp_path / "dir", folder=True)          # a router directory may be a folder
    check_writable(tmp_path / "new" / "deeper" / "x.jsonl")  # folders are created as needed
    assert not any((tmp_path / "new" / "deeper").iterdir())  # and the probe leaves nothing behind
