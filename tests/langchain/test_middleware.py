"""``TORouterMiddleware`` and ``TORouterDecisionModel`` inside LangChain v1 agents, end to end and offline."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import (
    ModelChoice,
    ModelFallbackMiddleware,
    ModelRequest,
    ModelRouterMiddleware,
    SummarizationMiddleware,
)
from langchain.agents.structured_output import ProviderStrategy, ToolStrategy
from langchain_core.decisions import Choice, Noul
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel

from helpers.langchain_experts import EXPERT_NAMES, ChatDown, OutageError
from langchain_torouter import ChatRuleBased, TORouterDecisionModel, TORouterMiddleware
from torouter import AllExpertsFailed

BIOMED = "What is the mechanism of action of warfarin?"
CODE = "Write a Python function that checks whether a number is prime."
TRIVIA = "What is the capital of Japan?"
TOOL_QUESTION = "Use the drug_interactions tool: what interacts with 'warfarin'?"
TOOL_ANSWER = "The drug_interactions tool returned: aspirin, ibuprofen and amoxicillin raise the bleeding risk"
CONTEXT = ("You answer questions about drugs. Warfarin works by inhibiting vitamin K epoxide reductase, "
           "which lowers the clotting factors.")


@tool
def drug_interactions(drug: str) -> str:
    """Look up the known interactions of a drug."""
    return "aspirin, ibuprofen and amoxicillin raise the bleeding risk"


class Interaction(BaseModel):
    """The known interactions of a drug."""

    drug: str
    interactions: str


class Product(BaseModel):
    """The result of a multiplication."""

    value: int
    explanation: str


def experts(**replace):
    """Rule-based experts named after the synthetic ones; ``edge-small`` cannot call tools."""
    models = {name: ChatRuleBased(model=name, tool_calling=name != "edge-small") for name in EXPERT_NAMES}
    models.update(replace)
    return models


def middleware(router, **kwargs) -> TORouterMiddleware:
    kwargs.setdefault("experts", experts())
    kwargs.setdefault("cost_weight", 50.0)
    return TORouterMiddleware(router=router, **kwargs)


def agent_with(mw, tools=(drug_interactions,), **kwargs):
    return create_agent(ChatRuleBased(model="unrouted"), tools=list(tools), middleware=[mw], **kwargs)


def ask(text: str) -> dict:
    return {"messages": [HumanMessage(text)]}


def ai_messages(state) -> list[AIMessage]:
    return [m for m in state["messages"] if isinstance(m, AIMessage)]


# --- one decision per run, or per call --------------------------------------------------------
def test_per_run_decides_once_and_the_expert_finishes_the_run(router):
    mw = middleware(router)
    out = agent_with(mw).invoke(ask(TOOL_QUESTION))
    first, second = ai_messages(out)
    assert first.tool_calls[0]["name"] == "drug_interactions" and second.content == TOOL_ANSWER
    assert [m.response_metadata["torouter"]["expert"] for m in (first, second)] == ["med-7b", "med-7b"]
    assert [m.response_metadata["model_name"] for m in (first, second)] == ["med-7b", "med-7b"]
    assert [m.response_metadata["torouter"]["reused"] for m in (first, second)] == [False, True]
    decision = out["torouter"]
    assert decision["expert"] == decision["chosen"] == "med-7b"
    assert decision["routed_text"] == TOOL_QUESTION and decision["mode"] == "per_run"
    assert decision["ranking"][0] == "med-7b" and set(decision["scores"]) == set(EXPERT_NAMES)
    assert (mw.controller.router_calls, mw.controller.cache_hits) == (1, 0)  # one router pass per run


def test_per_call_mode_decides_at_every_model_call(router):
    mw = middleware(router, mode="per_call")
    out = agent_with(mw).invoke(ask(TOOL_QUESTION))
    metas = [m.response_metadata["torouter"] for m in ai_messages(out)]
    assert [(m["expert"], m["reused"], m["mode"]) for m in metas] == [("med-7b", False, "per_call")] * 2
    # Two decisions; the unchanged question's prediction comes from the cache the second time.
    assert (mw.controller.router_calls, mw.controller.cache_hits) == (1, 1)


def test_async_run_routes_like_the_sync_one(router):
    mw = middleware(router)
    out = asyncio.run(agent_with(mw).ainvoke(ask(TOOL_QUESTION)))
    assert [m.response_metadata["torouter"]["expert"] for m in ai_messages(out)] == ["med-7b", "med-7b"]
    assert out["messages"][-1].content == TOOL_ANSWER
    assert out["torouter"]["reused"] is True and mw.controller.router_calls == 1


def test_checkpointed_thread_decides_each_run_anew(router):
    mw = middleware(router)
    agent = agent_with(mw, tools=(), checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t1"}}
    assert agent.invoke(ask(BIOMED), config)["torouter"]["expert"] == "med-7b"
    second = agent.invoke(ask(CODE), config)
    assert second["torouter"]["expert"] == "code-7b" and second["torouter"]["routed_text"] == CODE
    assert mw.controller.router_calls == 2


# --- streaming --------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


def _check_stream(events, expected_answer: str) -> None:
    tokens, calls, decisions = [], [], []
    for mode, payload in events:
        if mode == "messages":
            chunk, meta = payload
            if isinstance(chunk, AIMessageChunk) and meta["langgraph_node"] == "model":
                if chunk.content:
                    tokens.append(chunk.content)
                calls += [c["name"] for c in chunk.tool_call_chunks if c["name"]]
        elif "model" in payload and payload["model"].get("torouter"):
            decisions.append(payload["model"]["torouter"]["expert"])
    assert tokens == _words(expected_answer)  # every token of the answer exactly once, in order
    assert calls == ["drug_interactions"]
    assert decisions == ["med-7b", "med-7b"]  # the decision is in each model step's state update


def test_stream_messages_sends_each_token_once(router):
    agent = agent_with(middleware(router))
    _check_stream(agent.stream(ask(TOOL_QUESTION), stream_mode=["messages", "updates"]), TOOL_ANSWER)


def test_astream_messages_sends_each_token_once(router):
    agent = agent_with(middleware(router))

    async def collect():
        return [event async for event in agent.astream(ask(TOOL_QUESTION), stream_mode=["messages", "updates"])]

    _check_stream(asyncio.run(collect()), TOOL_ANSWER)


def test_streamed_text_answer_matches_the_invoked_one(router):
    agent = agent_with(middleware(router), tools=(), system_prompt=CONTEXT)
    answer = agent.invoke(ask(BIOMED))["messages"][-1]
    assert answer.response_metadata["torouter"]["expert"] == "med-7b"
    streamed = [chunk.content for chunk, meta in agent.stream(ask(BIOMED), stream_mode="messages")
                if isinstance(chunk, AIMessageChunk) and chunk.content]
    assert "".join(streamed) == answer.content == "Warfarin works by inhibiting vitamin K epoxide reductase, " \
                                                  "which lowers the clotting factors."
    assert streamed == _words(answer.content)


# --- who may answer ---------------------------------------------------------------------------
def test_experts_without_tool_calling_are_never_picked_when_tools_exist(router):
    without_tools = agent_with(middleware(router), tools=()).invoke(ask(TRIVIA))
    assert without_tools["torouter"]["expert"] == "edge-small"  # cheap and good at trivia
    mw = middleware(router)
    with_tools = agent_with(mw).invoke(ask(TRIVIA))
    assert with_tools["torouter"]["expert"] != "edge-small"
    assert "edge-small" not in with_tools["torouter"]["ranking"]
    request = ModelRequest(model=ChatRuleBased(), messages=[HumanMessage(TRIVIA)], tools=[drug_interactions])
    eligible, skipped = mw.eligible_experts(request)
    assert sorted(eligible) == ["cloud-large", "code-7b", "med-7b"]
    assert skipped == {"edge-small": "its profile says it cannot call tools"}


def test_experts_whose_bind_tools_fails_are_skipped_with_the_reason(router):
    mw = middleware(router, experts=experts(**{"code-7b": ChatDown(label="code-7b")}))
    request = ModelRequest(model=ChatRuleBased(), messages=[HumanMessage(CODE)], tools=[drug_interactions],
                           tool_choice="no_such_tool")
    eligible, skipped = mw.eligible_experts(request)
    assert eligible == []
    assert skipped["code-7b"] == "ChatDown does not implement tool calling"
    assert skipped["med-7b"].startswith("ValueError: tool_choice 'no_such_tool' is not one of the bound tools")
    only_down = middleware(router, experts={n: ChatDown(label=n) for n in EXPERT_NAMES})
    with pytest.raises(ValueError, match="no expert can take this request: .*does not implement tool calling"):
        agent_with(only_down).invoke(ask(CODE))


def test_structured_output_through_the_schema_tool(router):
    mw = middleware(router)
    out = agent_with(mw, response_format=ToolStrategy(Interaction)).invoke(ask(TOOL_QUESTION))
    assert out["structured_response"] == Interaction(drug="warfarin", interactions=TOOL_ANSWER)
    calls = [c["name"] for m in ai_messages(out) for c in m.tool_calls]
    assert calls == ["drug_interactions", "Interaction"]
    assert {m.response_metadata["torouter"]["expert"] for m in ai_messages(out)} == {"med-7b"}
    # A plain schema (auto strategy) with no tools still needs tool calling here: no edge-small.
    auto = agent_with(middleware(router), tools=(), response_format=Product).invoke(ask("What is 12 times 7?"))
    assert auto["structured_response"] == Product(value=84, explanation="The answer is 84.")
    assert "edge-small" not in auto["torouter"]["ranking"]
    native = agent_with(middleware(router), tools=(), response_format=ProviderStrategy(Product))
    with pytest.raises(ValueError, match="its profile says it has no native structured output"):
        native.invoke(ask("What is 12 times 7?"))


# --- failures -----------------------------------------------------------------------------------
def test_a_failing_expert_falls_back_along_the_ranking(router):
    mw = middleware(router, experts=experts(**{"med-7b": ChatDown(label="med-7b")}))
    out = agent_with(mw, tools=()).invoke(ask(BIOMED))
    decision = out["torouter"]
    assert decision["chosen"] == "med-7b" and decision["expert"] == decision["ranking"][1]
    assert decision["fallback"] is True
    assert decision["failures"] == {"med-7b": "OutageError: med-7b is unreachable"}
    assert out["messages"][-1].response_metadata["model_name"] == decision["expert"]
    strict = middleware(router, experts=experts(**{"med-7b": ChatDown(label="med-7b")}), fallbacks=False)
    with pytest.raises(OutageError):
        agent_with(strict, tools=()).invoke(ask(BIOMED))
    all_down = middleware(router, experts={n: ChatDown(label=n) for n in EXPERT_NAMES})
    with pytest.raises(AllExpertsFailed, match="all 4 experts failed"):
        agent_with(all_down, tools=()).invoke(ask(BIOMED))


def test_model_fallback_middleware_answers_for_a_failing_expert(router):
    down = ChatDown(label="med-7b")
    mw = middleware(router, experts=experts(**{"med-7b": down}), fallbacks=False)
    backup = ChatRuleBased(model="backup")
    agent = create_agent(ChatRuleBased(model="unrouted"), tools=[],
                         middleware=[mw, ModelFallbackMiddleware(backup)], system_prompt=CONTEXT)
    out = agent.invoke(ask(BIOMED))
    answer = out["messages"][-1]
    assert down.calls == 1  # the router's pick was tried first
    assert answer.response_metadata["model_name"] == "backup"
    assert answer.content.startswith("Warfarin works by inhibiting")
    assert answer.response_metadata["torouter"]["chosen"] == "med-7b"


# --- what the router reads ------------------------------------------------------------------------
def test_summarization_middleware_routes_on_the_question_not_the_summary(router):
    code_summary = "The user asked for Python code: a function that checks whether a number is prime, then faster."
    summarizer = SummarizationMiddleware(model=ChatRuleBased(model="summarizer"), trigger=("messages", 4),
                                         keep=("messages", 2), summarizer=RunnableLambda(lambda _: code_summary))
    history = [HumanMessage(CODE), AIMessage("def is_prime(n): ..."),
               HumanMessage("Make it faster for large numbers."), AIMessage("Use a sieve."),
               HumanMessage(BIOMED)]
    for route_on in ("last_user", "conversation"):
        mw = middleware(router, route_on=route_on)
        agent = create_agent(ChatRuleBased(model="unrouted"), tools=[], middleware=[summarizer, mw])
        out = agent.invoke({"messages": list(history)})
        assert out["messages"][0].content.startswith("Here is a summary of the conversation to date:")
        assert code_summary in out["messages"][0].content and CODE not in [m.content for m in out["messages"]]
        assert out["torouter"]["routed_text"] == BIOMED  # kept turns only: the summary is never read
        assert out["torouter"]["expert"] == "med-7b"


def test_tool_results_are_not_routed_on(router):
    mw = middleware(router, mode="per_call")
    out = agent_with(mw).invoke(ask(TOOL_QUESTION))
    assert isinstance(out["messages"][2], ToolMessage)
    assert {m.response_metadata["torouter"]["routed_text"] for m in ai_messages(out)} == {TOOL_QUESTION}


# --- per-run options -----------------------------------------------------------------------------
@dataclass
class AppContext:
    user_id: str
    cost_weight: float | None = None


def test_runtime_context_sets_the_runs_cost_weight_and_max_cost(router):
    mw = middleware(router)
    agent = agent_with(mw, tools=())
    assert agent.invoke(ask(BIOMED))["torouter"]["expert"] == "med-7b"
    quality_only = agent.invoke(ask(BIOMED), context={"cost_weight": 0.0})["torouter"]
    assert (quality_only["expert"], quality_only["cost_weight"]) == ("cloud-large", 0.0)
    cheap = agent.invoke(ask(BIOMED), context={"max_cost": 1e-4})["torouter"]
    assert (cheap["expert"], cheap["ranking"]) == ("edge-small", ["edge-small"])
    typed = agent_with(mw, tools=(), context_schema=AppContext)
    assert typed.invoke(ask(BIOMED), context=AppContext("u1", cost_weight=0.0))["torouter"]["expert"] == "cloud-large"
    assert typed.invoke(ask(BIOMED), context=AppContext("u1"))["torouter"]["expert"] == "med-7b"
    with pytest.raises(ValueError, match="runtime context: cost_weight must be a finite number >= 0, got -1"):
        agent.invoke(ask(BIOMED), context={"cost_weight": -1})


def test_bad_configuration_is_refused(router):
    with pytest.raises(ValueError, match="missing for the router's experts: \\['med-7b'\\]"):
        middleware(router, experts={n: ChatRuleBased(model=n) for n in EXPERT_NAMES if n != "med-7b"})
    with pytest.raises(ValueError, match="mode must be one of"):
        middleware(router, mode="sometimes")
    with pytest.raises(ValueError, match="expert 'med-7b' is a int, not a LangChain chat model"):
        middleware(router, experts=experts(**{"med-7b": 42}))
    with pytest.raises(ValueError, match="default_expert='gpt-9' is not one of the router's experts"):
        middleware(router, default_expert="gpt-9")
    with pytest.raises(ValueError, match="route_on must be one of"):
        middleware(router, route_on="everything")


# --- the decision model for LangChain's ModelRouterMiddleware ----------------------------------------
def _choice(labels) -> dict:
    return {"expert": Choice(instructions="Which expert should answer?", criteria={n: n for n in labels})}


def test_decision_model_answers_choice_questions_with_the_policy(router):
    model = TORouterDecisionModel(router=router, cost_weight=50.0)
    answer = model.invoke({"state": BIOMED, "questions": _choice(EXPERT_NAMES)}).choices["expert"]
    assert answer.choice == "med-7b"
    assert sum(answer.probabilities.values()) == pytest.approx(1.0)
    assert max(answer.probabilities, key=answer.probabilities.get) == "med-7b"
    assert answer.confidence == answer.probabilities["med-7b"]
    narrowed = model.invoke({"state": [HumanMessage(BIOMED)], "questions": _choice(["edge-small", "code-7b"])})
    assert set(narrowed.choices["expert"].probabilities) == {"edge-small", "code-7b"}
    assert narrowed.choices["expert"].choice in ("edge-small", "code-7b")
    budget = TORouterDecisionModel(router=router, max_cost=1e-4)
    capped = budget.invoke({"state": {"messages": [HumanMessage(BIOMED)]}, "questions": _choice(EXPERT_NAMES)})
    assert capped.choices["expert"].choice == "edge-small"
    assert capped.choices["expert"].probabilities["cloud-large"] == 0.0
    with pytest.raises(ValueError, match="answers Choice questions over its experts only; question 'q' is a Noul"):
        model.invoke({"state": BIOMED, "questions": {"q": Noul(instructions="Is it about drugs?")}})
    with pytest.raises(ValueError, match="labels \\['gpt-9'\\] are not experts of the router"):
        model.invoke({"state": BIOMED, "questions": _choice(["med-7b", "gpt-9"])})


def test_decision_model_drives_model_router_middleware(router):
    models = experts()
    router_middleware = ModelRouterMiddleware(
        choices={name: ModelChoice(model=chat, criteria=name) for name, chat in models.items()},
        instructions="Pick the expert with the best quality for its price.",
        classifier=TORouterDecisionModel(router=router, cost_weight=50.0))
    agent = create_agent(ChatRuleBased(model="unrouted"), middleware=[router_middleware])
    out = agent.invoke(ask(BIOMED))
    assert out["model_route"].choice == "med-7b"
    assert out["messages"][-1].response_metadata["model_name"] == "med-7b"
    out = agent.invoke(ask(CODE))
    assert out["model_route"].choice == "code-7b"
