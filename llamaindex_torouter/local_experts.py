"""Deterministic offline expert LLMs, so examples and tests run with no model download or network.

They answer extractively: the sentence of the prompt that shares the most words with
the question, prefixed with ``[expert name]`` so a reader sees who answered. The
question is found the way the router finds it (inside RAG templates, past LlamaIndex's
wrapper prompts), and template instructions rarely share its words.

``ExtractiveLLM`` is a completion model whose chat goes through its prompt template;
``ExtractiveToolLLM`` is a chat model that also calls tools. Both take part in agents:

- ReAct: when the system prompt is LlamaIndex's ReAct header, they answer in its format,
  ``Thought: ... Action: <tool> Action Input: {...}`` for the tool whose name and
  description share the most words with the question, and ``Thought: I can answer ...
  Answer: ...`` with the last ``Observation:`` once there is one.
- Function calling (``ExtractiveToolLLM``): the same choice of tool as a tool call; after
  a tool result, the answer is that result.
- Structured output (``structured_predict``, ``as_structured_llm``): the one required
  schema tool is called with text fields holding the answer.
- Hand-offs in ``AgentWorkflow``: the ``handoff`` tool is called for the agent whose
  description fits the question better than the agent's own tools do.

Tool arguments are filled from the question: numbers in order for numeric parameters,
the question for text (the answer, for structured output). ``unavailable`` and
``break_mid_stream`` simulate an expert that is down, to show fallbacks.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from torouter.routing_text import is_observation, question_of

from .templates import question_in_template

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from has have how i in is it its of on or that the this to "
    "was what when where which who why with you your".split())
# A tool in LlamaIndex's ReAct header (see llama_index.core.agent.react.formatter).
_REACT_TOOL = re.compile(
    r"^> Tool Name: (?P<name>[^\n]+)\nTool Description: (?P<desc>.*?)\nTool Args: (?P<args>[^\n]*)",
    re.MULTILINE | re.DOTALL)
_HANDOFF_AGENTS = re.compile(r"Currently available agents:\s*(\{.*\})", re.DOTALL)
_HANDOFF_RESULT = re.compile(r"^Agent \S+ is now handling the request")
_REACT_DONE = "Thought: I can answer without using any more tools. I'll use the user's language to answer\nAnswer: "


class ExpertUnavailableError(ConnectionError):
    """A simulated expert outage."""


def _words(text: str) -> set[str]:
    """Content words cut to a six-letter stem, so "multiplied" meets "multiply"."""
    return {w[:6] for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 1}


def _question(text: str) -> str:
    """The question in a prompt: out of a RAG template if it is one, else its last line with a question mark,
    else its last line."""
    found = question_of(text)
    if found != text:
        return found.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    asked = [line for line in lines if "?" in line]
    return (asked or lines)[-1]


def extractive_answer(text: str) -> str:
    """The sentence of ``text`` sharing the most words with its question (ties: the earliest)."""
    question = _question(text)
    wanted = _words(question)
    body = text.replace(question, "\n") if question else text  # also where an earlier answer repeats it
    best, best_overlap = "", 0
    for sentence in (s.strip() for s in _SENTENCE_END.split(body)):
        overlap = len(wanted & _words(sentence))
        if overlap > best_overlap:
            best, best_overlap = sentence, overlap
    if best:
        return best
    return f"The text gives no answer to: {question}" if question else "There is no question to answer."


def _chunks(text: str) -> list[str]:
    """Word-sized stream deltas that join back to ``text``."""
    return re.findall(r"\S+\s*", text) or [text]


def _message_text(message: ChatMessage) -> str:
    return "\n".join(b.text for b in message.blocks if isinstance(b, TextBlock))


def _user_question(messages: Sequence[ChatMessage]) -> tuple[int, str]:
    """Index and question of the latest user turn that is the user's (not a ReAct observation)."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message.role == MessageRole.USER:
            text = _message_text(message).strip()
            if text and not is_observation(text):
                return i, _question(question_in_template(text))
    return -1, ""


# ---- tool arguments from a JSON schema ----------------------------------------------------

_MISSING = object()


def _fill(schema: dict[str, Any], defs: dict[str, Any], numbers: Iterator[str], text: str) -> dict[str, Any] | None:
    """Arguments for an object schema, or None when a required one cannot be filled."""
    kwargs: dict[str, Any] = {}
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        value = _value(prop, defs, numbers, text)
        if value is _MISSING:
            if name in required:
                return None
            continue
        kwargs[name] = value
    return kwargs


def _value(prop: dict[str, Any], defs: dict[str, Any], numbers: Iterator[str], text: str) -> Any:
    if "$ref" in prop:
        prop = defs.get(prop["$ref"].rsplit("/", 1)[-1], {})
    for option in prop.get("anyOf", ()):
        if option.get("type") != "null":
            return _value(option, defs, numbers, text)
    if "enum" in prop:
        options = [str(o) for o in prop["enum"]]
        return next((o for o in options if o.lower() in text.lower()), prop["enum"][0])
    kind = prop.get("type")
    if kind in ("integer", "number"):
        number = next(numbers, None)
        if number is None:
            return _MISSING
        return int(float(number)) if kind == "integer" else float(number)
    if kind == "string":
        return text
    if kind == "boolean":
        return True
    if kind == "array":
        item = _value(prop.get("items", {}), defs, numbers, text)
        return [] if item is _MISSING else [item]
    if kind == "object" or "properties" in prop:
        filled = _fill(prop, defs, numbers, text)
        return _MISSING if filled is None else filled
    return _MISSING


def _handoff_target(description: str, question: str) -> tuple[str | None, int]:
    """The agent in a hand-off tool's description that fits the question best, and by how many words."""
    found = _HANDOFF_AGENTS.search(description)
    if not found:
        return None, 0
    try:
        agents = ast.literal_eval(found.group(1))
    except (ValueError, SyntaxError):
        return None, 0
    wanted = _words(question)
    best, best_overlap = None, 0
    for name, about in agents.items():
        overlap = len(wanted & _words(f"{name} {about}"))
        if overlap > best_overlap:
            best, best_overlap = name, overlap
    return best, best_overlap


def choose_tool(question: str, tools: Sequence[tuple[str, str, dict[str, Any]]], required: bool,
                answer: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """``(tool name, arguments)`` for the ``(name, description, JSON schema)`` tool that fits the question.

    A tool fits by the words its name and description share with the question; the
    hand-off tool fits by the best agent it lists. With ``required`` some tool is always
    called. ``answer`` (structured output) fills the text fields in place of the question.
    """
    wanted = _words(question)
    best, best_overlap, target = None, 0, None
    for name, description, schema in tools:
        handoff = name == "handoff" and "to_agent" in schema.get("properties", {})
        if handoff:
            agent, overlap = _handoff_target(description, question)
        else:
            agent, overlap = None, len(wanted & _words(name.replace("_", " ") + " " + description))
        if overlap > best_overlap or (best is None and required):
            best, best_overlap, target = (name, description, schema), overlap, agent
    if best is None:
        return None
    name, _, schema = best
    if target is not None:
        return name, {"to_agent": target, "reason": f"{target} is suited to: {question}"}
    kwargs = _fill(schema, schema.get("$defs", {}), iter(_NUMBER.findall(question)),
                   question if answer is None else answer)
    return None if kwargs is None else (name, kwargs)


def _tool_specs(tools: Sequence[BaseTool]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(t.metadata.get_name(), t.metadata.description or "", t.metadata.get_parameters_dict()) for t in tools]


class _Extractive:
    """Behaviour shared by both local experts (a mixin over the pydantic LLM fields below)."""

    name: str
    unavailable: bool
    break_mid_stream: bool
    _calls: list[str]

    @property
    def calls(self) -> list[str]:
        """Names of the methods called so far, in order (to see how a request was served)."""
        return list(self._calls)

    def _begin(self, method: str) -> None:
        self._calls.append(method)
        if self.unavailable:
            raise ExpertUnavailableError(f"expert {self.name!r} is unavailable")

    def _answer(self, text: str) -> str:
        return f"[{self.name}] {extractive_answer(text)}"

    def _prompt_of(self, messages: Sequence[ChatMessage]) -> str:
        """The text a chat request is answered from."""
        return "\n".join(_message_text(m) for m in messages)

    def _react(self, messages: Sequence[ChatMessage]) -> str | None:
        """A reply in the ReAct format if the system prompt is LlamaIndex's ReAct header, else None."""
        system = "\n".join(_message_text(m) for m in messages if m.role == MessageRole.SYSTEM)
        if "Action Input:" not in system or "Thought:" not in system:
            return None
        at, question = _user_question(messages)
        observations = [_message_text(m).strip() for m in messages[at + 1:]
                        if m.role in (MessageRole.USER, MessageRole.TOOL) and is_observation(_message_text(m))]
        if observations:
            observation = observations[-1].split(":", 1)[1].strip()
            if not _HANDOFF_RESULT.match(observation):
                return f"{_REACT_DONE}[{self.name}] {observation}"
        tools = []
        for found in _REACT_TOOL.finditer(system):
            try:
                schema = json.loads(found.group("args"))
            except json.JSONDecodeError:
                continue
            tools.append((found.group("name").strip(), found.group("desc").strip(), schema))
        call = choose_tool(question, tools, required=False)
        if call is None:
            conversation = [m for m in messages if m.role != MessageRole.SYSTEM]
            return f"{_REACT_DONE}{self._answer(self._prompt_of(conversation))}"
        name, kwargs = call
        return (f"Thought: I need to use a tool to help me answer the question.\nAction: {name}\n"
                f"Action Input: {json.dumps(kwargs)}")

    def _chat_text(self, messages: Sequence[ChatMessage]) -> str:
        react = self._react(messages)
        return react if react is not None else self._answer(self._prompt_of(messages))

    def _stream_texts(self, method: str, text: str) -> Generator[tuple[str, str], None, None]:
        """``(cumulative text, delta)`` pairs; an outage raises before the first one."""
        self._begin(method)
        so_far = ""
        for i, delta in enumerate(_chunks(text)):
            if i == 1 and self.break_mid_stream:
                raise ExpertUnavailableError(f"expert {self.name!r} dropped the stream")
            so_far += delta
            yield so_far, delta

    def _chat_stream(self, method: str, text: str) -> ChatResponseGen:
        for so_far, delta in self._stream_texts(method, text):
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=so_far), delta=delta)

    def _completion_stream(self, method: str, prompt: str) -> CompletionResponseGen:
        for so_far, delta in self._stream_texts(method, self._answer(prompt)):
            yield CompletionResponse(text=so_far, delta=delta)


async def _async(chunks: Iterator[Any]) -> AsyncGenerator[Any, None]:
    for chunk in chunks:
        yield chunk


class ExtractiveLLM(_Extractive, CustomLLM):
    """A local completion model; chat is answered from ``messages_to_prompt`` like any CustomLLM's."""

    name: str = Field(default="extractive", description="Expert name, shown in its answers.")
    context_window: int = Field(default=4096, gt=0)
    num_output: int = Field(default=256, gt=0)
    unavailable: bool = Field(default=False, description="Fail every call before producing output.")
    break_mid_stream: bool = Field(default=False, description="Fail streams after their first chunk.")
    _calls: list[str] = PrivateAttr(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "ExtractiveLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.num_output,
                           is_chat_model=False, is_function_calling_model=False, model_name=self.name)

    def _prompt_of(self, messages: Sequence[ChatMessage]) -> str:
        return (self.messages_to_prompt or generic_messages_to_prompt)(messages)

    # Chat is answered here rather than through complete(), so that one chat call is one
    # LLM call to callbacks and instrumentation, as for a real chat-capable client.

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self._begin("chat")
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=self._chat_text(messages)))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_stream("stream_chat", self._chat_text(messages))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self._begin("achat")
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=self._chat_text(messages)))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _async(self._chat_stream("astream_chat", self._chat_text(messages)))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._begin("complete")
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completion_stream("stream_complete", prompt)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._begin("acomplete")
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        return _async(self._completion_stream("astream_complete", prompt))


class ExtractiveToolLLM(_Extractive, FunctionCallingLLM):
    """A local chat model with function calling.

    Given tools, it calls the one that fits the question (see :func:`choose_tool`);
    after a tool result it answers with that result. Given exactly one tool that it must
    call (structured output), it fills the tool's text fields with its answer.
    """

    name: str = Field(default="extractive-tools", description="Expert name, shown in its answers.")
    context_window: int = Field(default=8192, gt=0)
    num_output: int = Field(default=256, gt=0)
    unavailable: bool = Field(default=False, description="Fail every call before producing output.")
    break_mid_stream: bool = Field(default=False, description="Fail streams after their first chunk.")
    _calls: list[str] = PrivateAttr(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "ExtractiveToolLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.num_output,
                           is_chat_model=True, is_function_calling_model=True, model_name=self.name)

    @staticmethod
    def _tool_result(messages: Sequence[ChatMessage]) -> str | None:
        """The last message's tool result, unless it is a hand-off (the new agent starts on the question)."""
        if not messages or messages[-1].role != MessageRole.TOOL:
            return None
        call_id = messages[-1].additional_kwargs.get("tool_call_id")
        for message in reversed(messages[:-1]):
            for block in message.blocks:
                if isinstance(block, ToolCallBlock) and block.tool_call_id == call_id and block.tool_name == "handoff":
                    return None
        return _message_text(messages[-1])

    def _reply(self, messages: Sequence[ChatMessage], tools: Sequence[BaseTool] | None,
               tool_required: bool) -> ChatMessage:
        result = self._tool_result(messages)
        if result is not None:
            return ChatMessage(role=MessageRole.ASSISTANT, content=f"[{self.name}] {result}")
        if tools:
            _, question = _user_question(messages)
            structured = tool_required and len(tools) == 1
            answer = extractive_answer(self._prompt_of(messages)) if structured else None
            call = choose_tool(question, _tool_specs(tools), tool_required, answer)
            if call is not None:
                name, kwargs = call
                return ChatMessage(role=MessageRole.ASSISTANT, blocks=[
                    ToolCallBlock(tool_call_id=f"call-{name}-{len(messages)}", tool_name=name, tool_kwargs=kwargs)])
        return ChatMessage(role=MessageRole.ASSISTANT, content=self._chat_text(messages))

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg)
                            if isinstance(user_msg, str) else user_msg)
        return {"messages": messages, "tools": tools, "tool_required": tool_required, **kwargs}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        calls = [ToolSelection(tool_id=b.tool_call_id or "", tool_name=b.tool_name,
                               tool_kwargs=b.tool_kwargs if isinstance(b.tool_kwargs, dict) else {})
                 for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError(f"expert {self.name!r} made no tool call")
        return calls

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self._begin("chat")
        return ChatResponse(message=self._reply(messages, kwargs.get("tools"), kwargs.get("tool_required", False)))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self._begin("achat")
        return ChatResponse(message=self._reply(messages, kwargs.get("tools"), kwargs.get("tool_required", False)))

    def _stream(self, method: str, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        tools = kwargs.get("tools")
        if tools or self._tool_result(messages) is not None:
            # A tool call, or the answer after a tool result, arrives whole, as one chunk.
            self._begin(method)
            reply = self._reply(messages, tools, kwargs.get("tool_required", False))
            yield ChatResponse(message=reply, delta=reply.content or "")
            return
        yield from self._chat_stream(method, self._chat_text(messages))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream("stream_chat", messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _async(self._stream("astream_chat", messages, **kwargs))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._begin("complete")
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._begin("acomplete")
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completion_stream("stream_complete", prompt)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        return _async(self._completion_stream("astream_complete", prompt))
