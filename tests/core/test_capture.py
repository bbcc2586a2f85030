"""``PromptCapture``: routed prompts to a prompts file, secrets and configured fields masked."""

import json
import threading

import pytest

from torouter.capture import PromptCapture, as_capture
from torouter.credentials import register_secret
from torouter.policy import Decision
from torouter.prepare.pipeline import read_prompts

SECRET = "sk-proj-capture0123456789abcdef"


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_prompt_and_decision_without_the_answer_by_default(tmp_path):
    capture = PromptCapture(tmp_path / "cap.jsonl", task="support")
    decision = Decision(expert="cloud-large", ranking=["cloud-large", "edge-small"], scores={}, costs={},
                        cost_weight=0.0, max_cost=None)
    line = capture.record("How do I reset my password?", decision, answer="Click 'forgot password'.")
    assert line is not None and line["routed_to"] == "cloud-large" and line["task"] == "support"
    (written,) = _lines(tmp_path / "cap.jsonl")
    assert written["prompt"] == "How do I reset my password?" and "answer" not in written
    assert written["id"].startswith("cap-") and written["captured_at"].endswith("Z")


def test_answers_only_when_asked_and_masked(tmp_path):
    capture = PromptCapture(tmp_path / "cap.jsonl", include_answers=True)
    capture.record("q", expert="e", answer=f"use the key {SECRET}")
    register_secret(SECRET)
    capture.record("q2", expert="e", answer=f"use the key {SECRET}")
    first, second = _lines(tmp_path / "cap.jsonl")
    assert SECRET not in json.dumps(first)       # key-like strings are masked even when unknown
    assert SECRET not in json.dumps(second) and "***" in second["answer"]


def test_secrets_patterns_and_fields_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", "hunter2-very-secret")
    capture = PromptCapture(tmp_path / "cap.jsonl", redact=["user_email", "Account"],
                            patterns=[r"[\w.]+@[\w.]+\.\w+", r"\b\d{4}-\d{4}\b"], keep_metadata=True)
    prompt = [{"role": "system", "content": "You are helpful."},
              {"role": "user", "content": [{"type": "text", "text": "my key is hunter2-very-secret, mail me at "
                                                                    "jo@example.com, card 1234-5678"},
                                           {"type": "image_url", "image_url": {"url": "data:..."}}],
               "name": "jo"},
              {"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]
    capture.record(prompt, expert="e", metadata={"user_email": "jo@example.com", "account": "A-1",
                                                 "tier": "gold", "task": "billing",
                                                 "url": "https://u:p4ssw0rd@host/x"})
    (line,) = _lines(tmp_path / "cap.jsonl")
    text = json.dumps(line)
    for leaked in ("hunter2-very-secret", "jo@example.com", "1234-5678", "A-1", "p4ssw0rd", "data:", "tool_calls"):
        assert leaked not in text
    assert line["prompt"][1] == {"role": "user", "content": "my key is ***, mail me at ***, card ***"}
    assert len(line["prompt"]) == 2                                   # the empty tool-call turn is dropped
    assert line["task"] == "billing"
    assert line["metadata"] == {"user_email": "***", "account": "***", "tier": "gold",
                                "url": "https://u:***@host/x"}


def test_message_objects_and_empty_prompts(tmp_path):
    from langchain_core.messages import AIMessage, HumanMessage

    capture = PromptCapture(tmp_path / "cap.jsonl")
    line = capture.record([HumanMessage("hi there"), AIMessage("hello"), HumanMessage("what is 2+2?")])
    assert line["prompt"] == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "what is 2+2?"}]
    assert capture.record("   ") is None and capture.captured == 1


def test_concurrent_records_never_interleave_and_prepare_reads_the_file(tmp_path):
    capture = PromptCapture(tmp_path / "cap.jsonl")
    long_text = "word " * 5000

    def work(i):
        for j in range(25):
            capture.record(f"prompt {i}-{j} {long_text}", expert="e")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    items = read_prompts(tmp_path / "cap.jsonl")                      # as is: ids unique, every line valid
    assert len(items) == 200 and len({i.id for i in items}) == 200
    assert items[0].extra["routed_to"] == "e"


def test_a_capture_that_cannot_write_never_fails_the_request(tmp_path):
    folder = tmp_path / "cap.jsonl"
    folder.mkdir()                                                    # a folder where the file should be
    capture = PromptCapture(folder)
    assert capture.record("hello", expert="e") is None
    assert capture.errors == 1 and "cap.jsonl" in capture.last_error


def test_as_capture():
    assert as_capture(None) is None
    with pytest.raises(TypeError, match="PromptCapture or a file path"):
        as_capture(42)
    with pytest.raises(ValueError, match="bad redaction pattern"):
        PromptCapture("x.jsonl", patterns=["("])
