"""``ChatRuleBased``, the offline expert used by the LangChain tests, examples and benchmark."""

from __future__ import annotations

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import SummarizationMiddleware
from langchain.agents.structured_output import ToolStrategy
from langchain_core.exceptions import ContextOverflowError
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from helpers.langchain_experts import RunRecorder
from langchain_torouter import ChatRuleBased


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def get_weather(location: str) -> str:
    """Get the current weather for a location."""
    return "sunny"


@tool
def drug_interactions(drug: str) -> str:
    """Look up the known interactions of a drug."""
    return "aspirin raises the bleeding risk"


def test_answers_arithmetic_and_context_questions():
    model = ChatRuleBased(model="m")
    assert model.invoke("What is 12 times 7?").content == "The answer is 84."
    assert model.invoke("What is 10 / 4?").content == "The answer is 2.5."
    answer = model.invoke([
        SystemMessage("Lima is the capital of Peru. Warfarin is monitored with the INR test."),
        HumanMessage("How is warfarin monitored?"),
    ])
    assert answer.content == "Warfarin is monitored with the INR test."
    assert "no rule" in model.invoke("Compose a sonnet").content


def test_usage_and_model_name_are_reported():
    message = ChatRuleBased(model="local-x").invoke("What is 2 + 2?")
    assert message.response_metadata["model_name"] == "local-x"
    assert message.usage_metadata == {"input_tokens": 5, "output_tokens": 4, "total_tokens": 9}


def test_streams_word_by_word_with_usage_on_the_last_chunk():
    chunks = list(ChatRuleBased().stream("What is 2 + 2?"))
    assert [c.content for c in chunks[:4]] == ["The ", "answer ", "is ", "4."]
    assert chunks[-1].chunk_position == "last"
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.content == "The answer is 4."
    assert full.usage_metadata["output_tokens"] == 4


def test_streaming_flag_streams_invoke():
    recorder = RunRecorder()
    message = ChatRuleBased(streaming=True).invoke("What is 2 + 2?", config={"callbacks": [recorder]})
    assert [token for _, token in recorder.tokens][:4] == ["The ", "answer ", "is ", "4."]
    assert message.content == "The answer is 4."


def test_stop_sequences_and_max_tokens_cut_the_answer():
    model = ChatRuleBased()
    assert model.invoke("What is 2 + 2?", stop=[" is"]).content == "The answer"
    assert ChatRuleBased(stop=["answer"]).invoke("What is 2 + 2?").content == "The "
    short = model.invoke("What is 2 + 2?", max_tokens=2)
    assert short.content == "The answer "
    assert short.response_metadata["finish_reason"] == "length"
    assert short.usage_metadata["output_tokens"] == 2


def test_tool_calls_read_arguments_from_the_question():
    model = ChatRuleBased().bind_tools([add, get_weather])
    call = model.invoke("Use the add tool: what is 3 + 4?").tool_calls[0]
    assert (call["name"], call["args"]) == ("add", {"a": 3, "b": 4})
    call = model.invoke("What is the weather in 'Lima'?").tool_calls[0]
    assert (call["name"], call["args"]) == ("get_weather", {"location": "Lima"})
    assert model.invoke("Tell me a story").tool_calls == []  # auto: no matching tool, no call
    forced = ChatRuleBased().bind_tools([add], tool_choice="any").invoke("Hello")
    assert forced.tool_calls[0]["args"] == {"a": 0, "b": 0}
    explicit = ChatRuleBased().bind_tools([add], tool_choice="add").invoke("add(5, 6)")
    assert explicit.tool_calls[0]["args"] == {"a": 5, "b": 6}


def test_tool_calls_stream_as_chunks():
    model = ChatRuleBased().bind_tools([add], tool_choice="any")
    chunks = list(model.stream("What is 1 + 2?"))
    assert sum(bool(c.tool_call_chunks) for c in chunks) == 2
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.tool_calls[0]["args"] == {"a": 1, "b": 2}


def test_after_a_tool_result_it_answers_in_text():
    model = ChatRuleBased().bind_tools([add])
    call = AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1", "type": "tool_call"}])
    reply = model.invoke([HumanMessage("Use the add tool: 1 + 2"), call,
                          ToolMessage("3", tool_call_id="c1", name="add")])
    assert reply.tool_calls == []
    assert reply.content == "The add tool returned: 3"


def test_structured_output_through_tool_calling():
    class Capital(BaseModel):
        country: str
        city: str

    result = ChatRuleBased().with_structured_output(Capital).invoke("The capital of 'Peru' is 'Lima'.")
    assert result == Capital(country="Peru", city="Lima")


def test_errors_are_clear():
    with pytest.raises(NotImplementedError, match="does not support tool calling"):
        ChatRuleBased(model="m", tool_calling=False).bind_tools([add])
    with pytest.raises(ValueError, match="tool_choice 'nope'"):
        ChatRuleBased().bind_tools([add], tool_choice="nope")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['seed'\\]"):
        ChatRuleBased().invoke("hi", seed=3)
    with pytest.raises(ValueError, match="at least one message"):
        ChatRuleBased().invoke([])
    with pytest.raises(ValueError, match="modle"):
        ChatRuleBased(modle="typo")


# --- what LangChain agents need -------------------------------------------------------------
class Interaction(BaseModel):
    """The known interactions of a drug."""

    drug: str
    interactions: str


class Product(BaseModel):
    """The result of a multiplication."""

    value: int
    explanation: str


def _question(text: str) -> dict:
    return {"messages": [HumanMessage(text)]}


def test_agent_structured_output_calls_the_tools_then_the_answer_tool():
    agent = create_agent(ChatRuleBased(), tools=[drug_interactions], response_format=ToolStrategy(Interaction))
    out = agent.invoke(_question("Use the drug_interactions tool: what interacts with 'warfarin'?"),
                       {"recursion_limit": 10})
    calls = [c["name"] for m in out["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls == ["drug_interactions", "Interaction"]
    assert out["structured_response"] == Interaction(
        drug="warfarin", interactions="The drug_interactions tool returned: aspirin raises the bleeding risk")


def test_agent_structured_output_without_tools_answers_through_the_schema():
    agent = create_agent(ChatRuleBased(), response_format=Product)  # auto strategy: tool calling here
    out = agent.invoke(_question("What is 12 times 7?"))
    assert out["structured_response"] == Product(value=84, explanation="The answer is 84.")


def test_with_structured_output_function_calling_fills_the_answer():
    model = ChatRuleBased().with_structured_output(Product, method="function_calling")
    assert model.invoke("What is 6 times 7?") == Product(value=42, explanation="The answer is 42.")


def test_profile_reports_the_context_window_and_capabilities():
    profile = ChatRuleBased().profile
    assert profile["max_input_tokens"] == 32768
    assert profile["tool_calling"] is True and profile["structured_output"] is False
    assert ChatRuleBased(tool_calling=False).profile["tool_calling"] is False
    assert ChatRuleBased(max_input_tokens=100).profile["max_input_tokens"] == 100


def test_inputs_over_the_context_window_overflow():
    with pytest.raises(ContextOverflowError, match="5 input tokens exceed max_input_tokens=4"):
        ChatRuleBased(max_input_tokens=4).invoke("What is 2 + 2?")


def test_token_counts_match_the_reported_usage():
    model = ChatRuleBased()
    messages = [SystemMessage("Answer briefly."), HumanMessage("What is 2 + 2?")]
    usage = model.invoke(messages).usage_metadata
    assert model.get_num_tokens_from_messages(messages) == usage["input_tokens"] == 7
    assert model.get_num_tokens("What is 2 + 2?") == 5


def test_summarization_middleware_uses_the_profile():
    # The 40-token window sets when to summarize; the summary prompt itself (~400 words)
    # goes to a model with the default window, as it would overflow the small one.
    summarizer = SummarizationMiddleware(model=ChatRuleBased(max_input_tokens=40), trigger=("fraction", 0.5),
                                         keep=("messages", 2), summarizer=ChatRuleBased(model="summarizer"))
    agent = create_agent(ChatRuleBased(), middleware=[summarizer])
    history = [HumanMessage("Lima is the capital of Peru and the largest city of the country."),
               AIMessage("Noted: Lima is the capital of Peru."),
               HumanMessage("Warfarin is monitored with the INR test in most clinics."),
               AIMessage("Noted: the INR test."),
               HumanMessage("What is 2 + 2?")]
    out = agent.invoke({"messages": history})
    assert out["messages"][0].content.startswith("Here is a summary of the conversation to date:")
    assert out["messages"][-1].content == "The answer is 4."
    with pytest.raises(ValueError, match="Model profile information is required"):
        SummarizationMiddleware(model=ChatRuleBased(profile={}), trigger=("fraction", 0.5))
