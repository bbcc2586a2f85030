"""``ChatRuleBased``: a deterministic, offline chat model for tests, examples and benchmarks.

Routing needs experts to route to; this one needs no network, no weights and no time,
yet behaves like a provider chat model where LangChain looks: it streams word by word,
reports token usage (one token per word) and counts tokens the same way, honours stop
sequences, ``max_tokens`` and its context window (reported in its ``profile``), calls
bound tools with arguments read from the question, and answers through the schema tool
of structured output (``with_structured_output`` and ``create_agent``'s
``response_format``). Its answers come from a few rules (arithmetic, the context
sentence that best matches the question, tool results), so they are reproducible, not
clever.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import ContextOverflowError
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from torouter.data import content_text
from torouter.routing_text import question_of

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_TOKEN = re.compile(r"\S+\s*|\s+")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_ARITHMETIC = re.compile(
    r"(-?\d+(?:\.\d+)?)\s*(\+|-|\*|/|x|×|plus|minus|times|multiplied by|divided by)\s*(-?\d+(?:\.\d+)?)",
    re.IGNORECASE)
_OPERATORS: dict[str, Callable[[float, float], float]] = {
    "+": operator.add, "plus": operator.add, "-": operator.sub, "minus": operator.sub,
    "*": operator.mul, "x": operator.mul, "×": operator.mul, "times": operator.mul,
    "multiplied by": operator.mul, "/": operator.truediv, "divided by": operator.truediv,
}
_STOPWORDS = frozenset(
    "a an and are as at be by can could do does for from get has have how i in is it its me of on or "
    "please that the their this to tool use using was what when where which who why will with you your".split())
_GREETINGS = frozenset({"hello", "hi", "hey", "greeting"})
_CALL_KWARGS = frozenset({"tools", "tool_choice", "answer_tools", "max_tokens", "temperature", "stream"})
_FORCING = ("any", "required", True)


def _text(message: BaseMessage) -> str:
    """The text parts of a message (content blocks that are not text are skipped)."""
    return content_text(message.content)


def _stem(word: str) -> str:
    """A crude suffix strip, so "monitored" and "monitor" count as the same word."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _words(text: str) -> set[str]:
    lowered = (w.lower() for w in _WORD.findall(text))
    return {_stem(w) for w in lowered if w not in _STOPWORDS}


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _question(messages: Sequence[BaseMessage]) -> str:
    """What is being asked: the question of a filled RAG template, else the last line of the latest human message."""
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            text = _text(message)
            question = question_of(text)
            if question != text:
                return question.strip()
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return lines[-1] if lines else ""
    return ""


class ChatRuleBased(BaseChatModel):
    """A deterministic offline chat model that answers by simple rules.

    Rules, in order: after a tool result, report it; arithmetic on two numbers
    (``3 + 4``, ``12 times 7``) is computed; a greeting is greeted back; otherwise the
    sentence of the context (system messages and earlier lines of the user message)
    sharing the most words with the question is returned, or the model says it has no
    rule for the question. With tools bound it calls the tool named or best matched by
    the question (always when ``tool_choice`` forces a call), filling number arguments
    with the numbers in the question, text arguments with its quoted strings (else the
    question itself). A per-call ``temperature`` is accepted, so routers can pass one
    on, and changes nothing: the answers are deterministic.

    Structured output binds the schema as an *answer tool* (a bare schema: a Pydantic
    model, TypedDict or a tool without a function, as ``with_structured_output`` and
    ``create_agent``'s ``ToolStrategy`` bind it). When a call is forced, the model calls
    a matching ordinary tool first, and the answer tool when none matches or once a
    tool has answered; the answer tool's text arguments take the question's quoted
    strings, else the rule-based answer, and its numbers come from that answer.

    Example:
        ```python
        from langchain_torouter import ChatRuleBased

        model = ChatRuleBased(model="local-math")
        model.invoke("What is 12 times 7?").content  # 'The answer is 84.'
        ```
    """

    model_name: str = Field(default="rule-based", alias="model")
    """Model name reported in ``response_metadata["model_name"]`` and to tracing."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Cut answers after this many tokens (words); a per-call ``max_tokens`` overrides it."""

    stop: list[str] | None = None
    """Default stop sequences: the answer ends before the first one it contains."""

    tool_calling: bool = True
    """Set False to emulate a model without tool calling (``bind_tools`` then raises)."""

    max_input_tokens: int = Field(default=32768, ge=1)
    """Context window in tokens (words): reported in ``profile``; longer inputs raise
    ``ContextOverflowError`` as a provider would."""

    streaming: bool = False
    """Make ``invoke`` go through the word-by-word stream (``on_llm_new_token`` fires per word)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    @property
    def _llm_type(self) -> str:
        return "rule-based-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens, "stop": self.stop}

    def _resolve_model_profile(self) -> ModelProfile | None:
        # Read by LangChain agents: SummarizationMiddleware's fractional limits need the
        # context window; create_agent uses tool calling for structured output because
        # there is no native (provider) structured output here.
        return ModelProfile(max_input_tokens=self.max_input_tokens, text_inputs=True, text_outputs=True,
                            image_inputs=False, tool_calling=self.tool_calling, tool_choice=self.tool_calling,
                            tool_call_streaming=self.tool_calling, structured_output=False)

    def get_num_tokens(self, text: str) -> int:
        """Tokens as this model counts them in usage: one per word."""
        return len(_TOKEN.findall(text))

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Input tokens of ``messages`` as reported in ``usage_metadata`` (the text of each message)."""
        return sum(len(_TOKEN.findall(_text(m))) for m in messages)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="local", ls_model_name=kwargs.get("model") or self.model_name,
                                 ls_model_type="chat")
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if kwargs.get("temperature") is not None:
            params["ls_temperature"] = kwargs["temperature"]
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # --- tools -----------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (any format ``convert_to_openai_tool`` reads) for the model to call.

        ``tool_choice``: ``"auto"``/None (call when the question asks for a tool),
        ``"any"``/``"required"``/True (always call), ``"none"``/False, or a tool name.
        """
        if not self.tool_calling:
            raise NotImplementedError(f"{self.model_name} does not support tool calling")
        # Arguments always follow the schema and at most one tool is called per turn,
        # so ``strict`` and ``parallel_tool_calls`` are accepted and already hold.
        kwargs.pop("strict", None)
        kwargs.pop("parallel_tool_calls", None)
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice = _choice_name(tool_choice)
        if choice is not None and choice not in names:
            raise ValueError(f"tool_choice {choice!r} is not one of the bound tools {names}")
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        answers = [name for tool, name in zip(tools, names) if _is_schema_only(tool)]
        structured = kwargs.get("ls_structured_output_format") or {}
        if structured.get("schema") is not None:
            answers.append(convert_to_openai_tool(structured["schema"])["function"]["name"])
        if answers:
            kwargs["answer_tools"] = sorted(set(answers))
        return super().bind(tools=formatted, **kwargs)

    # --- generation ------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        message = self._reply(messages, stop, kwargs)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from _chunks(self._reply(messages, stop, kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in _chunks(self._reply(messages, stop, kwargs)):
            yield chunk

    def _reply(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> AIMessage:
        unknown = set(kwargs) - _CALL_KWARGS
        if unknown:
            raise TypeError(f"ChatRuleBased got unexpected keyword arguments {sorted(unknown)}")
        if not messages:
            raise ValueError("ChatRuleBased needs at least one message")
        input_tokens = self.get_num_tokens_from_messages(messages)
        if input_tokens > self.max_input_tokens:
            raise ContextOverflowError(
                f"{self.model_name}: {input_tokens} input tokens exceed max_input_tokens={self.max_input_tokens}")
        metadata: dict[str, Any] = {"model_name": self.model_name, "model_provider": "local"}
        call = _tool_call(messages, kwargs.get("tools") or [], kwargs.get("tool_choice"),
                          set(kwargs.get("answer_tools") or ()), lambda: self._answer(messages))
        if call is not None:
            output_tokens = len(_TOKEN.findall(json.dumps(call["args"], ensure_ascii=False)))
            return AIMessage(
                content="", tool_calls=[call],
                response_metadata={**metadata, "finish_reason": "tool_calls"},
                usage_metadata=_usage(input_tokens, output_tokens))
        text, finish = self._answer(messages), "stop"
        for sequence in stop if stop is not None else (self.stop or []):
            if sequence and sequence in text:
                text = text[: text.index(sequence)]
        tokens = _TOKEN.findall(text)
        limit = kwargs.get("max_tokens") or self.max_tokens
        if limit is not None and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
        return AIMessage(
            content="".join(tokens), response_metadata={**metadata, "finish_reason": finish},
            usage_metadata=_usage(input_tokens, len(tokens)))

    def _answer(self, messages: list[BaseMessage]) -> str:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            return f"The {last.name or 'tool'} tool returned: {_text(last)}"
        question = _question(messages)
        match = _ARITHMETIC.search(question)
        if match:
            a, op, b = float(match.group(1)), match.group(2).lower(), float(match.group(3))
            if op in ("/", "divided by") and b == 0:
                return "Division by zero is undefined."
            return f"The answer is {_format_number(_OPERATORS[op](a, b))}."
        asked = _words(question)
        if asked & _GREETINGS and len(asked) <= 3:
            return f"Hello! I am {self.model_name}. How can I help you today?"
        best, best_overlap = "", 0
        for sentence in _context_sentences(messages, question):
            overlap = len(asked & _words(sentence))
            if overlap > best_overlap:
                best, best_overlap = sentence, overlap
        if best:
            return best
        return f"I have no rule to answer that. You asked: {question}" if question else "I have nothing to answer."


def _context_sentences(messages: Sequence[BaseMessage], question: str) -> Iterator[str]:
    """Sentences of the system and human messages, except those of the question itself."""
    for message in messages:
        if isinstance(message, (SystemMessage, HumanMessage)):
            text = _text(message).replace(question, " ") if question else _text(message)
            for sentence in _SENTENCE.split(text):
                sentence = sentence.strip()
                if sentence and sentence not in question:
                    yield sentence


def _usage(input_tokens: int, output_tokens: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=input_tokens, output_tokens=output_tokens,
                         total_tokens=input_tokens + output_tokens)


def _chunks(message: AIMessage) -> Iterator[ChatGenerationChunk]:
    """A finished reply as stream chunks: one per word, tool arguments in two halves."""
    for token in _TOKEN.findall(message.content if isinstance(message.content, str) else ""):
        yield ChatGenerationChunk(message=AIMessageChunk(content=token))
    for index, call in enumerate(message.tool_calls):
        args = json.dumps(call["args"], ensure_ascii=False)
        half = len(args) // 2
        yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[
            {"name": call["name"], "args": args[:half], "id": call["id"], "index": index, "type": "tool_call_chunk"}]))
        yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[
            {"name": None, "args": args[half:], "id": None, "index": index, "type": "tool_call_chunk"}]))
    yield ChatGenerationChunk(message=AIMessageChunk(
        content="", response_metadata=dict(message.response_metadata),
        usage_metadata=message.usage_metadata, chunk_position="last"))


# --- tool calling rules -------------------------------------------------------------------
def _choice_name(tool_choice: Any) -> str | None:
    """The tool a ``tool_choice`` names, if it names one."""
    if isinstance(tool_choice, dict):
        return (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "any", "required"):
        return tool_choice
    return None


def _is_schema_only(tool: Any) -> bool:
    """Whether a tool is a bare schema to answer through (structured output), not something to run."""
    if isinstance(tool, type):
        return True  # a Pydantic model, TypedDict or dataclass
    return isinstance(tool, StructuredTool) and tool.func is None and tool.coroutine is None


def _tool_call(messages: Sequence[BaseMessage], tools: list[dict[str, Any]], tool_choice: Any,
               answer_tools: set[str], answer: Callable[[], str]) -> dict | None:
    if not tools or tool_choice in ("none", False):
        return None
    question = _question(messages)
    named = _choice_name(tool_choice)
    forced = named is not None or tool_choice in _FORCING
    after_tool = isinstance(messages[-1], ToolMessage)
    if not forced and after_tool:
        return None  # a tool already answered: reply in text
    answers = [t for t in tools if t["function"]["name"] in answer_tools]
    if named is not None:
        tool = next(t for t in tools if t["function"]["name"] == named)
    elif forced and answers and after_tool:
        tool, _ = _best_tool(answers, question)  # a tool has answered: give the structured answer
    else:
        tool, relevance = _best_tool(tools, question)
        asks_for_tool = bool(re.search(r"\b(use|using|call)\b.*\btool\b", question, re.IGNORECASE))
        if forced and answers and relevance == 0:
            tool, _ = _best_tool(answers, question)  # no tool to run fits: answer directly
        elif not forced and relevance == 0 and not (asks_for_tool and len(tools) == 1):
            return None
    function = tool["function"]
    if function["name"] in answer_tools:
        text = answer()
        args = _fill_args(function.get("parameters") or {}, function["name"], question,
                          text=text, numbers_from=text)
    else:
        args = _fill_args(function.get("parameters") or {}, function["name"], question)
    call_id = "call_" + uuid.uuid5(uuid.NAMESPACE_URL, f"{function['name']}|{question}|{len(messages)}").hex[:16]
    return {"name": function["name"], "args": args, "id": call_id, "type": "tool_call"}


def _best_tool(tools: list[dict[str, Any]], question: str) -> tuple[dict[str, Any], int]:
    """The tool the question names, else the one whose name and description share most words with it."""
    asked = _words(question)
    best, best_score = tools[0], 0
    for tool in tools:
        name = tool["function"]["name"]
        if re.search(rf"\b{re.escape(name)}\b", question):
            return tool, 100
        described = _words(name.replace("_", " ")) | _words(tool["function"].get("description", ""))
        score = len(asked & described)
        if score > best_score:
            best, best_score = tool, score
    return best, best_score


def _fill_args(parameters: dict[str, Any], name: str, question: str, text: str | None = None,
               numbers_from: str | None = None) -> dict[str, Any]:
    """Arguments for a tool call: ``name(1, 'x')`` in the question, else its numbers and quoted strings.

    Required text arguments left over get ``text`` (default: the question); numbers are
    read from ``numbers_from`` when it holds any (an answer tool reports the answer's numbers).
    """
    properties: dict[str, Any] = parameters.get("properties") or {}
    required = set(parameters.get("required") or [])
    explicit = _explicit_args(name, question)
    numbers = [] if explicit is not None else [float(n) for n in _NUMBER.findall(question)]
    if explicit is None and numbers_from is not None and _NUMBER.search(numbers_from):
        numbers = [float(n) for n in _NUMBER.findall(numbers_from)]
    text = question if text is None else text
    quoted = [a or b for a, b in _QUOTED.findall(question)]
    args: dict[str, Any] = {}
    for key, schema in properties.items():
        kind = _json_type(schema)
        value: Any = None
        if explicit:
            value = explicit.pop(0)
        elif kind in ("integer", "number") and numbers:
            value = numbers.pop(0)
        elif kind == "string" and "enum" in schema:
            options = [str(o) for o in schema["enum"]]
            value = next((o for o in options if o.lower() in question.lower()), options[0])
        elif kind == "string" and quoted:
            value = quoted.pop(0)
        elif key in required:
            value = {"integer": 0, "number": 0, "string": text, "boolean": False,
                     "array": [], "object": {}}.get(kind, text)
        if value is None:
            continue
        if kind == "integer" and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif kind == "number" and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif kind == "string" and not isinstance(value, str):
            value = str(value)
        args[key] = value
    return args


def _explicit_args(name: str, question: str) -> list[Any] | None:
    """Positional literals of a ``name(...)`` call written in the question, if there is one."""
    match = re.search(rf"\b{re.escape(name)}\s*\(([^()]*)\)", question)
    if match is None:
        return None
    try:
        values = ast.literal_eval(f"[{match.group(1)}]")
    except (ValueError, SyntaxError):
        return None
    return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]


def _json_type(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind is None:
        for option in schema.get("anyOf") or schema.get("oneOf") or []:
            option_kind = _json_type(option)
            if option_kind != "null":
                return option_kind
    return kind or "string"


__all__ = ["ChatRuleBased"]
