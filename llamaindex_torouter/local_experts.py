"""Deterministic offline expert LLMs, so examples and tests run with no model download or network.

They answer extractively: the sentence of the prompt that shares the most words with
the question, prefixed with ``[expert name]`` so a reader sees who answered.
``ExtractiveLLM`` is a completion model (chat goes through its prompt template);
``ExtractiveToolLLM`` is a chat model that also calls tools, filling numeric and
text arguments from the question. ``unavailable`` and ``break_mid_stream`` simulate
an expert that is down, to show fallbacks.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from has have how i in is it its of on or that the this to "
    "was what when where which who why with you your".split())


class ExpertUnavailableError(ConnectionError):
    """A simulated expert outage."""


def _words(text: str) -> set[str]:
    """Content words cut to a six-letter stem, so "multiplied" meets "multiply"."""
    return {w[:6] for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 1}


def _question(text: str) -> str:
    """The question in a prompt: its last line with a question mark, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    asked = [line for line in lines if "?" in line]
    return (asked or lines)[-1]


def extractive_answer(text: str) -> str:
    """The sentence of ``text`` sharing the most words with its question (ties: the earliest)."""
    question = _question(text)
    wanted = _words(question)
    at = text.rfind(question)
    body = text[:at] + text[at + len(question):] if question else text
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

    def _stream_texts(self, method: str, text: str) -> Generator[tuple[str, str], None, None]:
        """``(cumulative text, delta)`` pairs; an outage raises before the first one."""
        self._begin(method)
        so_far = ""
        for i, delta in enumerate(_chunks(self._answer(text))):
            if i == 1 and self.break_mid_stream:
                raise ExpertUnavailableError(f"expert {self.name!r} dropped the stream")
            so_far += delta
            yield so_far, delta


class ExtractiveLLM(_Extractive, CustomLLM):
    """A local completion model; chat reaches it through ``messages_to_prompt`` like any CustomLLM."""

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

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._begin("complete")
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            for text, delta in self._stream_texts("stream_complete", prompt):
                yield CompletionResponse(text=text, delta=delta)

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._begin("acomplete")
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        async def gen() -> CompletionResponseAsyncGen:
            for text, delta in self._stream_texts("astream_complete", prompt):
                yield CompletionResponse(text=text, delta=delta)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response = await self.acomplete(self.messages_to_prompt(messages), formatted=True, **kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        stream = await self.astream_complete(self.messages_to_prompt(messages), formatted=True, **kwargs)

        async def gen() -> ChatResponseAsyncGen:
            async for chunk in stream:
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=chunk.text),
                                   delta=chunk.delta)

        return gen()


class ExtractiveToolLLM(_Extractive, FunctionCallingLLM):
    """A local chat model with function calling.

    Given tools, it calls the one whose name and description share the most words with
    the question, filling number parameters with the question's numbers in order and
    text parameters with the question; after a tool result it answers with that result.
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

    def _reply(self, messages: Sequence[ChatMessage], tools: Sequence[BaseTool] | None,
               tool_required: bool) -> ChatMessage:
        if messages and messages[-1].role == MessageRole.TOOL:
            return ChatMessage(role=MessageRole.ASSISTANT, content=f"[{self.name}] {_message_text(messages[-1])}")
        users = [m for m in messages if m.role == MessageRole.USER]
        question = _question(_message_text(users[-1])) if users else ""
        if tools:
            call = self._pick_tool(question, tools, tool_required, len(messages))
            if call is not None:
                return ChatMessage(role=MessageRole.ASSISTANT, blocks=[call])
        return ChatMessage(role=MessageRole.ASSISTANT,
                           content=self._answer("\n".join(_message_text(m) for m in messages)))

    @staticmethod
    def _pick_tool(question: str, tools: Sequence[BaseTool], required: bool, turn: int) -> ToolCallBlock | None:
        wanted = _words(question)
        best, best_overlap = None, 0
        for tool in tools:
            meta = tool.metadata
            described = _words(meta.get_name().replace("_", " ") + " " + (meta.description or ""))
            overlap = len(wanted & described)
            if overlap > best_overlap or (best is None and required):
                best, best_overlap = tool, overlap
        if best is None:
            return None
        numbers = iter(_NUMBER.findall(question))
        kwargs: dict[str, Any] = {}
        schema = best.metadata.fn_schema
        for field_name, info in (schema.model_fields.items() if schema is not None else ()):
            if info.annotation in (int, float):
                value = next(numbers, None)
                if value is None:
                    if info.is_required():
                        return None
                    continue
                kwargs[field_name] = info.annotation(float(value))
            elif info.annotation is str:
                kwargs[field_name] = question
            elif info.is_required():
                return None
        name = best.metadata.get_name()
        return ToolCallBlock(tool_call_id=f"call-{name}-{turn}", tool_name=name, tool_kwargs=kwargs)

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
        if tools or (messages and messages[-1].role == MessageRole.TOOL):
            # A tool call or the answer after one arrives whole, as one chunk.
            self._begin(method)
            reply = self._reply(messages, tools, kwargs.get("tool_required", False))
            yield ChatResponse(message=reply, delta=reply.content or "")
            return
        text = "\n".join(_message_text(m) for m in messages)
        for so_far, delta in self._stream_texts(method, text):
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=so_far), delta=delta)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream("stream_chat", messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        chunks = self._stream("astream_chat", messages, **kwargs)

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            for chunk in chunks:
                yield chunk

        return gen()

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
        def gen() -> CompletionResponseGen:
            for text, delta in self._stream_texts("stream_complete", prompt):
                yield CompletionResponse(text=text, delta=delta)

        return gen()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        async def gen() -> CompletionResponseAsyncGen:
            for text, delta in self._stream_texts("astream_complete", prompt):
                yield CompletionResponse(text=text, delta=delta)

        return gen()
