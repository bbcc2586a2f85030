"""TORouterLLM's controls: usage counted once, settings that change at run time, serialization."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, Settings, VectorStoreIndex  # noqa: E402
from llama_index.core.agent.workflow import FunctionAgent  # noqa: E402
from llama_index.core.callbacks import CallbackManager, LlamaDebugHandler, TokenCountingHandler  # noqa: E402
from llama_index.core.embeddings import MockEmbedding  # noqa: E402
from llama_index.core.llms import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from llamaindex_torouter import METADATA_KEY, ExtractiveLLM, ExtractiveToolLLM, TORouterLLM  # noqa: E402

TRIVIA = "What is the capital of France?"
BIOMED = "What is the mechanism of action of metformin?"


def experts(callback_manager=None):
    kwargs = {} if callback_manager is None else {"callback_manager": callback_manager}
    return {
        "edge-small": ExtractiveLLM(name="edge-small", context_window=2048, **kwargs),
        "code-7b": ExtractiveToolLLM(name="code-7b", context_window=8192, **kwargs),
        "med-7b": ExtractiveLLM(name="med-7b", context_window=8192, **kwargs),
        "cloud-large": ExtractiveToolLLM(name="cloud-large", context_window=32768, **kwargs),
    }


def user(text):
    return [ChatMessage(role=MessageRole.USER, content=text)]


def counter():
    return TokenCountingHandler(tokenizer=str.split)  # offline: no tokenizer download


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


MULTIPLY = FunctionTool.from_defaults(multiply)


async def _collect(stream):
    return [chunk async for chunk in await stream]


CALLS = {
    "chat": lambda llm: llm.chat(user(TRIVIA)),
    "achat": lambda llm: asyncio.run(llm.achat(user(TRIVIA))),
    "stream_chat": lambda llm: list(llm.stream_chat(user(TRIVIA)))[-1],
    "astream_chat": lambda llm: asyncio.run(_collect(llm.astream_chat(user(TRIVIA))))[-1],
    "complete": lambda llm: llm.complete(TRIVIA),
    "astream_complete": lambda llm: asyncio.run(_collect(llm.astream_complete(TRIVIA)))[-1],
    "chat_with_tools": lambda llm: llm.chat_with_tools([MULTIPLY], user_msg="What is 6 multiplied by 7?"),
}


# ---- usage counted once ----------------------------------------------------------------------

@pytest.mark.parametrize("method", list(CALLS))
@pytest.mark.parametrize("setup", ["shared", "settings", "router_only", "experts_only"])
def test_a_routed_call_is_counted_once(router, method, setup):
    tokens = counter()
    manager = CallbackManager([tokens])
    saved = Settings._callback_manager
    try:
        if setup == "settings":  # LlamaIndex's documented set-up: every LLM built afterwards shares it
            Settings.callback_manager = manager
            llm = TORouterLLM(experts(), router)
        elif setup == "shared":
            llm = TORouterLLM(experts(manager), router, callback_manager=manager)
        elif setup == "router_only":
            llm = TORouterLLM(experts(CallbackManager([LlamaDebugHandler()])), router, callback_manager=manager)
        else:
            llm = TORouterLLM(experts(manager), router, callback_manager=CallbackManager([LlamaDebugHandler()]))
        response = CALLS[method](llm)
    finally:
        Settings._callback_manager = saved

    assert len(tokens.llm_token_counts) == 1, [e.prompt[:60] for e in tokens.llm_token_counts]
    counted = tokens.llm_token_counts[0]
    assert counted.completion_token_count > 0 and counted.prompt_token_count > 0
    assert counted.completion == str(response)  # the answer the caller got, counted once


@pytest.mark.parametrize("answered_by_listener", [True, False])
def test_a_handler_only_some_experts_have_is_told_once(router, answered_by_listener):
    tokens = counter()
    manager = CallbackManager([tokens])
    team = experts()
    chosen = TORouterLLM(experts(), router).route(user(BIOMED)).expert
    listener = chosen if answered_by_listener else next(n for n in team if n != chosen)
    team[listener] = type(team[listener])(name=listener, callback_manager=manager)
    llm = TORouterLLM(team, router, callback_manager=manager)
    llm.chat(user(BIOMED))
    assert len(tokens.llm_token_counts) == 1
    assert f"[{chosen}]" in tokens.llm_token_counts[0].completion


def test_a_query_engine_counts_each_llm_call_once(router):
    tokens = counter()
    saved = Settings._callback_manager
    try:
        Settings.callback_manager = CallbackManager([tokens])
        llm = TORouterLLM(experts(), router, cost_weight=40.0)
        docs = [Document(text="Nairobi is the capital of Kenya."), Document(text="Oslo is the capital of Norway.")]
        engine = VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8)).as_query_engine(
            llm=llm, similarity_top_k=2)
        engine.query("What is the capital of Kenya?")
    finally:
        Settings._callback_manager = saved
    assert len(tokens.llm_token_counts) == llm.controller.router_calls + llm.controller.cache_hits == 1


def test_the_callback_manager_stays_the_one_given(router):
    from llamaindex_torouter import RoutedCallbackManager

    manager = CallbackManager([counter()])
    llm = TORouterLLM(experts(), router, callback_manager=manager)
    assert isinstance(llm.callback_manager, RoutedCallbackManager) and llm.callback_manager.inner is manager
    extra = LlamaDebugHandler()
    llm.callback_manager.add_handler(extra)
    assert extra in manager.handlers
    other = CallbackManager([])
    llm.callback_manager = other  # what Settings.llm = llm does with Settings.callback_manager
    assert llm.callback_manager.inner is other


# ---- run-time controls ---------------------------------------------------------------------

def routing(response):
    return response.additional_kwargs[METADATA_KEY]


def test_cost_weight_and_max_cost_assigned_after_construction_take_effect(router):
    llm = TORouterLLM(experts(), router)
    assert routing(llm.chat(user(BIOMED)))["expert"] == "cloud-large"
    llm.cost_weight = 1e4
    assert llm.controller.cost_weight == 1e4
    assert routing(llm.chat(user(BIOMED)))["expert"] == "edge-small"
    llm.cost_weight = 0.0
    llm.max_cost = 5e-4
    budget = routing(llm.chat(user(BIOMED)))
    assert budget["expert"] == "med-7b" and "cloud-large" not in budget["ranking"]
    llm.max_cost = None
    assert routing(llm.chat(user(BIOMED)))["expert"] == "cloud-large"


@pytest.mark.parametrize("name, value, match", [
    ("cost_weight", -1.0, "cost_weight must be a finite number >= 0"),
    ("cost_weight", float("nan"), "cost_weight must be a finite number >= 0"),
    ("max_cost", -0.1, "max_cost must be a number >= 0"),
    ("route_on", "everything", "route_on must be one of"),
    ("default_expert", "gpt-x", "default_expert='gpt-x' is not one of the experts"),
    ("allowed", ["gpt-x"], "allowed names unknown experts"),
    ("allowed", [], "at least one expert"),
    ("sticky", "yes", "sticky must be True or False"),
    ("fallbacks", 1, "fallbacks must be True or False"),
])
def test_bad_assignments_are_refused_and_change_nothing(router, name, value, match):
    llm = TORouterLLM(experts(), router)
    before = getattr(llm, name)
    with pytest.raises(ValueError, match=match):
        setattr(llm, name, value)
    assert getattr(llm, name) == before


def test_route_on_default_expert_sticky_and_allowed_can_change(router):
    llm = TORouterLLM(experts(), router)
    follow_up = user(BIOMED) + [ChatMessage(role=MessageRole.ASSISTANT, content="It lowers glucose."),
                                ChatMessage(role=MessageRole.USER, content="And its side effects?")]
    assert llm.route(follow_up).routed_text == "And its side effects?"
    llm.route_on = "recent_user"
    assert llm.route(follow_up).routed_text == f"{BIOMED}\nAnd its side effects?"
    llm.route_on = lambda prompt: "custom text"
    assert llm.route(follow_up).routed_text == "custom text"

    llm.default_expert = "code-7b"
    assert routing(llm.complete("   "))["expert"] == "code-7b"

    calls = llm.controller.router_calls
    llm.route_on = "last_user"
    llm.route(user(TRIVIA)), llm.route(user(TRIVIA))
    assert llm.controller.router_calls == calls + 1  # sticky: the repeat came from the cache
    llm.sticky = False
    llm.route(user(TRIVIA)), llm.route(user(TRIVIA))
    assert llm.controller.router_calls == calls + 3

    llm.allowed = ["edge-small", "med-7b"]
    assert set(llm.route(user(BIOMED), allowed=llm.allowed).ranking) == {"edge-small", "med-7b"}
    assert set(routing(llm.chat(user(BIOMED)))["ranking"]) == {"edge-small", "med-7b"}
    assert llm.metadata.is_function_calling_model is False


def test_route_on_accepts_recent_user_and_a_callable_at_construction(router):
    seen = []

    def last_words(prompt):
        seen.append(prompt)
        return prompt[-1]["content"].split()[-1]

    llm = TORouterLLM(experts(), router, route_on=last_words)
    assert llm.route(user(TRIVIA)).routed_text == "France?"
    assert seen == [[{"role": "user", "content": TRIVIA}]]
    assert "<callable" in llm.to_json() and "last_words" in llm.to_json()
    assert TORouterLLM(experts(), router, route_on="recent_user").route_on == "recent_user"


@pytest.mark.parametrize("method", list(CALLS))
def test_per_call_expert_cost_weight_and_max_cost(router, method):
    llm = TORouterLLM(experts(), router)
    call = CALLS[method]
    tools = method == "chat_with_tools"

    with llm.routing_options(cost_weight=1e4):
        assert routing(call(llm))["expert"] == ("code-7b" if tools else "edge-small")
    with llm.routing_options(max_cost=5e-4):
        assert "cloud-large" not in routing(call(llm))["ranking"]
    with llm.routing_options(expert="cloud-large"):
        meta = routing(call(llm))
        assert meta["expert"] == "cloud-large" and meta["forced"] is True
    assert routing(call(llm))["forced"] is False  # the block is over


def test_call_arguments_win_over_routing_options_and_blocks_nest(router):
    llm = TORouterLLM(experts(), router)
    with llm.routing_options(cost_weight=1e4):
        assert routing(llm.chat(user(BIOMED), cost_weight=0.0))["expert"] == "cloud-large"
        with llm.routing_options(expert="med-7b"):
            meta = routing(llm.chat(user(BIOMED)))
            assert meta["expert"] == "med-7b" and meta["cost_weight"] == 1e4
    with pytest.raises(ValueError, match="unknown expert 'gpt-x'"):
        with llm.routing_options(expert="gpt-x"):
            pass
    with pytest.raises(ValueError, match="cost_weight"):
        with llm.routing_options(cost_weight=-2):
            pass


@pytest.mark.asyncio
async def test_routing_options_reach_every_step_of_an_agent_run(router):
    llm = TORouterLLM(experts(), router)
    with llm.routing_options(expert="code-7b"):
        handler = FunctionAgent(tools=[MULTIPLY], llm=llm).run("What is 6 multiplied by 7?")
    result = await handler
    assert str(result) == "[code-7b] 42"
    assert result.response.additional_kwargs[METADATA_KEY]["forced"] is True


def test_routing_options_apply_inside_a_query_engine(router):
    llm = TORouterLLM(experts(), router)
    docs = [Document(text="Metformin lowers blood glucose by reducing hepatic glucose production.")]
    engine = VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8)).as_query_engine(llm=llm)
    assert str(engine.query(BIOMED)).startswith("[cloud-large] ")
    with llm.routing_options(cost_weight=40.0):
        assert str(engine.query(BIOMED)).startswith("[med-7b] ")


# ---- serialization ------------------------------------------------------------------------

def test_settings_round_trip_through_json_with_the_experts_and_router_given_again(router):
    llm = TORouterLLM(experts(), router, cost_weight=40.0, max_cost=1e-3, route_on="recent_user",
                      default_expert="med-7b", sticky=False, fallbacks=False, allowed=["edge-small", "med-7b"])
    text = llm.to_json()
    assert json.loads(text)["class_name"] == "TORouterLLM"
    again = TORouterLLM.from_json(text, experts=experts(), router=router)
    for name in ("cost_weight", "max_cost", "route_on", "default_expert", "sticky", "fallbacks", "allowed"):
        assert getattr(again, name) == getattr(llm, name), name
    assert again.controller.cache_size == 0 and again.controller.max_cost == 1e-3
    assert again.route(user(BIOMED)).ranking == llm.route(user(BIOMED), allowed=llm.allowed).ranking
    assert TORouterLLM.from_dict(llm.to_dict(), experts=experts(), router=router).to_dict() == llm.to_dict()


def test_rebuilding_without_the_experts_or_router_is_a_clear_error(router):
    text = TORouterLLM(experts(), router).to_json()
    with pytest.raises(ValueError, match="need experts and router as keyword arguments"):
        TORouterLLM.from_json(text)
    with pytest.raises(ValueError, match="need router as keyword arguments"):
        TORouterLLM.from_dict(json.loads(text), experts=experts())
    with pytest.raises(ValueError, match="settings are for 'OpenAI'"):
        TORouterLLM.from_dict({"class_name": "OpenAI"}, experts=experts(), router=router)
    custom = TORouterLLM(experts(), router, route_on=lambda prompt: "x").to_json()
    with pytest.raises(ValueError, match="route_on was the callable"):
        TORouterLLM.from_json(custom, experts=experts(), router=router)
    assert TORouterLLM.from_json(custom, experts=experts(), router=router, route_on="last_user").route_on == "last_user"
