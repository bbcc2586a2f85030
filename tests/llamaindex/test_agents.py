"""TORouterLLM inside LlamaIndex workflow agents: FunctionAgent, ReActAgent and AgentWorkflow.

Every step of a run routes on the user's request (tool results and ReAct observations
are skipped), so the decision is the same at every step and costs one router call per
user turn; the decision reaches the agent's ``AgentOutput`` and ``AgentStream`` events.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.agent.workflow import (  # noqa: E402
    AgentOutput,
    AgentStream,
    AgentWorkflow,
    FunctionAgent,
    ReActAgent,
    ToolCallResult,
)
from llama_index.core.bridge.pydantic import BaseModel  # noqa: E402
from llama_index.core.llms import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from llama_index.core.workflow import Context  # noqa: E402

from llamaindex_torouter import (  # noqa: E402
    METADATA_KEY,
    ExtractiveLLM,
    ExtractiveToolLLM,
    TORouterLLM,
    supports_tools,
)
from torouter import Controller  # noqa: E402

MATH = "What is 6 multiplied by 7?"
BIOMED = "What interacts with warfarin? Use the drug interactions lookup."
TOOL_EXPERTS = ["code-7b", "cloud-large"]


@pytest.fixture(scope="module")
def bare(router):
    controller = Controller(router, cost_weight=40.0)
    return lambda text, tools=False: controller.decide(text, allowed=TOOL_EXPERTS if tools else None).expert


def experts():
    return {
        "edge-small": ExtractiveLLM(name="edge-small", context_window=2048),
        "code-7b": ExtractiveToolLLM(name="code-7b", context_window=8192),
        "med-7b": ExtractiveLLM(name="med-7b", context_window=8192),
        "cloud-large": ExtractiveToolLLM(name="cloud-large", context_window=32768),
    }


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def drug_interactions(drug: str) -> str:
    """Look up the drug interactions of a drug."""
    return "aspirin and ibuprofen raise the bleeding risk" if "warfarin" in drug.lower() else "none on file"


MULTIPLY = FunctionTool.from_defaults(multiply)
INTERACTIONS = FunctionTool.from_defaults(drug_interactions)


async def run(agent, question: str, **kwargs):
    """Run an agent; returns its result and its AgentOutput, AgentStream and ToolCallResult events."""
    handler = agent.run(question, **kwargs)
    events = [e async for e in handler.stream_events() if isinstance(e, AgentOutput | AgentStream | ToolCallResult)]
    return await handler, events


def assert_one_decision(seen: list, question: str, expert: str, steps: int) -> None:
    assert len(seen) == steps, [d.routed_text for d in seen]
    assert [d.routed_text for d in seen] == [question] * steps
    assert [d.expert for d in seen] == [expert] * steps


@pytest.mark.asyncio
@pytest.mark.parametrize("streaming", [False, True])
async def test_function_agent_routes_every_step_on_the_request(router, bare, decisions, streaming):
    llm = TORouterLLM(experts(), router, cost_weight=40.0)
    agent = FunctionAgent(tools=[MULTIPLY], llm=llm, streaming=streaming,
                          system_prompt="You are a careful assistant. Use the tools when they help.")
    result, events = await run(agent, MATH)

    assert str(result) == f"[{bare(MATH, tools=True)}] 42"
    assert_one_decision(decisions, MATH, bare(MATH, tools=True), steps=2)
    assert llm.controller.router_calls == 1 and llm.controller.cache_hits == 1
    outputs = [e for e in events if isinstance(e, AgentOutput)]
    assert [o.response.additional_kwargs[METADATA_KEY]["expert"] for o in outputs] == [bare(MATH, tools=True)] * 2
    assert result.response.additional_kwargs[METADATA_KEY]["ranking"] == decisions[-1].ranking
    if streaming:
        streamed = [e for e in events if isinstance(e, AgentStream)]
        assert streamed and all(e.raw[METADATA_KEY]["expert"] == bare(MATH, tools=True) for e in streamed)


@pytest.mark.asyncio
async def test_function_agent_routes_each_user_turn_once(router, bare, decisions):
    llm = TORouterLLM(experts(), router, cost_weight=40.0)
    agent = FunctionAgent(tools=[MULTIPLY, INTERACTIONS], llm=llm)
    ctx = Context(agent)
    await run(agent, MATH, ctx=ctx)
    decisions.clear()
    second, _ = await run(agent, BIOMED, ctx=ctx)
    assert str(second).endswith("aspirin and ibuprofen raise the bleeding risk")
    assert_one_decision(decisions, BIOMED, bare(BIOMED, tools=True), steps=2)
    assert llm.controller.router_calls == 2  # one per user turn


@pytest.mark.asyncio
async def test_without_sticky_every_step_is_predicted_afresh(router, bare, decisions):
    llm = TORouterLLM(experts(), router, cost_weight=40.0, sticky=False)
    await run(FunctionAgent(tools=[MULTIPLY], llm=llm), MATH)
    assert_one_decision(decisions, MATH, bare(MATH, tools=True), steps=2)
    assert llm.controller.router_calls == 2 and llm.controller.cache_hits == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("question, tool, observation", [
    (MATH, MULTIPLY, "42"),
    (BIOMED, INTERACTIONS, "aspirin and ibuprofen raise the bleeding risk"),
])
@pytest.mark.parametrize("streaming", [False, True])
async def test_react_agent_skips_observations_and_keeps_one_decision(router, bare, decisions, question, tool,
                                                                     observation, streaming):
    llm = TORouterLLM(experts(), router, cost_weight=40.0)
    agent = ReActAgent(tools=[tool], llm=llm, streaming=streaming)
    result, events = await run(agent, question)

    expert = bare(question)
    assert str(result) == f"[{expert}] {observation}"
    calls = [e for e in events if isinstance(e, ToolCallResult)]
    assert [c.tool_name for c in calls] == [tool.metadata.name]
    # Step one writes Thought/Action/Action Input; step two reads "Observation: ..." as a user turn.
    assert_one_decision(decisions, question, expert, steps=2)
    assert llm.controller.router_calls == 1
    outputs = [e for e in events if isinstance(e, AgentOutput)]
    assert "Action Input:" in outputs[0].response.content
    assert all(o.response.additional_kwargs[METADATA_KEY]["expert"] == expert for o in outputs)
    if question == BIOMED:  # ReAct needs no function calling: a completion expert runs the loop
        assert expert == "med-7b" and not supports_tools(llm.experts[expert])


@pytest.mark.asyncio
async def test_agent_workflow_hands_off_and_keeps_one_decision(router, bare, decisions):
    llm = TORouterLLM(experts(), router, cost_weight=40.0)
    workflow = AgentWorkflow(agents=[
        FunctionAgent(name="greeter", description="Greets people and chats about the weather.", llm=llm,
                      tools=[], can_handoff_to=["calculator"]),
        FunctionAgent(name="calculator", description="Does arithmetic: it can multiply integers.", llm=llm,
                      tools=[MULTIPLY]),
    ], root_agent="greeter")
    result, events = await run(workflow, MATH)

    assert str(result) == f"[{bare(MATH, tools=True)}] 42"
    calls = [e.tool_name for e in events if isinstance(e, ToolCallResult)]
    assert calls == ["handoff", "multiply"]
    outputs = [e for e in events if isinstance(e, AgentOutput)]
    assert [o.current_agent_name for o in outputs] == ["greeter", "calculator", "calculator"]
    assert all(o.response.additional_kwargs[METADATA_KEY]["expert"] == bare(MATH, tools=True) for o in outputs)
    assert_one_decision(decisions, MATH, bare(MATH, tools=True), steps=3)
    assert llm.controller.router_calls == 1


@pytest.mark.asyncio
async def test_agent_state_is_not_routed_on(router, bare, decisions):
    llm = TORouterLLM(experts(), router, cost_weight=40.0)
    workflow = AgentWorkflow(agents=[FunctionAgent(name="calculator", description="Multiplies.", llm=llm,
                                                   tools=[MULTIPLY])],
                             initial_state={"customer": "Ada", "notes": "prefers metric units " * 20})
    result, _ = await run(workflow, MATH)
    assert str(result).endswith("42")
    assert_one_decision(decisions, MATH, bare(MATH, tools=True), steps=2)


@pytest.mark.asyncio
async def test_the_decision_is_never_sent_back_to_an_expert(router):
    """Agents resend earlier replies, which carry the decision; experts must not receive it."""
    received: list[list[ChatMessage]] = []

    class Recording(ExtractiveToolLLM):
        def _reply(self, messages, tools, tool_required):
            received.append(list(messages))
            return super()._reply(messages, tools, tool_required)

    team = experts()
    team["cloud-large"] = Recording(name="cloud-large")
    team["code-7b"] = Recording(name="code-7b")
    llm = TORouterLLM(team, router, cost_weight=40.0)
    await run(FunctionAgent(tools=[MULTIPLY], llm=llm), MATH)
    assert len(received) == 2
    resent = [m for m in received[1] if m.role == MessageRole.ASSISTANT]
    assert resent and all(METADATA_KEY not in m.additional_kwargs for m in resent)


class Product(BaseModel):
    """A product and its price."""

    name: str
    price: float


def test_structured_output_calls_the_schema_tool(router, bare, decisions):
    llm = TORouterLLM(experts(), router, cost_weight=40.0)
    question = "How much does the red kettle cost? It costs 24.5 dollars."
    structured = llm.as_structured_llm(Product)
    response = structured.chat([ChatMessage(role=MessageRole.USER, content=question)])
    product = response.raw
    assert isinstance(product, Product) and product.price == 24.5
    assert decisions[-1].tools is True and decisions[-1].expert == bare(question, tools=True)
    assert decisions[-1].routed_text == question
