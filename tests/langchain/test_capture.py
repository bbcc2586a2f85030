"""``ChatTORouter(capture=...)`` records each routed prompt through the core ``PromptCapture``."""

import json

from helpers.langchain_experts import rule_experts, trained_router
from langchain_core.messages import HumanMessage, SystemMessage

from langchain_torouter import ChatTORouter
from torouter.capture import PromptCapture

LEAK = "sk-live-0123456789abcdefLANGCHAIN"


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_chat_model_captures_routed_prompts(tmp_path):
    capture = PromptCapture(tmp_path / "cap.jsonl", redact=["user_id"], keep_metadata=True)
    llm = ChatTORouter(experts=rule_experts(), router=trained_router(), cost_weight=50.0, capture=capture)
    answer = llm.invoke([SystemMessage("Be brief."), HumanMessage(f"What is 2 + 2? key {LEAK}")],
                        config={"metadata": {"user_id": "u-42", "task": "math"}})
    llm.batch(["Tell me about the heart", "Write a function"])
    lines = _lines(tmp_path / "cap.jsonl")
    assert len(lines) == 3
    first = lines[0]
    assert first["prompt"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "What is 2 + 2? key ***"}]
    assert first["routed_to"] == answer.response_metadata["torouter"]["chosen"]
    assert first["task"] == "math" and first["metadata"]["user_id"] == "***" and first["source"] == "langchain"
    assert "answer" not in first and LEAK not in json.dumps(lines)


def test_capture_from_a_path_and_off_by_default(tmp_path):
    llm = ChatTORouter(experts=rule_experts(), router=trained_router(), capture=str(tmp_path / "c.jsonl"))
    assert isinstance(llm.capture, PromptCapture)
    llm.invoke("hello")
    assert len(_lines(tmp_path / "c.jsonl")) == 1
    assert ChatTORouter(experts=rule_experts(), router=trained_router()).capture is None
    assert "capture" not in ChatTORouter(experts=rule_experts(), router=trained_router(),
                                         capture=str(tmp_path / "d.jsonl")).model_dump()
