"""The LangChain examples run offline and do what they say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, ToolMessage

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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
        "question": "What is the capital of Peru?", "answer": "Lima is the capital of Peru.", "expert": "edge-small",
        "routed_on": "What is the capital of Peru?"}  # the question, not the template around it
    code = by_question["How would you write a function that reverses a string? Give Python code."]
    assert code["expert"] == "code-7b" and "s[::-1]" in code["answer"]
    streamed = next(r for r in results if r.get("streamed"))
    assert streamed["answer"] == metformin["answer"]
    assert "-> med-7b:" in capsys.readouterr().out


def test_rag_chain_accepts_a_saved_router(rag, tmp_path):
    from helpers.langchain_experts import trained_router

    trained_router().save(tmp_path / "router")
    results = rag.main(["--router", str(tmp_path / "router"), "--cost-weight", "0"])
    # Without a price on quality, the expensive generalist wins the biomedical questions.
    assert results[0]["expert"] == "cloud-large"


def _ai(messages):
    return [m for m in messages if isinstance(m, AIMessage)]


def test_agent_routes_through_the_middleware_and_through_chat_torouter(agent, capsys):
    results = agent.main([])
    warfarin, product, quality_only = results["middleware"]
    calls = [m for m in warfarin["messages"] if isinstance(m, AIMessage) and m.tool_calls]
    assert calls[0].tool_calls[0]["name"] == "drug_interactions"
    assert calls[0].tool_calls[0]["args"] == {"drug": "warfarin"}
    tool_result = next(m for m in warfarin["messages"] if isinstance(m, ToolMessage))
    assert "bleeding risk" in tool_result.content
    assert warfarin["messages"][-1].content == f"The drug_interactions tool returned: {tool_result.content}"
    assert product["messages"][-1].content == "The multiply tool returned: 84.0"
    # The middleware decides once per run: one expert writes the tool call and the answer.
    for run in results["middleware"]:
        experts = {m.response_metadata["torouter"]["expert"] for m in _ai(run["messages"])}
        assert experts == {run["decision"]["expert"]}
        assert "edge-small" not in run["decision"]["ranking"]  # no tool calling: never routed to
    assert warfarin["decision"]["expert"] == "med-7b"
    assert quality_only["context"] == {"cost_weight": 0.0} and quality_only["decision"]["expert"] == "cloud-large"
    # ChatTORouter as the agent's model routes each call, among the tool-capable experts.
    for run, routed in zip(results["chat_model"], results["middleware"]):
        assert run["messages"][-1].content == routed["messages"][-1].content
        for message in _ai(run["messages"]):
            decision = message.response_metadata["torouter"]
            assert "edge-small" not in decision["ranking"]
    assert _ai(results["chat_model"][0]["messages"])[0].response_metadata["torouter"]["expert"] == "med-7b"
    out = capsys.readouterr().out
    assert "TORouterMiddleware" in out and "ChatTORouter" in out
    assert "med-7b: calls ['drug_interactions']" in out and "calls ['multiply']" in out
