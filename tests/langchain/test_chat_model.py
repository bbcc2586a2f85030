"""``ChatTORouter``: routing, metadata, streaming, async, batch, tools, fallbacks, tracing and bad input."""

from __future__ import annotations

import asyncio
import copy
import time

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel, Field, SecretStr, ValidationError

from helpers.langchain_experts import (
    EXPERT_NAMES,
    ChatDown,
    OutageError,
    RunRecorder,
    rule_experts,
)
from langchain_torouter import ChatRuleBased, ChatTORouter, TORouterRunnable
from torouter import AllExpertsFailed

CODE = "Write a Python function that checks whether a number is prime."
BIOMED = "What is the mechanism of action of warfarin?"
TRIVIA = "What is the capital of Japan?"
MATH = "A train travels 60 km in 2 hours. What is its average speed in km per hour?"


@pytest.fixture
def llm(router):
    return ChatTORouter(experts=rule_experts(), router=router, cost_weight=50.0)


def counting(router):
    """A copy of ``router`` that counts its ``predict`` calls (and can be slowed down)."""
    clone = copy.copy(router)
    clone.calls, clone.delay = 0, 0.0
    predict = router.predict

    def counted(prompts):
        clone.calls += 1
        time.sleep(clone.delay)
        return predict(prompts)

    clone.predict = counted
    return clone


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Verdict(BaseModel):
    """A yes/no verdict with a reason."""

    verdict: str = Field(description="yes or no")
    reason: str


# --- routing and the decision ------------------------------------------------------------
def test_invoke_routes_by_domain_and_reports_the_decision(llm):
    expected = {CODE: "code-7b", BIOMED: "med-7b", TRIVIA: "edge-small", MATH: "cloud-large"}
    for prompt, expert in expected.items():
        message = llm.invoke(prompt)
        routed = message.response_metadata["torouter"]
        assert routed["expert"] == routed["chosen"] == expert
        assert set(routed["scores"]) == set(EXPERT_NAMES)
        assert routed["cost_weight"] == 50.0
        assert routed["ranking"][0] == expert and sorted(routed["ranking"]) == sorted(EXPERT_NAMES)
        assert routed["fallback"] is False and routed["forced"] is False
        assert message.response_metadata["model_name"] == expert
        assert message.usage_metadata["output_tokens"] == len(message.content.split())


def test_cost_weight_and_max_cost_steer_the_choice(llm, router):
    assert llm.invoke(BIOMED).response_metadata["torouter"]["expert"] == "med-7b"
    assert llm.invoke(BIOMED, cost_weight=0.0).response_metadata["torouter"]["expert"] == "cloud-large"
    assert llm.invoke(CODE, cost_weight=1e6).response_metadata["torouter"]["expert"] == "edge-small"
    cheap = ChatTORouter(experts=rule_experts(), router=router, max_cost=1e-3)
    assert "cloud-large" not in cheap.invoke(MATH).response_metadata["torouter"]["ranking"]
    bound = llm.bind(cost_weight=0.0)
    assert bound.invoke(BIOMED).response_metadata["torouter"]["expert"] == "cloud-large"


def test_model_override_forces_an_expert(llm):
    message = llm.invoke(CODE, expert="med-7b")
    routed = message.response_metadata["torouter"]
    assert (routed["expert"], routed["forced"], routed["ranking"]) == ("med-7b", True, ["med-7b"])
    assert message.response_metadata["model_name"] == "med-7b"
    with pytest.raises(ValueError, match="expert='gpt-5' is not one of the experts"):
        llm.invoke(CODE, expert="gpt-5")
    # model= is the deprecated alias of expert=.
    with pytest.warns(DeprecationWarning, match="use expert="):
        old = llm.invoke(CODE, model="med-7b")
    assert old.response_metadata["torouter"]["expert"] == "med-7b"
    with pytest.raises(ValueError, match="name different experts"):
        llm.invoke(CODE, expert="med-7b", model="code-7b")


def test_route_on_picks_the_text_the_router_reads(router):
    conversation = [SystemMessage("You answer questions about drugs."), HumanMessage(BIOMED),
                    AIMessage("It inhibits vitamin K epoxide reductase."), HumanMessage(CODE)]
    default = ChatTORouter(experts=rule_experts(), router=router)
    assert default.route_on == "last_user"
    assert default.route(conversation).routed_text == CODE
    whole = ChatTORouter(experts=rule_experts(), router=router, route_on="conversation")
    assert whole.route(conversation).routed_text == "\n".join(["You answer questions about drugs.", BIOMED, CODE])


def test_stop_temperature_and_max_tokens_reach_the_expert(router):
    llm = ChatTORouter(experts=rule_experts(), router=router, max_tokens=2, temperature=0.0)
    message = llm.invoke("What is 2 + 2?")
    assert message.content == "The answer "
    assert message.response_metadata["finish_reason"] == "length"
    assert llm.invoke("What is 2 + 2?", stop=["answer"]).content == "The "
    assert ChatTORouter(experts=rule_experts(), router=router, stop=[" is"]).invoke("What is 2 + 2?").content \
        == "The answer"
    assert llm._get_ls_params(model="code-7b")["ls_model_name"] == "code-7b"
    assert llm._get_ls_params()["ls_max_tokens"] == 2


# --- streaming, async, batch ------------------------------------------------------------------
def test_stream_yields_the_experts_tokens_with_the_decision_first(llm):
    chunks = list(llm.stream(BIOMED))
    assert len(chunks) > 5
    assert chunks[0].response_metadata["torouter"]["expert"] == "med-7b"
    assert all("torouter" not in c.response_metadata for c in chunks[1:])
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    invoked = llm.invoke(BIOMED)
    assert full.content == invoked.content
    assert full.usage_metadata == invoked.usage_metadata
    assert full.response_metadata["model_name"] == "med-7b"
    assert chunks[-1].chunk_position == "last"


def test_model_name_is_added_when_a_streaming_expert_sends_none(router):
    class Quiet(ChatRuleBased):
        def _stream(self, *args, **kwargs):
            for chunk in super()._stream(*args, **kwargs):
                chunk.message.response_metadata = {}
                yield chunk

    experts = {**rule_experts(), "med-7b": Quiet(model="quiet-med")}
    full = None
    for chunk in ChatTORouter(experts=experts, router=router, cost_weight=50.0).stream(BIOMED):
        full = chunk if full is None else full + chunk
    assert full.response_metadata["model_name"] == "quiet-med"


@pytest.mark.asyncio
async def test_async_paths_match_the_sync_ones(llm):
    message = await llm.ainvoke(CODE)
    assert message.content == llm.invoke(CODE).content
    assert message.response_metadata["torouter"]["expert"] == "code-7b"
    chunks = [chunk async for chunk in llm.astream(CODE)]
    assert len(chunks) > 5 and chunks[0].response_metadata["torouter"]["expert"] == "code-7b"
    assert "".join(c.content for c in chunks) == message.content
    batch = await llm.abatch([CODE, TRIVIA])
    assert [m.response_metadata["torouter"]["expert"] for m in batch] == ["code-7b", "edge-small"]


@pytest.mark.asyncio
async def test_async_routing_does_not_block_the_event_loop(router):
    slow = counting(router)
    slow.delay = 0.3
    llm = ChatTORouter(experts=rule_experts(), router=slow, cost_weight=50.0, sticky=False)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await llm.ainvoke(TRIVIA)
    [chunk async for chunk in llm.astream(TRIVIA)]
    await llm.abatch([TRIVIA, CODE])
    task.cancel()
    # Three 0.3 s router calls: a free loop ticks ~90 times; a blocked one barely at all.
    assert slow.calls == 3
    assert ticks >= 30


def test_batch_routes_the_whole_batch_in_one_router_call(router):
    counted = counting(router)
    llm = ChatTORouter(experts=rule_experts(), router=counted, cost_weight=50.0)
    prompts = [CODE, BIOMED, TRIVIA, MATH]
    messages = llm.batch(prompts)
    assert counted.calls == 1
    assert [m.response_metadata["torouter"]["expert"] for m in messages] == \
        ["code-7b", "med-7b", "edge-small", "cloud-large"]
    assert [m.content for m in messages] == [llm.invoke(p).content for p in prompts]
    forced = llm.batch(prompts[:2], expert="edge-small")
    assert [m.response_metadata["torouter"]["expert"] for m in forced] == ["edge-small", "edge-small"]


def test_batch_with_a_bad_input_fails_only_that_input(llm):
    results = llm.batch([CODE, []], return_exceptions=True)
    assert results[0].response_metadata["torouter"]["expert"] == "code-7b"
    assert isinstance(results[1], ValueError) and "empty message list" in str(results[1])
    with pytest.raises(ValueError, match="empty message list"):
        llm.batch([CODE, []])


def test_streaming_flag_makes_invoke_stream(router):
    recorder = RunRecorder()
    llm = ChatTORouter(experts=rule_experts(), router=router, cost_weight=50.0, streaming=True)
    message = llm.invoke(BIOMED, config={"callbacks": [recorder]})
    router_run = recorder.chat_runs()[0]["run_id"]
    tokens = [t for run_id, t in recorder.tokens if run_id == router_run]
    assert "".join(tokens) == message.content and len(tokens) > 5
    assert message.response_metadata["torouter"]["expert"] == "med-7b"


# --- callbacks and tracing -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["invoke", "stream", "batch", "chain", "chain_stream"])
def test_the_experts_call_is_a_child_run_carrying_the_decision(llm, mode):
    recorder = RunRecorder()
    config = {"callbacks": [recorder]}
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | llm
    if mode == "invoke":
        llm.invoke(BIOMED, config=config)
    elif mode == "stream":
        list(llm.stream(BIOMED, config=config))
    elif mode == "batch":
        llm.batch([BIOMED], config=config)
    elif mode == "chain":
        chain.invoke({"q": BIOMED}, config=config)
    else:
        list(chain.stream({"q": BIOMED}, config=config))
    parent, child = recorder.chat_runs()
    assert parent["name"] == "ChatTORouter" and child["name"] == "ChatRuleBased"
    assert child["parent_run_id"] == parent["run_id"]
    assert child["metadata"]["torouter"]["expert"] == "med-7b"
    assert child["metadata"]["torouter"]["ranking"][0] == "med-7b"
    assert "torouter:med-7b" in child["tags"]
    assert not any(t.startswith("seq:step") for t in child["tags"])
    if mode.startswith("chain"):
        chain_run = next(r for r in recorder.runs if r["name"] == "RunnableSequence")
        assert parent["parent_run_id"] == chain_run["run_id"]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["ainvoke", "astream"])
async def test_async_calls_are_child_runs_too(llm, mode):
    recorder = RunRecorder()
    if mode == "ainvoke":
        await llm.ainvoke(CODE, config={"callbacks": [recorder]})
    else:
        [c async for c in llm.astream(CODE, config={"callbacks": [recorder]})]
    parent, child = recorder.chat_runs()
    assert child["parent_run_id"] == parent["run_id"]
    assert child["metadata"]["torouter"]["expert"] == "code-7b"


# --- fallbacks ---------------------------------------------------------------------------------------
def experts_with_cloud_down(**params):
    down = ChatDown(label="cloud-large", **params)
    return {**rule_experts(), "cloud-large": down}, down


def test_a_failing_expert_falls_back_to_the_next_in_the_ranking(router):
    experts, down = experts_with_cloud_down()
    llm = ChatTORouter(experts=experts, router=router)  # cost_weight 0: cloud-large is chosen
    message = llm.invoke(BIOMED)
    routed = message.response_metadata["torouter"]
    assert routed["chosen"] == "cloud-large" and routed["expert"] == routed["ranking"][1]
    assert routed["fallback"] is True
    assert routed["failures"] == {"cloud-large": "OutageError: cloud-large is unreachable"}
    assert message.response_metadata["model_name"] == routed["expert"]
    assert down.calls == 1


def test_stream_falls_back_before_the_first_chunk_only(router):
    experts, _ = experts_with_cloud_down()
    chunks = list(ChatTORouter(experts=experts, router=router).stream(BIOMED))
    routed = chunks[0].response_metadata["torouter"]
    assert routed["fallback"] is True and routed["chosen"] == "cloud-large"
    assert "".join(c.content for c in chunks) == ChatRuleBased().invoke(BIOMED).content
    experts, _ = experts_with_cloud_down(good_chunks=2)
    got = []
    with pytest.raises(OutageError, match="dropped the stream"):
        for chunk in ChatTORouter(experts=experts, router=router).stream(BIOMED):
            got.append(chunk.content)
    assert got[:2] == ["part0 ", "part1 "]  # tokens already sent cannot be taken back


@pytest.mark.asyncio
async def test_async_fallbacks(router):
    experts, _ = experts_with_cloud_down()
    llm = ChatTORouter(experts=experts, router=router)
    assert (await llm.ainvoke(BIOMED)).response_metadata["torouter"]["fallback"] is True
    chunks = [c async for c in llm.astream(BIOMED)]
    assert chunks[0].response_metadata["torouter"]["failures"] == {
        "cloud-large": "OutageError: cloud-large dropped the stream"}


def test_fallbacks_off_raises_the_experts_own_error(router):
    experts, _ = experts_with_cloud_down()
    llm = ChatTORouter(experts=experts, router=router, fallbacks=False)
    with pytest.raises(OutageError, match="cloud-large is unreachable"):
        llm.invoke(BIOMED)
    with pytest.raises(OutageError):
        list(llm.stream(BIOMED))


def test_when_every_expert_fails_the_error_names_each_failure(router):
    experts = {name: ChatDown(label=name) for name in EXPERT_NAMES}
    llm = ChatTORouter(experts=experts, router=router)
    with pytest.raises(AllExpertsFailed) as failed:
        llm.invoke(BIOMED)
    assert set(failed.value.failures) == set(EXPERT_NAMES)
    for name in EXPERT_NAMES:
        assert f"{name}: OutageError: {name} is unreachable" in str(failed.value)


# --- tools and structured output -----------------------------------------------------------------------
def test_bind_tools_routes_only_among_experts_that_support_tools(router):
    experts = {**rule_experts(), "cloud-large": ChatRuleBased(model="cloud-large", tool_calling=False),
               "edge-small": ChatDown(label="edge-small")}  # no bind_tools at all
    llm = ChatTORouter(experts=experts, router=router)
    with_tools = llm.bind_tools([add])
    assert [t["function"]["name"] for t in with_tools.kwargs["tools"]] == ["add"]  # inspectable, as usual
    message = with_tools.invoke("Use the add tool: what is 3 + 4?")
    routed = message.response_metadata["torouter"]
    assert sorted(routed["ranking"]) == ["code-7b", "med-7b"]
    assert message.tool_calls[0]["args"] == {"a": 3, "b": 4}
    full = None
    for chunk in with_tools.stream("Use the add tool: what is 3 + 4?"):
        full = chunk if full is None else full + chunk
    assert full.tool_calls[0]["args"] == {"a": 3, "b": 4}
    with pytest.raises(ValueError, match="expert 'cloud-large' cannot take this request"):
        with_tools.invoke("3 + 4", expert="cloud-large")
    assert llm.invoke(BIOMED).response_metadata["torouter"]["ranking"][0] == "cloud-large"  # unbound: all


def test_bind_tools_with_no_capable_expert_is_an_error(router):
    experts = {name: ChatRuleBased(model=name, tool_calling=False) for name in EXPERT_NAMES}
    with pytest.raises(ValueError, match="no expert can take these tools"):
        ChatTORouter(experts=experts, router=router).bind_tools([add])


def test_structured_output_skips_incapable_experts(router):
    experts = {**rule_experts(), "cloud-large": ChatRuleBased(model="cloud-large", tool_calling=False)}
    structured = ChatTORouter(experts=experts, router=router).with_structured_output(Verdict)
    assert isinstance(structured, TORouterRunnable)
    assert sorted(structured.runnables) == ["code-7b", "edge-small", "med-7b"]
    result = structured.invoke("Is 'yes' the verdict, because 'it compiles'?")
    assert result == Verdict(verdict="yes", reason="it compiles")
    raw = ChatTORouter(experts=experts, router=router).with_structured_output(Verdict, include_raw=True)
    out = raw.invoke("Is 'no' the verdict, because 'it fails'?")
    assert out["parsed"] == Verdict(verdict="no", reason="it fails")
    assert out["raw"].response_metadata["torouter"]["expert"] != "cloud-large"


def test_structured_output_runs(llm):
    recorder = RunRecorder()
    result = llm.with_structured_output(Verdict).invoke("Is 'yes' right, because 'tests pass'?",
                                                        config={"callbacks": [recorder]})
    assert result == Verdict(verdict="yes", reason="tests pass")
    (chat,) = recorder.chat_runs()
    assert chat["options"]["ls_structured_output_format"]["schema"] == convert_to_json_schema(Verdict)
    assert chat["metadata"]["torouter"]["expert"] in EXPERT_NAMES
    chunks = list(llm.with_structured_output(Verdict).stream("Is 'yes' right, because 'tests pass'?"))
    assert chunks[-1] == result


# --- bad input and construction -----------------------------------------------------------------------------
def test_bad_messages_route_on_whatever_text_there_is(llm, router):
    with pytest.raises(ValueError, match="empty message list"):
        llm.invoke([])
    # No user text: the system text is routed on.
    assert llm.route([SystemMessage(BIOMED)]).routed_text == BIOMED
    conversation = ChatTORouter(experts=rule_experts(), router=router, route_on="conversation")
    assert conversation.route([SystemMessage(BIOMED)]).routed_text == BIOMED
    image = {"type": "image", "base64": "iVBORw0KGgo=", "mime_type": "image/png"}
    mixed = HumanMessage(content=[{"type": "text", "text": TRIVIA}, image])
    assert llm.route([mixed]).routed_text == TRIVIA
    assert llm.invoke([mixed]).response_metadata["torouter"]["expert"] == "edge-small"
    # No text at all: answered all the same, by the router's pick for the empty text.
    assert llm.invoke([HumanMessage(content=[image])]).response_metadata["torouter"]["expert"] in EXPERT_NAMES


def test_expert_names_must_match_the_routers(router):
    experts = rule_experts()
    experts["gpt-5"] = experts.pop("cloud-large")
    with pytest.raises(ValueError, match=r"unknown to the router: \['gpt-5'\]; missing .*\['cloud-large'\]"):
        ChatTORouter(experts=experts, router=router)


def test_construction_errors_are_clear(router, tmp_path):
    with pytest.raises(ValueError, match="expert 'code-7b' is a RunnableLambda, not a LangChain chat model"):
        ChatTORouter(experts={**rule_experts(), "code-7b": RunnableLambda(lambda x: x)}, router=router)
    with pytest.raises(ValueError, match="router must be a fitted torouter Router"):
        ChatTORouter(experts=rule_experts(), router=42)
    with pytest.raises(ValueError, match="not a router directory"):
        ChatTORouter(experts=rule_experts(), router=tmp_path / "missing")
    with pytest.raises(ValidationError, match="cost_weight"):
        ChatTORouter(experts=rule_experts(), router=router, cost_weight=-1)
    with pytest.raises(ValidationError, match="route_on"):
        ChatTORouter(experts=rule_experts(), router=router, route_on="everything")
    with pytest.raises(ValidationError, match="api_key"):
        ChatTORouter(experts=rule_experts(), router=router, api_key="sk-test")  # extra fields are rejected


def test_a_saved_router_directory_works(router, tmp_path):
    router.save(tmp_path / "router")
    llm = ChatTORouter(experts=rule_experts(), router=str(tmp_path / "router"), cost_weight=50.0)
    assert llm.invoke(CODE).response_metadata["torouter"]["expert"] == "code-7b"


def test_expert_secrets_stay_out_of_reprs(router):
    class KeyedChat(ChatRuleBased):
        api_key: SecretStr

    experts = {**rule_experts(), "cloud-large": KeyedChat(model="cloud-large", api_key="sk-very-secret")}
    llm = ChatTORouter(experts=experts, router=router)
    assert "sk-very-secret" not in repr(llm) and "sk-very-secret" not in str(llm._identifying_params)
