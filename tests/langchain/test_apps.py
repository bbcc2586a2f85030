"""``ChatTORouter`` inside the patterns users build: RAG chains, ``create_agent``, LangGraph streams.

Each token must reach a stream once, usage must be counted once, the routing options
must work wherever agents set them, and the router must read the user's question.
"""

from __future__ import annotations

import copy

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.callbacks import get_usage_metadata_callback
from langchain_core.load import dumpd, dumps, loads
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from pydantic import ValidationError

from helpers.langchain_experts import EXPERT_NAMES, ChatDown, rule_experts
from langchain_torouter import ChatRuleBased, ChatTORouter, route_on_input

CODE = "Write a Python function that checks whether a number is prime."
BIOMED = "What is the mechanism of action of warfarin?"
TRIVIA = "What is the capital of Japan?"
CONTEXT = " ".join(["The regional council approved the budget for road maintenance and street lighting."] * 40)


@pytest.fixture
def llm(router):
    return ChatTORouter(experts=rule_experts(), router=router, cost_weight=50.0)


def tool_experts():
    return {name: ChatRuleBased(model=name, tool_calling=name != "edge-small") for name in EXPERT_NAMES}


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


def counting(router):
    clone = copy.copy(router)
    clone.calls = 0
    predict = router.predict

    def counted(prompts):
        clone.calls += 1
        return predict(prompts)

    clone.predict = counted
    return clone


# --- RAG: route on the question, not the retrieved context --------------------------------------------------
@pytest.mark.parametrize("template", [
    [("system", "Answer the question using only this context:\n\n{context}"), ("human", "{question}")],
    [("human", "Answer the question based only on the following context:\n{context}\n\nQuestion: {question}")],
    [("human", "Context: {context}\n\nQuestion: {question}\nAnswer:")],
])
def test_prompt_llm_rag_chain_routes_on_the_question(llm, template):
    chain = ChatPromptTemplate.from_messages(template) | llm
    for question in (CODE, BIOMED, TRIVIA):
        routed = chain.invoke({"context": CONTEXT, "question": question}).response_metadata["torouter"]
        assert routed["expert"] == llm.route(question).expert


def test_route_on_input_routes_a_chain_on_a_key_of_its_input(llm):
    # A prompt with no question marker: the chain says which input key holds the question.
    prompt = ChatPromptTemplate.from_messages([("human", "{question}\n\nNotes you may use:\n{context}")])
    chain = route_on_input(prompt | llm, "question")
    for question in (CODE, BIOMED):
        message = chain.invoke({"context": CONTEXT, "question": question})
        assert message.response_metadata["torouter"]["expert"] == llm.route(question).expert
    chunks = list(chain.stream({"context": CONTEXT, "question": CODE}))
    assert chunks[0].response_metadata["torouter"]["expert"] == llm.route(CODE).expert
    with pytest.raises(KeyError, match="route_on_input: the input has no key 'query'"):
        route_on_input(prompt | llm, "query").invoke({"question": CODE, "context": ""})


# --- streams once, counts once ----------------------------------------------------------------------------------
def test_create_agent_streams_each_token_once_with_the_decision(router):
    llm = ChatTORouter(experts=rule_experts(), router=router, cost_weight=50.0)
    agent = create_agent(llm, tools=[])
    chunks = [chunk for chunk, meta in agent.stream({"messages": [HumanMessage(BIOMED)]}, stream_mode="messages")
              if isinstance(chunk, AIMessageChunk)]
    streamed = "".join(c.text for c in chunks)
    answer = ChatRuleBased(model="med-7b").invoke(BIOMED).content
    assert streamed == answer
    assert chunks[0].response_metadata["torouter"]["expert"] == "med-7b"


@pytest.mark.asyncio
async def test_astream_events_see_each_token_once(llm):
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | llm
    tokens, names = [], set()
    async for event in chain.astream_events({"q": TRIVIA}, version="v2"):
        if event["event"] == "on_chat_model_stream":
            tokens.append(event["data"]["chunk"].text)
            names.add(event["name"])
    assert names == {"ChatTORouter"}
    assert "".join(tokens) == ChatRuleBased(model="edge-small").invoke(TRIVIA).content


@pytest.mark.asyncio
async def test_async_agent_stream_once(router):
    agent = create_agent(ChatTORouter(experts=rule_experts(), router=router, cost_weight=50.0), tools=[])
    text = ""
    async for chunk, _ in agent.astream({"messages": [HumanMessage(CODE)]}, stream_mode="messages"):
        if isinstance(chunk, AIMessageChunk):
            text += chunk.text
    assert text == ChatRuleBased(model="code-7b").invoke(CODE).content


@pytest.mark.parametrize("mode", ["invoke", "stream"])
def test_usage_is_counted_once(llm, mode):
    with get_usage_metadata_callback() as usage:
        if mode == "invoke":
            message = llm.invoke(BIOMED)
        else:
            message = None
            for chunk in llm.stream(BIOMED):
                message = chunk if message is None else message + chunk
    (counted,) = usage.usage_metadata.values()
    assert counted["output_tokens"] == message.usage_metadata["output_tokens"] > 0


# --- run-time controls --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tools", [[], [multiply]])
def test_create_agent_model_settings_set_cost_weight_and_never_reach_experts(router, tools):
    llm = ChatTORouter(experts=tool_experts(), router=router, cost_weight=50.0)
    for weight, expected in ((0.0, "cloud-large"), (50.0, "med-7b")):
        @wrap_model_call
        def trade_off(request, handler, weight=weight):
            return handler(request.override(model_settings={"cost_weight": weight}))

        for agent in (create_agent(llm.bind(cost_weight=weight), tools=tools),
                      create_agent(llm, tools=tools, middleware=[trade_off])):
            messages = agent.invoke({"messages": [HumanMessage(BIOMED)]})["messages"]
            assert messages[-1].response_metadata["torouter"]["expert"] == expected
            assert messages[-1].response_metadata["torouter"]["cost_weight"] == weight


def test_routing_options_survive_bind_then_bind_tools_in_any_order(llm):
    tools = [multiply]
    expected = "cloud-large"
    for model in (llm.bind(cost_weight=0.0).bind_tools(tools), llm.bind_tools(tools, cost_weight=0.0),
                  llm.bind_tools(tools).bind(cost_weight=0.0)):
        assert model.invoke(BIOMED).response_metadata["torouter"]["expert"] == expected
    forced = llm.bind(expert="code-7b").bind_tools(tools)
    assert forced.invoke(BIOMED).response_metadata["torouter"]["expert"] == "code-7b"


def test_assignment_and_model_copy_take_effect(llm):
    assert llm.invoke(BIOMED).response_metadata["torouter"]["expert"] == "med-7b"
    llm.cost_weight = 0.0
    assert llm.invoke(BIOMED).response_metadata["torouter"]["expert"] == "cloud-large"
    assert llm._identifying_params["cost_weight"] == 0.0
    copied = llm.model_copy(update={"cost_weight": 50.0, "max_cost": 1e-3})
    routed = copied.invoke(BIOMED).response_metadata["torouter"]
    assert routed["cost_weight"] == 50.0 and "cloud-large" not in routed["ranking"]
    with pytest.raises(ValidationError):
        llm.cost_weight = -1.0
    with pytest.raises(ValidationError):
        llm.route_on = "everything"


# --- conventions ---------------------------------------------------------------------------------------------------
def test_profile_model_name_and_token_counts(router):
    experts = {name: ChatRuleBased(model=name, profile={"max_input_tokens": limit, "tool_calling": name != "a"})
               for name, limit in zip(EXPERT_NAMES, (8000, 32000, 128000, 4000))}
    llm = ChatTORouter(experts=experts, router=router)
    assert llm.profile == {"max_input_tokens": 4000, "tool_calling": True}
    assert llm.model_name == "torouter" and llm._get_ls_params()["ls_model_name"] == "torouter"
    assert llm.get_num_tokens(CODE) == len(CODE.split())
    assert llm.get_num_tokens_from_messages([HumanMessage(CODE)]) >= len(CODE.split())
    # The forced expert's tokenizer counts for a model bound to it.
    assert llm.with_routing(expert="med-7b")._counting_expert() is experts["med-7b"]
    assert ChatTORouter(experts={name: ChatDown() for name in EXPERT_NAMES}, router=router).profile is None


def test_experts_as_init_chat_model_strings(router, monkeypatch):
    import langchain.chat_models as chat_models

    built = []

    def fake_init_chat_model(model, **kwargs):
        built.append(model)
        return ChatRuleBased(model=model.split(":")[-1])

    monkeypatch.setattr(chat_models, "init_chat_model", fake_init_chat_model)
    experts = {name: f"openai:{name}" for name in EXPERT_NAMES}
    llm = ChatTORouter(experts=experts, router=router)
    assert built == [f"openai:{name}" for name in EXPERT_NAMES]
    assert llm.invoke(BIOMED).response_metadata["torouter"]["expert"] == "cloud-large"
    with pytest.raises(ValidationError, match="expert 'bad': init_chat_model"):
        monkeypatch.setattr(chat_models, "init_chat_model",
                            lambda model: fake_init_chat_model(model) if model.startswith("openai:")
                            else (_ for _ in ()).throw(ImportError("no pkg")))
        ChatTORouter(experts={**experts, "bad": "nowhere:model"}, router=router)


def test_serialisation_is_refused_clearly(llm):
    serialized = dumpd(llm)
    assert serialized["type"] == "not_implemented"
    with pytest.raises(NotImplementedError, match="ChatTORouter cannot be serialised"):
        loads(dumps(llm))
    assert not ChatTORouter.is_lc_serializable()


def test_requests_without_text_are_answered(router):
    image = {"type": "image", "base64": "iVBORw0KGgo=", "mime_type": "image/png"}
    llm = ChatTORouter(experts=rule_experts(), router=router, default_expert="edge-small")
    message = llm.invoke([HumanMessage(content=[image])])
    assert message.response_metadata["torouter"]["expert"] == "edge-small"
    # A system prompt alone is routed on.
    system = "Write a Python function that reverses a string."
    routed = llm.invoke([SystemMessage(system)])
    assert routed.response_metadata["torouter"]["expert"] == llm.route(system).expert


def test_agent_steps_reuse_one_decision(router):
    counted = counting(router)
    llm = ChatTORouter(experts=tool_experts(), router=counted, cost_weight=50.0)
    agent = create_agent(llm, tools=[multiply])
    messages = agent.invoke({"messages": [HumanMessage("Use the multiply tool to compute 12 times 7.")]})["messages"]
    model_turns = [m for m in messages if m.type == "ai"]
    assert len(model_turns) >= 2 and counted.calls == 1
    assert len({m.response_metadata["torouter"]["expert"] for m in model_turns}) == 1
    per_call = ChatTORouter(experts=tool_experts(), router=counted, cost_weight=50.0, sticky=False)
    before = counted.calls
    create_agent(per_call, tools=[multiply]).invoke(
        {"messages": [HumanMessage("Use the multiply tool to compute 12 times 7.")]})
    assert counted.calls - before == len(model_turns)


@pytest.mark.asyncio
async def test_streaming_from_an_expert_that_cannot_stream(router):
    from langchain_core.language_models import BaseChatModel

    class Whole(ChatRuleBased):
        _stream = BaseChatModel._stream
        _astream = BaseChatModel._astream

    experts = {name: Whole(model=name) for name in EXPERT_NAMES}
    llm = ChatTORouter(experts=experts, router=router, cost_weight=50.0)
    chunks = list(llm.stream(BIOMED))
    assert "".join(c.text for c in chunks) == ChatRuleBased(model="med-7b").invoke(BIOMED).content
    assert chunks[0].response_metadata["torouter"]["expert"] == "med-7b"
    achunks = [c async for c in llm.astream(BIOMED)]
    assert "".join(c.text for c in achunks) == "".join(c.text for c in chunks)
