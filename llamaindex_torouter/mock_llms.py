"""LlamaIndex's faces of the core's offline expert, so examples and tests run with no model download or network.

Like LlamaIndex's own ``MockLLM`` and ``MockFunctionCallingLLM`` they need no network
and no weights; unlike them they answer what is asked, by the rules of
:class:`torouter.offline.OfflineExpert` (the sentence of the prompt that best matches
the question, arithmetic, tool calls with arguments read from the question), signed
``[expert name]`` so a reader sees who answered. The question is found the way the
router finds it (inside RAG templates, past LlamaIndex's wrapper prompts).

``RuleBasedMockLLM`` is a completion model whose chat goes through its prompt template;
``RuleBasedMockFunctionCallingLLM`` is a chat model that also calls tools. Both take
part in agents: in ReAct they answer in its format (an action for the tool that fits,
then the last observation as the answer); with function calling the tool call arrives
as a ``ToolCallBlock`` and, after a tool result, the answer is that result; structured
output (``structured_predict``, ``as_structured_llm``) calls the one required schema
tool with the answer; ``AgentWorkflow`` hand-offs go to the agent whose description
fits the question. ``unavailable`` and ``break_mid_stream`` simulate an expert that is
down, to show fallbacks.
"""

from __future__ import annotations

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
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection

from torouter.offline import OfflineExpert, ToolSpec, token_pieces

from .templates import question_in_template
from .utils import message_text

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool


class ExpertUnavailableError(ConnectionError):
    """A simulated expert outage."""


def _prompt(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages in the core's prompt format; a tool result is named after the call it answers."""
    called = {b.tool_call_id: b.tool_name for m in messages for b in m.blocks if isinstance(b, ToolCallBlock)}
    prompt = []
    for message in messages:
        entry: dict[str, Any] = {"role": str(getattr(message.role, "value", message.role)),
                                 "content": message_text(message)}
        if message.role == MessageRole.TOOL:
            name = message.additional_kwargs.get("name") or called.get(message.additional_kwargs.get("tool_call_id"))
            if name:
                entry["name"] = name
        prompt.append(entry)
    return prompt


def _tool_specs(tools: Sequence[BaseTool], structured: bool) -> list[ToolSpec]:
    return [ToolSpec(t.metadata.get_name(), t.metadata.description or "", t.metadata.get_parameters_dict(),
                     answers=structured) for t in tools]


async def _async(chunks: Iterator[Any]) -> AsyncGenerator[Any, None]:
    for chunk in chunks:
        yield chunk


class _RuleBasedMock(LLM):
    """What both faces share: the expert, its settings, the call log and the simulated outages."""

    name: str = Field(default="rule-based", description="Expert name, shown in its answers.")
    context_window: int = Field(default=4096, gt=0)
    num_output: int = Field(default=256, gt=0)
    unavailable: bool = Field(default=False, description="Fail every call before producing output.")
    break_mid_stream: bool = Field(default=False, description="Fail streams after their first chunk.")
    _calls: list[str] = PrivateAttr(default_factory=list)

    @property
    def metadata(self) -> LLMMetadata:
        chat = isinstance(self, FunctionCallingLLM)
        return LLMMetadata(context_window=self.context_window, num_output=self.num_output,
                           is_chat_model=chat, is_function_calling_model=chat, model_name=self.name)

    @property
    def expert(self) -> OfflineExpert:
        """The framework-free expert that writes this model's answers."""
        return OfflineExpert(name=self.name, signed=True, unwrap=question_in_template)

    @property
    def calls(self) -> list[str]:
        """Names of the methods called so far, in order (to see how a request was served)."""
        return list(self._calls)

    def _begin(self, method: str) -> None:
        self._calls.append(method)
        if self.unavailable:
            raise ExpertUnavailableError(f"expert {self.name!r} is unavailable")

    def _answer(self, prompt: str) -> str:
        return self.expert.answer(prompt)

    def _chat_text(self, messages: Sequence[ChatMessage]) -> str:
        reply = self.expert.reply(_prompt(messages))
        return reply.text

    def _stream_texts(self, method: str, text: str) -> Generator[tuple[str, str], None, None]:
        """``(cumulative text, delta)`` pairs, one per word; an outage raises before the first one."""
        self._begin(method)
        so_far = ""
        for i, delta in enumerate(token_pieces(text) or [text]):
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

    # Completion is the same for both faces: the answer to the prompt as a whole.

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


class RuleBasedMockLLM(_RuleBasedMock, CustomLLM):
    """A local completion model; chat is answered from ``messages_to_prompt`` like any CustomLLM's."""

    name: str = Field(default="extractive", description="Expert name, shown in its answers.")

    @classmethod
    def class_name(cls) -> str:
        return "RuleBasedMockLLM"

    def _chat_text(self, messages: Sequence[ChatMessage]) -> str:
        # A ReAct step reads the messages; an answer reads the prompt they make, as a completion model would.
        react = self.expert.react(_prompt(messages))
        if react is not None:
            return react
        return self._answer((self.messages_to_prompt or generic_messages_to_prompt)(messages))

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


class RuleBasedMockFunctionCallingLLM(_RuleBasedMock, FunctionCallingLLM):
    """A local chat model with function calling.

    Given tools, it calls the one that fits the question; after a tool result it answers
    with that result. Given exactly one tool that it must call (structured output), it
    fills the tool's text fields with its answer.
    """

    name: str = Field(default="extractive-tools", description="Expert name, shown in its answers.")
    context_window: int = Field(default=8192, gt=0)

    @classmethod
    def class_name(cls) -> str:
        return "RuleBasedMockFunctionCallingLLM"

    def _reply(self, messages: Sequence[ChatMessage], tools: Sequence[BaseTool] | None,
               tool_required: bool) -> ChatMessage:
        # LlamaIndex asks for structured output as one tool that must be called.
        structured = bool(tools) and tool_required and len(tools) == 1
        reply = self.expert.reply(_prompt(messages), _tool_specs(tools or [], structured),
                                  "required" if tool_required else "auto")
        if reply.tool_call is None:
            return ChatMessage(role=MessageRole.ASSISTANT, content=reply.text)
        call = reply.tool_call
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=[
            ToolCallBlock(tool_call_id=call.id, tool_name=call.name, tool_kwargs=call.arguments)])

    def _prepare_chat_with_tools(self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
                                 chat_history: list[ChatMessage] | None = None, tool_required: bool = False,
                                 **kwargs: Any) -> dict[str, Any]:
        """The chat arguments for ``tools``: they stay unformatted, the expert reads their schemas.

        ``verbose`` and ``allow_parallel_tool_calls`` pass through unread: at most one tool is called a turn.
        """
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        history = list(chat_history or [])
        return {"messages": history if user_msg is None else [*history, user_msg], "tools": tools,
                "tool_required": tool_required, **kwargs}

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
        if tools or self.expert.tool_result(_prompt(messages)) is not None:
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


__all__ = ["ExpertUnavailableError", "RuleBasedMockFunctionCallingLLM", "RuleBasedMockLLM"]
