"""``TORouterLLM(capture=...)`` records each routed prompt through the core ``PromptCapture``."""

import json

import pytest

pytest.importorskip("llama_index.core")
from llama_index.core.llms import ChatMessage, MessageRole  # noqa: E402

from llamaindex_torouter import ExtractiveLLM, ExtractiveToolLLM, TORouterLLM  # noqa: E402
from torouter.capture import PromptCapture  # noqa: E402

LEAK = "sk-live-0123456789abcdefLLAMA"


def make_experts():
    return {"edge-small": ExtractiveLLM(name="edge-small"), "code-7b": ExtractiveToolLLM(name="code-7b"),
            "med-7b": ExtractiveLLM(name="med-7b"), "cloud-large": ExtractiveToolLLM(name="cloud-large")}


def test_llm_captures_routed_prompts(router, tmp_path):
    llm = TORouterLLM(make_experts(), router, capture=PromptCapture(tmp_path / "cap.jsonl", task="rag"))
    response = llm.chat([ChatMessage(role=MessageRole.USER, content=f"How does the heart pump blood? {LEAK}")])
    llm.complete("Write a python function to sort a list")
    lines = [json.loads(x) for x in (tmp_path / "cap.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["prompt"] == "How does the heart pump blood? ***"
    assert lines[0]["routed_to"] == response.additional_kwargs["torouter"]["chosen"]
    assert lines[0]["task"] == "rag" and "answer" not in lines[0]
    assert lines[1]["prompt"] == "Write a python function to sort a list"


def test_capture_from_a_path(router, tmp_path):
    llm = TORouterLLM(make_experts(), router, capture=str(tmp_path / "c.jsonl"))
    assert isinstance(llm.capture, PromptCapture) and llm.capture.source == "llamaindex"
    assert TORouterLLM(make_experts(), router).capture is None
