"""``TORouterRunnable``: routing among whole sub-chains."""

from __future__ import annotations

import copy

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from helpers.langchain_experts import EXPERT_NAMES, OutageError, RunRecorder, trained_router
from langchain_torouter import ChatRuleBased, TORouterRunnable
from torouter import AllExpertsFailed

CODE = "Write a Python function that checks whether a number is prime."
BIOMED = "What is the mechanism of action of warfarin?"
TRIVIA = "What is the capital of Japan?"


def domain_chain(name: str):
    """A small chain per expert: its own prompt and model, ending in a string."""
    prompt = ChatPromptTemplate.from_messages([("system", f"You are the {name} desk. {{context}}"),
                                               ("human", "{question}")])
    return prompt | ChatRuleBased(model=name) | StrOutputParser()


@pytest.fixture(scope="module")
def chains():
    return {name: domain_chain(name) for name in EXPERT_NAMES}


@pytest.fixture
def routed(chains):
    return TORouterRunnable(runnables=chains, router=trained_router(), input_key="question", cost_weight=50.0)


def ask(question: str, context: str = "Warfarin is monitored with the INR blood test.") -> dict:
    return {"question": question, "context": context}


def test_routes_dict_inputs_to_the_chosen_chain(routed):
    assert routed.route(ask(BIOMED)).expert == "med-7b"
    assert routed.invoke(ask("How is warfarin monitored?")) == "Warfarin is monitored with the INR blood test."
    recorder = RunRecorder()
    routed.invoke(ask(CODE), config={"callbacks": [recorder]})
    top = recorder.runs[0]
    assert top["name"] == "TORouterRunnable" and top["parent_run_id"] is None
    child = next(r for r in recorder.runs if r["parent_run_id"] == top["run_id"])
    assert child["metadata"]["torouter"]["expert"] == "code-7b" and "torouter:code-7b" in child["tags"]
    chat = recorder.chat_runs()[0]
    assert chat["name"] == "ChatRuleBased" and chat["metadata"]["torouter"]["expert"] == "code-7b"


def test_streams_from_the_chosen_chain(routed):
    chunks = list(routed.stream(ask("How is warfarin monitored?")))
    assert len(chunks) > 3
    assert "".join(chunks) == "Warfarin is monitored with the INR blood test."


@pytest.mark.asyncio
async def test_async_invoke_stream_and_batch(routed):
    assert await routed.ainvoke(ask("How is warfarin monitored?")) == "Warfarin is monitored with the INR blood test."
    chunks = [c async for c in routed.astream(ask("How is warfarin monitored?"))]
    assert len(chunks) > 3
    assert await routed.abatch([ask(TRIVIA), ask(CODE)]) == routed.batch([ask(TRIVIA), ask(CODE)])


def test_batch_routes_in_one_router_call(chains):
    router = trained_router()
    calls = []
    counted = copy.copy(router)
    counted.predict = lambda prompts: calls.append(len(prompts)) or router.predict(prompts)
    routed = TORouterRunnable(runnables=chains, router=counted, input_key="question", cost_weight=50.0)
    out = routed.batch([ask(TRIVIA), ask(CODE), ask(BIOMED)])
    assert calls == [3] and len(out) == 3


def test_message_outputs_carry_the_decision(chains):
    models = {name: ChatRuleBased(model=name) for name in EXPERT_NAMES}
    routed = TORouterRunnable(runnables=models, router=trained_router(), cost_weight=50.0)
    message = routed.invoke(TRIVIA)
    assert message.response_metadata["torouter"]["expert"] == "edge-small"
    first = next(iter(routed.stream(TRIVIA)))
    assert first.response_metadata["torouter"]["expert"] == "edge-small"


def test_model_override_and_fallbacks(chains):
    def down(_):
        raise OutageError("med desk closed")

    runnables = {**chains, "med-7b": RunnableLambda(down)}
    routed = TORouterRunnable(runnables=runnables, router=trained_router(), input_key="question", cost_weight=50.0)
    assert routed.invoke(ask("How is warfarin monitored?")) == "Warfarin is monitored with the INR blood test."
    assert routed.invoke(ask(BIOMED), expert="edge-small") == routed.runnables["edge-small"].invoke(ask(BIOMED))
    strict = TORouterRunnable(runnables=runnables, router=trained_router(), input_key="question",
                              cost_weight=50.0, fallbacks=False)
    with pytest.raises(OutageError, match="med desk closed"):
        strict.invoke(ask(BIOMED))
    all_down = TORouterRunnable(runnables={n: RunnableLambda(down) for n in EXPERT_NAMES},
                                router=trained_router(), input_key="question")
    with pytest.raises(AllExpertsFailed, match="med-7b: OutageError: med desk closed"):
        all_down.invoke(ask(BIOMED))


def test_allowed_restricts_the_choice(chains):
    subset = {n: chains[n] for n in ("code-7b", "edge-small")}
    routed = TORouterRunnable(runnables=subset, router=trained_router(), input_key="question",
                              allowed=["code-7b", "edge-small"])
    assert routed.route(ask(BIOMED)).ranking in (["code-7b", "edge-small"], ["edge-small", "code-7b"])
    with pytest.raises(ValueError, match="must be exactly the allowed experts"):
        TORouterRunnable(runnables=subset, router=trained_router(), allowed=["code-7b"])
    with pytest.raises(ValueError, match="unknown to the router"):
        TORouterRunnable(runnables=subset, router=trained_router(), allowed=["code-7b", "gpt-5"])


def test_input_errors_are_clear(routed, chains):
    with pytest.raises(ValueError, match="no key 'question'"):
        routed.invoke({"query": CODE})
    with pytest.raises(ValueError, match="needs a dict input"):
        routed.invoke(CODE)
    plain = TORouterRunnable(runnables=chains, router=trained_router())
    with pytest.raises(ValueError, match="set input_key"):
        plain.invoke(ask(CODE))
    with pytest.raises(ValueError, match="missing for the router's experts"):
        TORouterRunnable(runnables={"code-7b": chains["code-7b"]}, router=trained_router())
    with pytest.raises(ValueError, match="runnable 'code-7b' is a int"):
        TORouterRunnable(runnables={**chains, "code-7b": 3}, router=trained_router())
