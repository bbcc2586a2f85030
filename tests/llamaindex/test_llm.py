"""TORouterLLM as a LlamaIndex LLM: delegation, routing options, fallbacks, tools, events, bad input."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.base import BaseLLM  # noqa: E402
from llama_index.core.base.llms.types import ChatResponse, ImageBlock, TextBlock  # noqa: E402
from llama_index.core.bridge.pydantic import Field  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.llms import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.llms.function_calling import FunctionCallingLLM  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from llamaindex_torouter import (  # noqa: E402
    METADATA_KEY,
    ExpertFallbackEvent,
    ExpertUnavailableError,
    ExtractiveLLM,
    ExtractiveToolLLM,
    RoutingDecisionEvent,
    TORouterLLM,
)
from torouter import AllExpertsFailed  # noqa: E402

TRIVIA = "What is the capital of France?"
BIOMED = "What is the mechanism of action of metformin?"
TOOL_EXPERTS = {"code-7b", "cloud-large"}
IMAGE = ImageBlock(image=b"\x89PNG", image_mimetype="image/png")


def make_experts(**flags):
    """Fresh local experts named after the synthetic ones; code-7b and cloud-large call tools."""
    return {
        "edge-small": ExtractiveLLM(name="edge-small", context_window=2048, **flags),
        "code-7b": ExtractiveToolLLM(name="code-7b", context_window=8192, **flags),
        "med-7b": ExtractiveLLM(name="med-7b", context_window=8192, **flags),
        "cloud-large": ExtractiveToolLLM(name="cloud-large", context_window=32768, **flags),
    }


@pytest.fixture
def experts():
    return make_experts()


@pytest.fixture
def llm(experts, router):
    return TORouterLLM(experts, router)


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, content=text)]


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


MULTIPLY = FunctionTool.from_defaults(multiply)


class Recorder(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event, **kwargs):
        if isinstance(event, (RoutingDecisionEvent, ExpertFallbackEvent)):
            self.events.append(event)


@pytest.fixture
def recorder():
    handler = Recorder()
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


# ---- calling every method the same way ---------------------------------------------------

SYNC = ("chat", "complete", "stream_chat", "stream_complete")
ASYNC = ("achat", "acomplete", "astream_chat", "astream_complete")


async def _collect(stream):
    return [chunk async for chunk in await stream]


def invoke(llm, method: str, text: str, **kwargs):
    """Call ``method`` with ``text``; returns the final text and every response object."""
    arg = user(text) if "chat" in method else text
    call = getattr(llm, method)
    if method.startswith("a"):
        if "stream" in method:
            responses = asyncio.run(_collect(call(arg, **kwargs)))
        else:
            responses = [asyncio.run(call(arg, **kwargs))]
    else:
        result = call(arg, **kwargs)
        responses = list(result) if "stream" in method else [result]
    last = responses[-1]
    final = last.message.content if isinstance(last, ChatResponse) else last.text
    return final, responses


def routing(response) -> dict:
    return response.additional_kwargs[METADATA_KEY]


# ---- the LlamaIndex contract ---------------------------------------------------------------

def test_is_a_llamaindex_function_calling_llm():
    names = [b.__name__ for b in TORouterLLM.__mro__]
    assert BaseLLM.__name__ in names
    assert FunctionCallingLLM.__name__ in names
    assert TORouterLLM.class_name() == "TORouterLLM"


def test_metadata_reflects_the_experts_in_play(experts, router):
    llm = TORouterLLM(experts, router)
    meta = llm.metadata
    assert meta.context_window == 2048  # edge-small's, the smallest
    assert meta.num_output == 256
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is True
    assert all(name in meta.model_name for name in experts)

    narrowed = TORouterLLM(experts, router, allowed=["code-7b", "cloud-large"])
    assert narrowed.metadata.context_window == 8192
    assert narrowed.to_payload()["experts"] == ["code-7b", "cloud-large"]

    no_tools = TORouterLLM(experts, router, allowed=["edge-small", "med-7b"])
    assert no_tools.metadata.is_function_calling_model is False


def test_loads_a_saved_router_directory(experts, router, tmp_path):
    router.save(tmp_path / "router")
    from_dir = TORouterLLM(experts, str(tmp_path / "router"), cost_weight=40.0)
    from_obj = TORouterLLM(experts, router, cost_weight=40.0)
    for text in (TRIVIA, BIOMED, "Write a Python function that reverses a string."):
        assert from_dir.route(user(text)).ranking == from_obj.route(user(text)).ranking


@pytest.mark.parametrize("change, error, match", [
    (lambda e: e.update({"gpt-x": ExtractiveLLM(name="gpt-x")}), ValueError, "unknown to the router.*gpt-x"),
    (lambda e: e.pop("med-7b"), ValueError, "missing for the router's experts.*med-7b"),
    (lambda e: e.update({"med-7b": "not an llm"}), TypeError, "'med-7b' must be a llama_index LLM"),
    (lambda e: e.clear(), ValueError, "non-empty dict"),
])
def test_expert_names_and_types_are_checked_at_construction(router, change, error, match):
    experts = make_experts()
    change(experts)
    with pytest.raises(error, match=match):
        TORouterLLM(experts, router)


@pytest.mark.parametrize("kwargs, match", [
    ({"allowed": ["nope"]}, "unknown experts"),
    ({"allowed": []}, "at least one expert"),
    ({"route_on": "everything"}, "route_on"),
    ({"cost_weight": -1.0}, "cost_weight"),
])
def test_bad_settings_are_rejected(experts, router, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TORouterLLM(experts, router, **kwargs)


def test_reprs_and_payloads_hold_no_expert_secrets(router):
    class KeyedLLM(ExtractiveLLM):
        api_key: str = Field(default="", exclude=True)

    experts = make_experts()
    experts["cloud-large"] = KeyedLLM(name="cloud-large", api_key="sk-test-secret-123")
    llm = TORouterLLM(experts, router)
    for text in (repr(llm), str(llm), llm.to_json(), str(llm.to_payload())):
        assert "sk-test-secret-123" not in text
    assert "cloud-large" in str(llm.to_payload())


# ---- delegation ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", SYNC + ASYNC)
def test_every_method_delegates_to_the_routed_expert(llm, experts, method):
    decision = llm.route(user(TRIVIA))
    final, responses = invoke(llm, method, TRIVIA)

    assert final.startswith(f"[{decision.expert}] ")
    for response in responses:
        meta = routing(response)
        assert meta["expert"] == meta["chosen"] == decision.expert
        assert meta["ranking"] == decision.ranking
        assert set(meta["scores"]) == set(experts)
        assert meta["fallback"] is False and meta["failures"] == {}
    if "stream" in method:
        assert len(responses) > 1
        assert "".join(r.delta for r in responses) == final
    called = experts[decision.expert].calls
    assert called, "the chosen expert was not called"
    if method.startswith("a"):
        assert all(c.startswith("a") for c in called), f"async call reached sync methods: {called}"
    for name, expert in experts.items():
        if name != decision.expert:
            assert expert.calls == []


def test_per_call_cost_weight_and_max_cost(llm):
    assert routing(llm.chat(user(BIOMED)))["expert"] == "cloud-large"  # cost-blind: the strongest

    cheap = routing(llm.chat(user(BIOMED), cost_weight=1e4))
    assert cheap["expert"] == "edge-small" and cheap["cost_weight"] == 1e4

    budget = routing(llm.chat(user(BIOMED), max_cost=5e-4))
    assert budget["expert"] == "med-7b" and budget["max_cost"] == 5e-4
    assert "cloud-large" not in budget["ranking"]


def test_default_cost_weight_trades_quality_for_price(experts, router):
    llm = TORouterLLM(experts, router, cost_weight=40.0)
    assert routing(llm.chat(user(BIOMED)))["expert"] == "med-7b"
    assert routing(llm.chat(user("What is the capital of Kenya?")))["expert"] == "edge-small"


def test_an_expert_can_be_forced_per_call(llm, experts):
    response = llm.chat(user(TRIVIA), expert="med-7b")
    meta = routing(response)
    assert meta["expert"] == "med-7b" and meta["forced"] is True and meta["ranking"] == ["med-7b"]
    assert response.message.content.startswith("[med-7b] ")
    assert experts["cloud-large"].calls == []

    with pytest.raises(ValueError, match="unknown expert 'gpt-x'"):
        llm.chat(user(TRIVIA), expert="gpt-x")
    with pytest.raises(ValueError, match="not allowed"):
        llm.chat(user(TRIVIA), expert="med-7b", allowed=["edge-small"])


def test_allowed_narrows_the_choice_per_call(llm):
    meta = routing(llm.complete(TRIVIA, allowed=["edge-small", "med-7b"]))
    assert set(meta["ranking"]) == {"edge-small", "med-7b"}
    assert meta["expert"] in {"edge-small", "med-7b"}


def test_route_on_picks_the_text_the_router_reads(experts, router):
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="You review Python code."),
                ChatMessage(role=MessageRole.USER, content="Write a function."),
                ChatMessage(role=MessageRole.ASSISTANT, content="def f(): pass"),
                ChatMessage(role=MessageRole.USER, content=TRIVIA)]
    assert TORouterLLM(experts, router).route(messages).routed_text == TRIVIA
    conversation = TORouterLLM(experts, router, route_on="conversation").route(messages).routed_text
    assert conversation == "\n".join(["You review Python code.", "Write a function.", TRIVIA])


# ---- fallbacks -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", SYNC + ASYNC)
def test_a_failing_expert_falls_back_to_the_next_in_the_ranking(llm, experts, method):
    ranking = llm.route(user(TRIVIA)).ranking
    experts[ranking[0]].unavailable = True

    final, responses = invoke(llm, method, TRIVIA)

    assert final.startswith(f"[{ranking[1]}] ")
    meta = routing(responses[-1])
    assert meta["expert"] == ranking[1] and meta["chosen"] == ranking[0]
    assert meta["fallback"] is True
    assert list(meta["failures"]) == [ranking[0]]
    assert meta["failures"][ranking[0]].startswith("ExpertUnavailableError")
    assert experts[ranking[0]].calls, "the chosen expert was never tried"


def test_a_fallback_is_reported_as_an_event(llm, experts, recorder):
    ranking = llm.route(user(TRIVIA)).ranking
    experts[ranking[0]].unavailable = True
    recorder.events.clear()
    llm.chat(user(TRIVIA))
    fallbacks = [e for e in recorder.events if isinstance(e, ExpertFallbackEvent)]
    assert len(fallbacks) == 1
    assert fallbacks[0].expert == ranking[1] and fallbacks[0].chosen == ranking[0]
    assert ranking[0] in fallbacks[0].failures


@pytest.mark.parametrize("method", ["stream_chat", "astream_chat", "stream_complete", "astream_complete"])
def test_a_stream_failing_after_its_first_chunk_is_not_retried(llm, experts, method):
    ranking = llm.route(user(TRIVIA)).ranking
    experts[ranking[0]].break_mid_stream = True
    with pytest.raises(ExpertUnavailableError, match="dropped the stream"):
        invoke(llm, method, TRIVIA)
    for name in ranking[1:]:
        assert experts[name].calls == []


@pytest.mark.parametrize("method", ["chat", "astream_chat", "acomplete", "stream_complete"])
def test_fallbacks_off_raises_the_chosen_experts_error(experts, router, method):
    llm = TORouterLLM(experts, router, fallbacks=False)
    ranking = llm.route(user(TRIVIA)).ranking
    experts[ranking[0]].unavailable = True
    with pytest.raises(ExpertUnavailableError, match=ranking[0]):
        invoke(llm, method, TRIVIA)
    for name in ranking[1:]:
        assert experts[name].calls == []


@pytest.mark.parametrize("method", ["chat", "astream_complete"])
def test_when_every_expert_fails_the_error_names_each_failure(router, method):
    experts = make_experts(unavailable=True)
    llm = TORouterLLM(experts, router)
    with pytest.raises(AllExpertsFailed) as info:
        invoke(llm, method, TRIVIA)
    assert set(info.value.failures) == set(experts)
    for name in experts:
        assert f"{name}: ExpertUnavailableError" in str(info.value)


# ---- function calling ----------------------------------------------------------------------

def test_chat_with_tools_routes_among_tool_capable_experts(llm, experts):
    question = "What is 6 multiplied by 7?"
    assert routing(llm.chat(user(question), cost_weight=1e4))["expert"] == "edge-small"

    response = llm.chat_with_tools([MULTIPLY], user_msg=question, cost_weight=1e4)
    meta = routing(response)
    assert set(meta["ranking"]) == TOOL_EXPERTS
    assert meta["expert"] == "code-7b"  # the cheaper tool-capable expert
    calls = llm.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("multiply", {"a": 6, "b": 7})]


def test_predict_and_call_sync_and_async(llm):
    assert str(llm.predict_and_call([MULTIPLY], user_msg="What is 6 multiplied by 7?")) == "42"
    result = asyncio.run(llm.apredict_and_call([MULTIPLY], user_msg="What is 12 multiplied by 3?"))
    assert str(result) == "36"


@pytest.mark.parametrize("method", ["stream_chat_with_tools", "astream_chat_with_tools", "achat_with_tools"])
def test_tool_calls_through_every_form(llm, method):
    call = getattr(llm, method)
    history = user("What is 6 multiplied by 7?")
    if method == "stream_chat_with_tools":
        responses = list(call([MULTIPLY], chat_history=history))
    elif method == "astream_chat_with_tools":
        responses = asyncio.run(_collect(call([MULTIPLY], chat_history=history)))
    else:
        responses = [asyncio.run(call([MULTIPLY], chat_history=history))]
    assert routing(responses[-1])["expert"] in TOOL_EXPERTS
    calls = llm.get_tool_calls_from_response(responses[-1])
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("multiply", {"a": 6, "b": 7})]


def test_tool_calls_fall_back_to_the_next_tool_capable_expert(llm, experts):
    experts["cloud-large"].unavailable = True
    response = llm.chat_with_tools([MULTIPLY], user_msg="What is 6 multiplied by 7?")
    meta = routing(response)
    assert meta["chosen"] == "cloud-large" and meta["expert"] == "code-7b" and meta["fallback"] is True
    assert llm.get_tool_calls_from_response(response)[0].tool_kwargs == {"a": 6, "b": 7}


def test_tool_calls_need_a_tool_capable_expert(experts, router, llm):
    no_tools = TORouterLLM(experts, router, allowed=["edge-small", "med-7b"])
    with pytest.raises(ValueError, match="FunctionCallingLLM expert"):
        no_tools.chat_with_tools([MULTIPLY], user_msg="What is 6 multiplied by 7?")
    with pytest.raises(ValueError, match="expert 'med-7b' cannot take this request: tool calling needs a FunctionCallingLLM"):
        llm.chat_with_tools([MULTIPLY], user_msg="What is 6 multiplied by 7?", expert="med-7b")


def test_tool_calls_of_a_response_without_routing_metadata(llm):
    bare = ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content="hi"))
    assert llm.get_tool_calls_from_response(bare, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="no TORouterLLM routing metadata"):
        llm.get_tool_calls_from_response(bare)


# ---- instrumentation -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["chat", "astream_complete"])
def test_each_decision_is_an_instrumentation_event_inside_a_span(llm, recorder, method):
    recorder.events.clear()
    _, responses = invoke(llm, method, BIOMED)
    decisions = [e for e in recorder.events if isinstance(e, RoutingDecisionEvent)]
    assert len(decisions) == 1
    event, meta = decisions[0], routing(responses[-1])
    assert event.expert == meta["expert"]
    assert event.ranking == meta["ranking"]
    assert {k: round(v, 6) for k, v in event.scores.items()} == meta["scores"]
    assert event.span_id is not None and "route" in event.span_id


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["chat", "achat", "stream_chat", "astream_chat"])
def test_an_empty_message_list_is_a_clear_error(llm, method):
    call = getattr(llm, method)
    with pytest.raises(ValueError, match="empty message list"):
        result = call([])
        if asyncio.iscoroutine(result):
            asyncio.run(result)


def test_requests_without_user_text_are_answered(experts, router):
    llm = TORouterLLM(experts, router, default_expert="med-7b")
    # A system message alone is routed on.
    system_only = llm.chat([ChatMessage(role=MessageRole.SYSTEM, content=TRIVIA)])
    assert routing(system_only)["expert"] == llm.route(user(TRIVIA)).expert
    # Nothing to route on: the router ranks for the empty text and the default expert goes first.
    for response in (llm.chat([ChatMessage(role=MessageRole.USER, blocks=[IMAGE])]), llm.complete("   ")):
        meta = routing(response)
        assert meta["expert"] == meta["ranking"][0] == "med-7b"
        assert sorted(meta["ranking"]) == sorted(experts)
    assert experts["med-7b"].calls == ["chat", "complete"]
    with pytest.raises(TypeError, match="ChatMessage"):
        llm.chat([{"role": "user", "content": TRIVIA}])


def test_a_system_message_alone_is_routed_on_with_route_on_conversation(experts, router):
    llm = TORouterLLM(experts, router, route_on="conversation")
    system_only = [ChatMessage(role=MessageRole.SYSTEM, content=TRIVIA)]
    assert llm.route(system_only).routed_text == TRIVIA
    assert llm.chat(system_only).message.content.startswith("[")


def test_non_text_blocks_are_skipped_when_routing(llm):
    mixed = [ChatMessage(role=MessageRole.USER, blocks=[IMAGE, TextBlock(text=BIOMED)])]
    decision = llm.route(mixed)
    assert decision.routed_text == BIOMED
    assert decision.ranking == llm.route(user(BIOMED)).ranking


# ---- async ---------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_async_routing_runs_router_inference_off_the_event_loop(llm, monkeypatch):
    router = llm.controller.router
    predict = router.predict
    threads = []

    def recording_predict(prompts):
        threads.append(threading.get_ident())
        return predict(prompts)

    monkeypatch.setattr(router, "predict", recording_predict)
    loop_thread = threading.get_ident()
    # Distinct texts: a repeated text is answered from the prediction cache, with no inference at all.
    await llm.achat(user(TRIVIA))
    await llm.acomplete(BIOMED)
    await _collect(llm.astream_chat(user("What is the capital of Peru?")))
    await llm.achat_with_tools([MULTIPLY], user_msg="What is 6 multiplied by 7?")
    assert len(threads) == 4
    assert loop_thread not in threads
