"""``torouter.offline``: the offline experts' rules, which the LangChain and LlamaIndex fakes only wrap."""

from __future__ import annotations

import pytest

from torouter.offline import (
    OfflineExpert,
    ToolSpec,
    arithmetic,
    best_sentence,
    best_tool,
    content_words,
    count_tokens,
    cut_answer,
    fill_arguments,
    question_in,
    token_pieces,
)

ADD = ToolSpec("add", "Add two integers.", {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]})
WEATHER = ToolSpec("get_weather", "Get the current weather for a location.", {
    "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]})
MULTIPLY = ToolSpec("multiply", "Multiply two numbers.", {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]})
RAG = ("Context information is below.\n---------------------\nLima is the capital of Peru. "
       "Warfarin is monitored with the INR test.\n---------------------\n"
       "Given the context information and not prior knowledge, answer the query.\n"
       "Query: How is warfarin monitored?\nAnswer: ")


def test_words_tokens_and_cuts():
    assert content_words("How is Warfarin monitored?") == {"warfar", "monito"}
    assert content_words("monitor") <= content_words("monitored") and content_words("multiply") == {"multip"}
    assert content_words("the use of a tool") == set()  # stopwords only
    assert token_pieces("The answer is 4.") == ["The ", "answer ", "is ", "4."]
    assert "".join(token_pieces("  two  words ")) == "  two  words "
    assert count_tokens("What is 2 + 2?") == 5
    assert cut_answer("The answer is 4.", stop=[" is"]) == ("The answer", 2, "stop")
    assert cut_answer("The answer is 4.", max_tokens=2) == ("The answer ", 2, "length")


def test_questions_come_out_of_templates_and_prompts():
    assert question_in(RAG) == "How is warfarin monitored?"
    assert question_in("Some notes.\nWhat is the capital of Peru?\nAnswer briefly.") == "What is the capital of Peru?"
    assert question_in("Tell me a story") == "Tell me a story"
    expert = OfflineExpert()
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
              {"role": "assistant", "content": "Thought: ..."}, {"role": "user", "content": "Observation: 4"}]
    assert expert.question(prompt) == "What is 2 + 2?"  # a ReAct observation is not the user's words
    unwrapping = OfflineExpert(unwrap=lambda text: text.removeprefix("Wrapped: "))
    assert unwrapping.question([{"role": "user", "content": "Wrapped: Why?"}]) == "Why?"
    with pytest.raises(TypeError, match="prompt message 0: expected a"):
        expert.question(["not a message"])


def test_rules_answer_in_order():
    assert arithmetic("What is 12 times 7?") == "The answer is 84."
    assert arithmetic("What is 10 / 4?") == "The answer is 2.5."
    assert arithmetic("What is 1 divided by 0?") == "Division by zero is undefined."
    assert arithmetic("What is love?") is None
    assert best_sentence("How is warfarin monitored?", [RAG]) == ("Warfarin is monitored with the INR test.", True)
    expert = OfflineExpert(name="local")
    assert expert.answer("Hello") == "Hello! I am local. How can I help you today?"
    assert expert.answer(RAG) == "Warfarin is monitored with the INR test."
    assert expert.answer("Compose a sonnet") == "I have no rule to answer that. You asked: Compose a sonnet"
    assert expert.answer("Lima is in Peru.\nWho wrote Hamlet?") == "The text gives no answer to: Who wrote Hamlet?"
    assert expert.answer([]) == "There is no question to answer."
    result = [{"role": "user", "content": "Use the add tool: 1 + 2"}, {"role": "tool", "name": "add", "content": "3"}]
    assert expert.answer(result) == "The add tool returned: 3"
    signed = OfflineExpert(name="med-7b", signed=True)
    assert signed.answer(RAG) == "[med-7b] Warfarin is monitored with the INR test."
    assert signed.answer(result) == "[med-7b] 3"  # the signature says who answered


def test_tools_are_chosen_by_name_or_words_and_filled_from_the_schema():
    assert best_tool("Use the add tool: what is 3 + 4?", [WEATHER, ADD]) == (ADD, 100)
    assert best_tool("What is the weather in 'Lima'?", [ADD, WEATHER]) == (WEATHER, 1)
    assert best_tool("What is 6 multiplied by 7?", [ADD, MULTIPLY])[0] == MULTIPLY  # stems meet
    assert fill_arguments(ADD, "What is 3 + 4?") == {"a": 3, "b": 4}
    assert fill_arguments(ADD, "add(5, 6)") == {"a": 5, "b": 6}
    assert fill_arguments(ADD, "Hello") == {"a": 0, "b": 0}  # required numbers the question lacks
    assert fill_arguments(MULTIPLY, "6 by 7") == {"a": 6.0, "b": 7.0}
    assert fill_arguments(WEATHER, "What is the weather in 'Lima'?") == {"location": "Lima"}
    nested = ToolSpec("report", "", {
        "type": "object", "required": ["unit", "place", "tags", "ok", "note"],
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "place": {"$ref": "#/$defs/Place"},
                       "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"},
                       "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "extra": {"type": "string"}},
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    assert fill_arguments(nested, "Weather in fahrenheit?") == {
        "unit": "fahrenheit", "place": {"city": "Weather in fahrenheit?"}, "tags": ["Weather in fahrenheit?"],
        "ok": True, "note": "Weather in fahrenheit?"}  # optional "extra" is left out
    answer_tool = ToolSpec("Product", "", {"type": "object", "required": ["value", "explanation"], "properties": {
        "value": {"type": "integer"}, "explanation": {"type": "string"}}}, answers=True)
    assert fill_arguments(answer_tool, "What is 6 times 7?", answer="The answer is 42.") == {
        "value": 42, "explanation": "The answer is 42."}


def test_handoff_goes_to_the_agent_that_fits():
    handoff = ToolSpec("handoff", "Hand off. Currently available agents: {'math': 'sums and products', "
                       "'pharma': 'drug interactions and dosing'}",
                       {"type": "object", "properties": {"to_agent": {"type": "string"}, "reason": {"type": "string"}}})
    call = OfflineExpert().tool_call([{"role": "user", "content": "Which drug interactions matter?"}], [ADD, handoff])
    assert call.name == "handoff"
    assert call.arguments == {"to_agent": "pharma", "reason": "pharma is suited to: Which drug interactions matter?"}
    after = [{"role": "user", "content": "Which drug interactions matter?"},
             {"role": "tool", "name": "handoff", "content": "Agent pharma is now handling the request"}]
    assert OfflineExpert.tool_result(after) is None  # the new agent starts on the question


def test_tool_choice_decides_whether_and_what_to_call():
    expert = OfflineExpert()
    ask = [{"role": "user", "content": "Tell me a story"}]
    assert expert.tool_call(ask, [ADD]) is None  # auto: nothing fits
    assert expert.tool_call(ask, [ADD], "any").name == "add"
    assert expert.tool_call(ask, [ADD, WEATHER], "get_weather").name == "get_weather"
    assert expert.tool_call(ask, [ADD], "none") is None
    with pytest.raises(ValueError, match="tool_choice 'nope' is not one of the tools"):
        expert.tool_call(ask, [ADD], "nope")
    first = expert.tool_call([{"role": "user", "content": "What is 3 + 4?"}], [ADD], "any")
    assert first == expert.tool_call([{"role": "user", "content": "What is 3 + 4?"}], [ADD], "any")  # deterministic
    assert first.id.startswith("call_")
    done = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "tool", "name": "add", "content": "7"}]
    assert expert.reply(done, [ADD]).text == "The add tool returned: 7"


def test_react_prompts_get_react_steps():
    system = ("Answer in the format Thought: ... Action: ... Action Input: ...\n"
              "> Tool Name: multiply\nTool Description: Multiply two numbers.\n"
              'Tool Args: {"properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}\n')
    expert = OfflineExpert(name="code-7b", signed=True)
    prompt = [{"role": "system", "content": system}, {"role": "user", "content": "What is 6 multiplied by 7?"}]
    step = expert.reply(prompt).text
    assert step.endswith('Action: multiply\nAction Input: {"a": 6.0, "b": 7.0}')
    prompt += [{"role": "assistant", "content": step}, {"role": "user", "content": "Observation: 42.0"}]
    assert expert.reply(prompt).text.endswith("Answer: [code-7b] 42.0")
    assert OfflineExpert().react([{"role": "user", "content": "What is 6 multiplied by 7?"}]) is None
