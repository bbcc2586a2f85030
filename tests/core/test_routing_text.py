"""What the router reads: the question, not retrieved context, tool output, summaries or a system prompt."""

from __future__ import annotations

import pytest
from llama_index.core.prompts.chat_prompts import CHAT_REFINE_PROMPT, CHAT_TEXT_QA_PROMPT
from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT

from torouter.data import prompt_text
from torouter.routing_text import is_observation, is_summary, question_of, routing_text

CONTEXT = " ".join(["The committee reviewed the quarterly shipping manifests for the northern region."] * 40)
QUESTION = "Write a Python function that merges two sorted lists."


def as_prompt(messages) -> list[dict]:
    return [{"role": m.role.value, "content": m.content} for m in messages]


def test_llamaindex_default_text_qa_template_routes_on_the_query():
    filled = DEFAULT_TEXT_QA_PROMPT.format(context_str=CONTEXT, query_str=QUESTION)
    assert filled.index(QUESTION) > 1000  # the question sits after the context
    assert routing_text(filled) == QUESTION


def test_llamaindex_chat_qa_and_refine_templates_route_on_the_query():
    messages = as_prompt(CHAT_TEXT_QA_PROMPT.format_messages(context_str=CONTEXT, query_str=QUESTION))
    assert messages[0]["role"] == "system"
    for mode in ("last_user", "recent_user", "conversation"):
        assert QUESTION in routing_text(messages, mode)
    assert routing_text(messages) == QUESTION
    refine = as_prompt(CHAT_REFINE_PROMPT.format_messages(
        context_msg=CONTEXT, query_str=QUESTION, existing_answer="Use heapq.merge."))
    assert routing_text(refine) == QUESTION


@pytest.mark.parametrize("template", [
    "Answer the question based only on the following context:\n{context}\n\nQuestion: {question}",
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
    "answer the question.\nQuestion: {question}\nContext: {context}\nAnswer:",
    "Context:\n{context}\n\nQuery: {question}\nAnswer:",
    "<context>\n{context}\n</context>\n\nQuestion: {question}",
])
def test_langchain_style_rag_prompts_route_on_the_question(template):
    filled = template.format(context=CONTEXT, question=QUESTION)
    assert question_of(filled) == QUESTION
    assert routing_text([{"role": "user", "content": filled}]) == QUESTION


def test_prompts_without_context_are_read_as_trained():
    few_shot = "Question: 2+2?\nAnswer: 4\n\nQuestion: 3+3?\nAnswer:"
    assert routing_text(few_shot) == few_shot == prompt_text(few_shot)
    single = [{"role": "user", "content": few_shot}]
    assert routing_text(single) == prompt_text(single, "last_user")


def test_agent_turns_skip_tool_output_observations_and_summaries():
    messages = [
        {"role": "system", "content": "You are a helpful agent. " * 50},
        {"role": "user", "content": "Here is a summary of the conversation to date:\n\nThey discussed taxes."},
        {"role": "user", "content": "What is 12 times 7?"},
        {"role": "assistant", "content": "Thought: I need a tool. Action: multiply"},
        {"role": "user", "content": "Observation: 84"},
        {"role": "tool", "content": "84"},
    ]
    assert is_observation("Observation: 84") and is_summary(messages[1]["content"])
    assert routing_text(messages) == "What is 12 times 7?"
    assert routing_text(messages, "recent_user") == "What is 12 times 7?"
    # conversation mode: the long system prompt does not fit with the turns, so it is dropped first.
    assert routing_text(messages, "conversation", max_chars=300) == "What is 12 times 7?"
    assert routing_text(messages, "conversation").startswith("You are a helpful agent.")


def test_recent_user_reads_a_follow_up_with_the_request_it_follows():
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "def merge(a, b): ..."},
                {"role": "user", "content": "Now make it faster."}]
    assert routing_text(messages) == "Now make it faster."
    assert routing_text(messages, "recent_user") == f"{QUESTION}\nNow make it faster."
    assert routing_text(messages, "recent_user", recent_turns=1) == "Now make it faster."


def test_truncation_keeps_the_newest_turns():
    turns = [{"role": "user", "content": f"turn {i} " + "x" * 90} for i in range(10)]
    text = routing_text(turns, "conversation", max_chars=350)
    assert text.split("\n")[-1].startswith("turn 9") and "turn 6" not in text
    # The newest turn is kept whole even when it alone is longer than the budget.
    assert routing_text(turns, "recent_user", max_chars=10).startswith("turn 9")


def test_no_user_text_falls_back_to_system_then_empty():
    assert routing_text([{"role": "system", "content": "Review code."}]) == "Review code."
    assert routing_text([{"role": "assistant", "content": "Hi"}]) == ""
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    assert routing_text([{"role": "user", "content": [image]}]) == ""


def test_callable_and_bad_modes():
    assert routing_text([{"role": "user", "content": "a"}], lambda p: "custom") == "custom"
    with pytest.raises(TypeError, match="must return a string"):
        routing_text("a", lambda p: None)
    with pytest.raises(ValueError, match="route_on must be one of"):
        routing_text("a", "everything")
