"""The LangChain examples run offline and do what they say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, ToolMessage

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rag():
    return load_example("langchain_rag")


@pytest.fixture(scope="module")
def agent():
    return load_example("langchain_agent")


def test_rag_chain_retrieves_and_routes(rag, capsys):
    results = rag.main([])
    by_question = {r["question"]: r for r in results if not r.get("streamed")}
    metformin = by_question["What is the mechanism of action of metformin?"]
    assert metformin["expert"] == "med-7b"
    assert metformin["answer"] == ("Metformin lowers blood glucose mainly by reducing hepatic glucose "
                                   "production.")
    assert by_question["What is the capital of Peru?"] == {
        "question": "What is the capital of Peru?", "answer": "Lima is the capital of Peru.", "expert": "edge-small"}
    code = by_question["How would you write a function that reverses a string? Give Python code."]
    assert code["expert"] == "code-7b" and "s[::-1]" in code["answer"]
    streamed = next(r for r in results if r.get("streamed"))
    assert streamed["answer"] == metformin["answer"]
    assert "-> med-7b:" in capsys.readouterr().out


def test_rag_chain_accepts_a_saved_router(rag, tmp_path):
    from langchain_standard.support import trained_router

    trained_router().save(tmp_path / "router")
    results = rag.main(["--router", str(tmp_path / "router"), "--cost-weight", "0"])
    # Without a price on quality, the expensive generalist wins the biomedical questions.
    assert results[0]["expert"] == "cloud-large"


def test_agent_calls_tools_through_the_router(agent, capsys):
    first, second = agent.main([])
    calls = [m for m in first if isinstance(m, AIMessage) and m.tool_calls]
    assert calls[0].tool_calls[0]["name"] == "drug_interactions"
    assert calls[0].tool_calls[0]["args"] == {"drug": "warfarin"}
    tool_result = next(m for m in first if isinstance(m, ToolMessage))
    assert "bleeding risk" in tool_result.content
    final = first[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and "bleeding risk" in final.content
    assert second[-1].content == "The multiply tool returned: 84.0"
    for message in first + second:
        if isinstance(message, AIMessage) and "torouter" in message.response_metadata:
            routed = message.response_metadata["torouter"]
            assert "edge-small" not in routed["ranking"]  # no tool calling: never routed to
    assert "calls ['multiply']" in capsys.readouterr().out
