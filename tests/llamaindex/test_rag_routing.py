"""Inside query and chat engines the router reads the user's query, never the filled template.

Each engine here uses LlamaIndex's default templates over documents of several hundred
words that have nothing to do with the questions; every routing decision made while
answering must read the bare question and pick the expert the bare question gets.
"""

from __future__ import annotations

import asyncio
import random

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, PromptTemplate, VectorStoreIndex  # noqa: E402
from llama_index.core.bridge.pydantic import BaseModel, Field  # noqa: E402
from llama_index.core.chat_engine import CondensePlusContextChatEngine, CondenseQuestionChatEngine  # noqa: E402
from llama_index.core.embeddings import MockEmbedding  # noqa: E402
from llama_index.core.llms import ChatMessage, MessageRole  # noqa: E402

from llamaindex_torouter import ExtractiveLLM, ExtractiveToolLLM, TORouterLLM  # noqa: E402
from torouter import Controller  # noqa: E402

QUESTIONS = [
    "What is the mechanism of action of metformin?",
    "What is the capital of Kenya?",
    "Write a Python function that reverses a string.",
    "A train travels 120 km in 2 hours. What is its average speed in km per hour?",
]
TOOL_EXPERTS = ["code-7b", "cloud-large"]

_PLACES = ["northern depot", "harbour office", "river warehouse", "hill station", "east annex", "old mill"]
_TEAMS = ["night crew", "survey team", "loading staff", "volunteer group", "archive clerks", "garden club"]
_ITEMS = ["crates of tiles", "bundles of cedar", "sacks of seed", "rolls of canvas", "barrels of tar",
          "boxes of lanterns", "coils of rope", "bales of wool"]
_NAMES = ["Marta", "Osei", "Lindqvist", "Okafor", "Brannigan", "Tamura", "Quiroga", "Haddad"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


def unrelated_text(seed: int, words: int) -> str:
    """Deterministic prose about depots, crews and cargo, about ``words`` words long."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < words:
        sentence = (f"On {rng.choice(_DAYS)} the {rng.choice(_TEAMS)} at the {rng.choice(_PLACES)} logged "
                    f"{rng.randint(3, 90)} {rng.choice(_ITEMS)}, and {rng.choice(_NAMES)} checked the ledger "
                    f"against the {rng.choice(_ITEMS)} stacked by the {rng.choice(_PLACES)} gate.")
        sentences.append(sentence)
        count += len(sentence.split())
    return " ".join(sentences)


DOCS = [Document(text=unrelated_text(seed, words)) for seed, words in enumerate([320, 450, 580, 400])]


@pytest.fixture(scope="module")
def index():
    return VectorStoreIndex.from_documents(DOCS, embed_model=MockEmbedding(embed_dim=8))


def experts():
    return {
        "edge-small": ExtractiveLLM(name="edge-small", context_window=2048),
        "code-7b": ExtractiveToolLLM(name="code-7b", context_window=8192),
        "med-7b": ExtractiveLLM(name="med-7b", context_window=8192),
        "cloud-large": ExtractiveToolLLM(name="cloud-large", context_window=32768),
    }


@pytest.fixture(scope="module")
def bare(router):
    """The expert each bare question gets, among all experts and among the tool-capable ones."""
    controller = Controller(router, cost_weight=40.0)
    return ({q: controller.decide(q).expert for q in QUESTIONS},
            {q: controller.decide(q, allowed=TOOL_EXPERTS).expert for q in QUESTIONS})


def assert_routed_on(seen: list, question: str, expert: str) -> None:
    assert seen, "no routing decision was made"
    assert {d.expert for d in seen} == {expert}
    assert [d.routed_text for d in seen] == [question] * len(seen)


def test_the_documents_are_long_and_unrelated():
    lengths = [len(d.text.split()) for d in DOCS]
    assert all(300 <= n <= 620 for n in lengths), lengths
    text = " ".join(d.text for d in DOCS).lower()
    assert not {"metformin", "kenya", "python", "train"} & set(text.replace(",", " ").replace(".", " ").split())


@pytest.mark.parametrize("route_on", ["last_user", "recent_user", "conversation"])
@pytest.mark.parametrize("mode", ["query", "stream", "aquery", "astream"])
def test_default_query_engine_routes_on_the_query(index, router, bare, decisions, route_on, mode):
    llm = TORouterLLM(experts(), router, cost_weight=40.0, route_on=route_on)
    engine = index.as_query_engine(llm=llm, similarity_top_k=3, streaming=mode in ("stream", "astream"))
    for question in QUESTIONS:
        decisions.clear()
        if mode == "query":
            answer = str(engine.query(question))
        elif mode == "stream":
            answer = "".join(engine.query(question).response_gen)
        elif mode == "aquery":
            answer = str(asyncio.run(engine.aquery(question)))
        else:
            async def consume(text):
                response = await engine.aquery(text)
                return "".join([token async for token in response.async_response_gen()])
            answer = asyncio.run(consume(question))
        assert_routed_on(decisions, question, bare[0][question])
        assert answer.startswith(f"[{bare[0][question]}] ")
    # Long context does not fit one call: the refine steps route on the same query, from the cache.
    assert llm.controller.router_calls == len(QUESTIONS)
    assert llm.controller.cache_hits > 0


@pytest.mark.parametrize("response_mode", ["refine", "tree_summarize", "simple_summarize", "accumulate"])
def test_every_response_mode_routes_on_the_query(index, router, bare, decisions, response_mode):
    llm = TORouterLLM(experts(), router, cost_weight=40.0, route_on="conversation")
    engine = index.as_query_engine(llm=llm, similarity_top_k=3, response_mode=response_mode)
    for question in QUESTIONS:
        decisions.clear()
        engine.query(question)
        assert_routed_on(decisions, question, bare[0][question])


def test_a_custom_template_without_context_markers_routes_on_the_query(index, router, bare, decisions):
    template = PromptTemplate("Some notes follow.\n{context_str}\nUsing only these notes, {query_str}")
    llm = TORouterLLM(experts(), router, cost_weight=40.0)
    engine = index.as_query_engine(llm=llm, similarity_top_k=2, text_qa_template=template)
    for question in QUESTIONS:
        decisions.clear()
        engine.query(question)
        assert_routed_on(decisions, question, bare[0][question])


class Finding(BaseModel):
    """An answer with a confidence flag."""

    answer: str = Field(description="The answer to the query.")
    confident: bool = Field(description="Whether the notes support the answer.")


def test_structured_output_routes_on_the_query_among_tool_experts(index, router, bare, decisions):
    llm = TORouterLLM(experts(), router, cost_weight=40.0, route_on="conversation")
    engine = index.as_query_engine(llm=llm, similarity_top_k=2, output_cls=Finding)
    for question in QUESTIONS:
        decisions.clear()
        finding = engine.query(question).response
        assert_routed_on(decisions, question, bare[1][question])
        assert isinstance(finding, Finding) and finding.confident is True
        assert finding.answer == f"The text gives no answer to: {question}"  # the documents are unrelated

    template = PromptTemplate("Notes:\n{context_str}\nQuestion about the notes: {query_str}")
    notes = DOCS[0].text + " Nairobi is the capital of Kenya. " + DOCS[1].text
    decisions.clear()
    found = llm.structured_predict(Finding, template, context_str=notes, query_str=QUESTIONS[1])
    assert found == Finding(answer="Nairobi is the capital of Kenya.", confident=True)
    assert_routed_on(decisions, QUESTIONS[1], bare[1][QUESTIONS[1]])


def test_condense_plus_context_chat_engine_routes_each_turn_on_its_message(index, router, bare, decisions):
    llm = TORouterLLM(experts(), router, cost_weight=40.0)
    engine = CondensePlusContextChatEngine.from_defaults(index.as_retriever(similarity_top_k=2), llm=llm)
    for turn, question in enumerate(QUESTIONS):
        decisions.clear()
        reply = str(engine.chat(question))
        # From the second turn on, the engine first condenses the conversation with the LLM.
        assert len(decisions) >= (2 if turn else 1)
        assert_routed_on(decisions, question, bare[0][question])
        assert reply.startswith(f"[{bare[0][question]}] ")
    assert llm.controller.router_calls == len(QUESTIONS)


def test_condense_plus_context_with_recent_user_routes_every_step_of_a_turn_alike(index, router, decisions):
    llm = TORouterLLM(experts(), router, cost_weight=40.0, route_on="recent_user")
    engine = CondensePlusContextChatEngine.from_defaults(index.as_retriever(similarity_top_k=2), llm=llm)
    engine.chat(QUESTIONS[0])
    decisions.clear()
    engine.chat("And what are its common side effects?")
    expected = f"{QUESTIONS[0]}\nAnd what are its common side effects?"
    assert [d.routed_text for d in decisions] == [expected] * len(decisions) and len(decisions) >= 2
    assert llm.controller.router_calls == 2  # one per turn: condensing and answering share the decision


def test_condense_question_chat_engine_routes_on_the_follow_up(index, router, bare, decisions):
    llm = TORouterLLM(experts(), router, cost_weight=40.0)
    engine = CondenseQuestionChatEngine.from_defaults(
        index.as_query_engine(llm=llm, similarity_top_k=2), llm=llm,
        chat_history=[ChatMessage(role=MessageRole.USER, content="Tell me about the depots."),
                      ChatMessage(role=MessageRole.ASSISTANT, content="They log cargo.")])
    question = QUESTIONS[1]
    decisions.clear()
    engine.chat(question)
    # The condensing call reads the follow-up; the query engine reads the condensed question.
    assert decisions[0].routed_text == question and decisions[0].expert == bare[0][question]
