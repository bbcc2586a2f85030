"""``RuleBasedFakeChatModel``: LangChain's face of the core's offline expert, for tests, examples and benchmarks.

Like LangChain's own ``FakeListChatModel`` and ``GenericFakeChatModel`` it needs no
network, no weights and no time; unlike them it answers what is asked, by the rules
of :class:`torouter.offline.OfflineExpert` (arithmetic, the context sentence that best
matches the question, tool calls with arguments read from the question). Here it
behaves like a provider chat model where LangChain looks: it streams word by word,
reports token usage (one token per word) and counts tokens the same way, honours stop
sequences, ``max_tokens`` and its context window (reported in its ``profile``), calls
bound tools, and answers through the schema tool of structured output
(``with_structured_output`` and ``create_agent``'s ``response_format``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import ContextOverflowError
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from torouter.data import content_text
from torouter.offline import OfflineExpert, ToolSpec, count_tokens, cut_answer, token_pieces

from .messages import messages_to_prompt

_CALL_KWARGS = frozenset({"tools", "tool_choice", "answer_tools", "max_tokens", "temperature", "stream"})


class RuleBasedFakeChatModel(BaseChatModel):
    """A deterministic offline chat model that answers by the rules of :class:`torouter.offline.OfflineExpert`.

    After a tool result it reports it; arithmetic on two numbers (``3 + 4``, ``12 times
    7``) is computed; a greeting is greeted back; otherwise the sentence of the
    conversation sharing the most words with the question is returned, or the model says
    it has no rule for the question. With tools bound it calls the tool named or best
    matched by the question (always when ``tool_choice`` forces a call). A per-call
    ``temperature`` is accepted, so routers can pass one on, and changes nothing.

    Structured output binds the schema as an *answer tool* (a bare schema: a Pydantic
    model, TypedDict or a tool without a function, as ``with_structured_output`` and
    ``create_agent``'s ``ToolStrategy`` bind it). When a call is forced, the model calls
    a matching ordinary tool first, and the answer tool when none matches or once a
    tool has answered.

    Example:
        ```python
        from langchain_torouter import RuleBasedFakeChatModel

        model = RuleBasedFakeChatModel(model="local-math")
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

    @property
    def expert(self) -> OfflineExpert:
        """The framework-free expert that writes this model's answers."""
        return OfflineExpert(name=self.model_name)

    def _resolve_model_profile(self) -> ModelProfile | None:
        # Read by LangChain agents: SummarizationMiddleware's fractional limits need the
        # context window; create_agent uses tool calling for structured output because
        # there is no native (provider) structured output here.
        return ModelProfile(max_input_tokens=self.max_input_tokens, text_inputs=True, text_outputs=True,
                            image_inputs=False, tool_calling=self.tool_calling, tool_choice=self.tool_calling,
                            tool_call_streaming=self.tool_calling, structured_output=False)

    def get_num_tokens(self, text: str) -> int:
        """Tokens as this model counts them in usage: one per word."""
        return count_tokens(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Input tokens of ``messages`` as reported in ``usage_metadata`` (the text of each message)."""
        return sum(count_tokens(content_text(m.content)) for m in messages)

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
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
        if not messages:
            raise ValueError(f"{type(self).__name__} needs at least one message")
        input_tokens = self.get_num_tokens_from_messages(messages)
        if input_tokens > self.max_input_tokens:
            raise ContextOverflowError(
                f"{self.model_name}: {input_tokens} input tokens exceed max_input_tokens={self.max_input_tokens}")
        metadata: dict[str, Any] = {"model_name": self.model_name, "model_provider": "local"}
        answer_tools = set(kwargs.get("answer_tools") or ())
        tools = [ToolSpec(t["function"]["name"], t["function"].get("description", ""),
                          t["function"].get("parameters") or {}, answers=t["function"]["name"] in answer_tools)
                 for t in kwargs.get("tools") or []]
        tool_choice = kwargs.get("tool_choice")
        reply = self.expert.reply(_prompt(messages), tools, _choice_name(tool_choice) or tool_choice)
        if reply.tool_call is not None:
            call = reply.tool_call
            output_tokens = count_tokens(json.dumps(call.arguments, ensure_ascii=False))
            return AIMessage(
                content="", tool_calls=[{"name": call.name, "args": call.arguments, "id": call.id, "type": "tool_call"}],
                response_metadata={**metadata, "finish_reason": "tool_calls"},
                usage_metadata=_usage(input_tokens, output_tokens))
        text, output_tokens, finish = cut_answer(reply.text, stop if stop is not None else (self.stop or []),
                                                 kwargs.get("max_tokens") or self.max_tokens)
        return AIMessage(
            content=text, response_metadata={**metadata, "finish_reason": finish},
            usage_metadata=_usage(input_tokens, output_tokens))


def _prompt(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages in the core's prompt format, tool results keeping their tool's name."""
    prompt = messages_to_prompt(messages)
    for entry, message in zip(prompt, messages, strict=True):
        if isinstance(message, ToolMessage) and message.name:
            entry["name"] = message.name
    return prompt


def _usage(input_tokens: int, output_tokens: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=input_tokens, output_tokens=output_tokens,
                         total_tokens=input_tokens + output_tokens)


def _chunks(message: AIMessage) -> Iterator[ChatGenerationChunk]:
    """A finished reply as stream chunks: one per word, tool arguments in two halves."""
    for token in token_pieces(message.content if isinstance(message.content, str) else ""):
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


def _choice_name(tool_choice: Any) -> str | None:
    """The tool a ``tool_choice`` names, if it names one (LangChain also takes OpenAI's dict form)."""
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


__all__ = ["RuleBasedFakeChatModel"]
