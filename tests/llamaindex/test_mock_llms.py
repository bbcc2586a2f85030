"""``RuleBasedMockLLM`` and ``RuleBasedMockFunctionCallingLLM`` are LlamaIndex's faces of ``torouter.offline``."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.llms import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from llamaindex_torouter import (  # noqa: E402
    ExtractiveLLM,
    ExtractiveToolLLM,
    RuleBasedMockFunctionCallingLLM,
    RuleBasedMockLLM,
)
from torouter import offline  # noqa: E402
from torouter.offline import OfflineExpert  # noqa: E402

RAG = ("Context information is below.\n---------------------\nLima is the capital of Peru. "
       "Warfarin is monitored with the INR test.\n---------------------\n"
       "Given the context information and not prior knowledge, answer the query.\n"
       "Query: How is warfarin monitored?\nAnswer: ")


def test_llamaindex_mocks_answer_with_the_core(monkeypatch):
    assert (ExtractiveLLM, ExtractiveToolLLM) == (RuleBasedMockLLM, RuleBasedMockFunctionCallingLLM)
    assert RuleBasedMockLLM(name="med-7b").complete(RAG).text == OfflineExpert(name="med-7b", signed=True).answer(RAG)

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    llm = RuleBasedMockFunctionCallingLLM(name="code-7b")
    response = llm.chat_with_tools([FunctionTool.from_defaults(multiply)], user_msg="What is 6 multiplied by 7?")
    selection = llm.get_tool_calls_from_response(response)[0]
    assert (selection.tool_name, selection.tool_kwargs) == ("multiply", {"a": 6, "b": 7})
    monkeypatch.setattr(offline.OfflineExpert, "plain_answer", lambda self, prompt: "from the core")
    chat = llm.chat([ChatMessage(role=MessageRole.USER, content="Why?")])
    assert chat.message.content == "[code-7b] from the core"
    assert json.loads(RuleBasedMockLLM(name="x").to_json())["class_name"] == "RuleBasedMockLLM"
