"""``TORouterLLM``: a LlamaIndex LLM that sends each request to the expert LLM a trained router picks.

Which text is routed on, the cost-aware ranking and the fallback order all come from
``torouter.Controller`` and its fallback helpers; this module only adapts LlamaIndex
messages, responses, tool calls and instrumentation to them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

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
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection

from torouter.controller import (
    Controller,
    acall_with_fallbacks,
    astream_with_fallbacks,
    call_with_fallbacks,
    stream_with_fallbacks,
)
from torouter.policy import Decision
from torouter.routers import Router

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

dispatcher = get_dispatcher(__name__)

METADATA_KEY = "torouter"
# Per-call keyword arguments that steer routing; they are never passed on to an expert.
ROUTING_KWARGS = ("expert", "allowed", "cost_weight", "max_cost")


class RoutingDecisionEvent(BaseEvent):
    """One routing decision: the router's pick, the fallback order and the numbers behind it."""

    expert: str
    ranking: list[str]
    scores: dict[str, float]
    costs: dict[str, float]
    cost_weight: float
    max_cost: float | None = None
    forced: bool = False
    tools: bool = False

    @classmethod
    def class_name(cls) -> str:
        return "TORouterRoutingDecisionEvent"


class ExpertFallbackEvent(BaseEvent):
    """Experts earlier in the ranking failed before producing output and ``expert`` answered."""

    expert: str
    chosen: str
    failures: dict[str, str]

    @classmethod
    def class_name(cls) -> str:
        return "TORouterExpertFallbackEvent"


def supports_tools(llm: LLM) -> bool:
    """Whether an expert can take part in function calling."""
    return isinstance(llm, FunctionCallingLLM) and bool(llm.metadata.is_function_calling_model)


def _as_prompt(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as the core's ``[{"role", "content"}]`` prompt; only text blocks are kept."""
    prompt = []
    for message in messages:
        if not isinstance(message, ChatMessage):
            raise TypeError(f"expected llama_index ChatMessage objects, got {type(message).__name__}")
        role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
        if role == MessageRole.DEVELOPER.value:
            role = "system"
        text = "\n".join(b.text for b in message.blocks if isinstance(b, TextBlock) and b.text)
        prompt.append({"role": role, "content": text})
    return prompt


class TORouterLLM(FunctionCallingLLM):
    """An LLM that routes each request to the best expert for its quality/cost trade-off.

    Build it from ``experts`` (name -> LlamaIndex LLM, names matching the router's) and a
    trained router (object or saved directory). Every call asks the router for a
    ranking, delegates to the top expert and, if that expert fails before producing
    output, to the next one (``fallbacks=False`` turns this off). The decision is
    emitted as a ``RoutingDecisionEvent`` inside the call's instrumentation span and
    rides along in ``response.additional_kwargs["torouter"]`` (on every stream chunk)::

        {"expert": <who answered>, "chosen": <the router's pick>, "ranking": [...],
         "scores": {expert: predicted quality}, "cost_weight": ..., "max_cost": ...,
         "fallback": <True if the pick failed>, "failures": {expert: "Error: message"},
         "forced": <True if the caller named the expert>}

    Per call, ``expert="name"`` forces an expert, ``allowed=[...]`` narrows the choice,
    and ``cost_weight`` / ``max_cost`` override the defaults. Tool calls
    (``chat_with_tools``, ``predict_and_call``, agents) route among the experts that
    support function calling.
    """

    cost_weight: float = Field(default=0.0, ge=0.0, description="Utility is quality - cost_weight * cost.")
    max_cost: float | None = Field(default=None, description="Experts priced above this are skipped when possible.")
    route_on: Literal["last_user", "conversation"] = Field(
        default="last_user", description="Route on the latest user message or on every system and user message.")
    fallbacks: bool = Field(default=True, description="Try the next-best expert when the chosen one fails.")
    allowed: list[str] | None = Field(default=None, description="Experts this LLM may route to (default: all).")

    _controller: Controller = PrivateAttr()
    _experts: dict[str, LLM] = PrivateAttr()

    def __init__(
        self,
        experts: dict[str, LLM],
        router: Router | str | os.PathLike,
        cost_weight: float = 0.0,
        max_cost: float | None = None,
        route_on: Literal["last_user", "conversation"] = "last_user",
        fallbacks: bool = True,
        allowed: Iterable[str] | None = None,
        prices: dict[str, float] | None = None,
        callback_manager: CallbackManager | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(experts, dict) or not experts:
            raise ValueError("experts must be a non-empty dict mapping expert names to LlamaIndex LLMs")
        for name, llm in experts.items():
            if not isinstance(llm, LLM):
                raise TypeError(f"expert {name!r} must be a llama_index LLM, got {type(llm).__name__}")
        controller = Controller(router, cost_weight=cost_weight, max_cost=max_cost,
                                route_on=route_on, prices=prices)
        controller.check_experts(experts)
        if allowed is not None:
            allowed = list(allowed)
            unknown = set(allowed) - set(experts)
            if unknown:
                raise ValueError(f"allowed names unknown experts {sorted(unknown)}; experts are {sorted(experts)}")
            if not allowed:
                raise ValueError("allowed must name at least one expert")
        super().__init__(cost_weight=cost_weight, max_cost=max_cost, route_on=route_on, fallbacks=fallbacks,
                         allowed=allowed, callback_manager=callback_manager, **kwargs)
        self._controller = controller
        self._experts = dict(experts)

    @classmethod
    def class_name(cls) -> str:
        return "TORouterLLM"

    @property
    def experts(self) -> dict[str, LLM]:
        """The expert LLMs by name (a copy)."""
        return dict(self._experts)

    @property
    def controller(self) -> Controller:
        """The core controller that makes the routing decisions."""
        return self._controller

    def _in_play(self) -> list[str]:
        names = self._controller.experts
        return [n for n in names if n in self.allowed] if self.allowed is not None else names

    @property
    def metadata(self) -> LLMMetadata:
        """Limits every expert in play can honour: smallest context window, largest output reservation."""
        names = self._in_play()
        metas = [self._experts[n].metadata for n in names]
        return LLMMetadata(
            context_window=min(m.context_window for m in metas),
            num_output=max(m.num_output for m in metas),
            # Chat keeps the user turn separate, which is what the router reads; every
            # LlamaIndex LLM accepts chat, completion-only experts through their own template.
            is_chat_model=True,
            is_function_calling_model=any(supports_tools(self._experts[n]) for n in names),
            model_name="torouter[" + ",".join(names) + "]",
        )

    def to_payload(self) -> dict[str, Any]:
        return {**super().to_payload(), "experts": self._in_play(), "cost_weight": self.cost_weight,
                "max_cost": self.max_cost, "route_on": self.route_on, "fallbacks": self.fallbacks}

    # ---- routing -------------------------------------------------------------------

    def _candidates(self, tools: bool, expert: str | None, allowed: Iterable[str] | None) -> list[str] | None:
        """Experts this request may go to, or None for all of them."""
        names = self._in_play()
        if allowed is not None:
            allowed = set([allowed] if isinstance(allowed, str) else allowed)
            unknown = allowed - set(self._experts)
            if unknown:
                raise ValueError(f"allowed names unknown experts {sorted(unknown)}; "
                                 f"experts are {sorted(self._experts)}")
            names = [n for n in names if n in allowed]
        if expert is not None:
            if expert not in self._experts:
                raise ValueError(f"unknown expert {expert!r}; experts are {sorted(self._experts)}")
            if expert not in names:
                raise ValueError(f"expert {expert!r} is not allowed for this request (allowed: {names})")
            names = [expert]
        if tools:
            capable = [n for n in names if supports_tools(self._experts[n])]
            if not capable:
                which = f"expert {expert!r} does" if expert is not None else f"none of the experts {names} do"
                raise ValueError(f"tool calling needs a FunctionCallingLLM expert, and {which} not support it")
            names = capable
        if not names:
            raise ValueError("no expert is allowed for this request")
        return names if len(names) < len(self._experts) else None

    def _prompt(self, prompt: str | Sequence[ChatMessage]) -> str | list[dict[str, Any]]:
        if isinstance(prompt, str):
            return prompt
        if not prompt:
            raise ValueError("TORouterLLM got an empty message list: there is nothing to route on")
        return _as_prompt(prompt)

    def _emit_decision(self, decision: Decision, forced: bool, tools: bool) -> None:
        dispatcher.event(RoutingDecisionEvent(
            expert=decision.expert, ranking=list(decision.ranking), scores=dict(decision.scores),
            costs=dict(decision.costs), cost_weight=decision.cost_weight, max_cost=decision.max_cost,
            forced=forced, tools=tools))

    @dispatcher.span
    def route(self, prompt: str | Sequence[ChatMessage], tools: bool = False, expert: str | None = None,
              allowed: Iterable[str] | None = None, cost_weight: float | None = None,
              max_cost: float | None = None) -> Decision:
        """Decide which expert would answer ``prompt`` (and in which order the others would follow)."""
        candidates = self._candidates(tools, expert, allowed)
        decision = self._controller.decide(self._prompt(prompt), allowed=candidates,
                                           cost_weight=cost_weight, max_cost=max_cost)
        self._emit_decision(decision, expert is not None, tools)
        return decision

    @dispatcher.span
    async def aroute(self, prompt: str | Sequence[ChatMessage], tools: bool = False, expert: str | None = None,
                     allowed: Iterable[str] | None = None, cost_weight: float | None = None,
                     max_cost: float | None = None) -> Decision:
        """``route`` with router inference in a worker thread, off the event loop."""
        candidates = self._candidates(tools, expert, allowed)
        decision = await self._controller.adecide(self._prompt(prompt), allowed=candidates,
                                                  cost_weight=cost_weight, max_cost=max_cost)
        self._emit_decision(decision, expert is not None, tools)
        return decision

    @staticmethod
    def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """Routing options, tools (or None) and what is left for the expert."""
        rest = dict(kwargs)
        routing = {k: rest.pop(k) for k in ROUTING_KWARGS if k in rest}
        return routing, rest.pop("tools", None), rest

    def _outcome(self, decision: Decision, expert: str, failures: dict[str, BaseException],
                 forced: bool) -> dict[str, Any]:
        """The routing metadata a response carries; emits a fallback event when one happened."""
        meta = decision.outcome(expert, failures, forced)
        if meta["failures"]:
            dispatcher.event(ExpertFallbackEvent(expert=expert, chosen=decision.expert, failures=meta["failures"]))
        return meta

    # ---- chat ----------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        routing, tools, rest = self._split_kwargs(kwargs)
        decision = self.route(messages, tools=tools is not None, **routing)

        def call(name: str) -> ChatResponse:
            llm = self._experts[name]
            if tools is not None:
                return llm.chat_with_tools(tools, chat_history=list(messages), **rest)
            return llm.chat(messages, **rest)

        name, response, failures = call_with_fallbacks(decision.ranking, call, self.fallbacks)
        response.additional_kwargs[METADATA_KEY] = self._outcome(decision, name, failures, "expert" in routing)
        return response

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        routing, tools, rest = self._split_kwargs(kwargs)
        decision = await self.aroute(messages, tools=tools is not None, **routing)

        async def call(name: str) -> ChatResponse:
            llm = self._experts[name]
            if tools is not None:
                return await llm.achat_with_tools(tools, chat_history=list(messages), **rest)
            return await llm.achat(messages, **rest)

        name, response, failures = await acall_with_fallbacks(decision.ranking, call, self.fallbacks)
        response.additional_kwargs[METADATA_KEY] = self._outcome(decision, name, failures, "expert" in routing)
        return response

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        routing, tools, rest = self._split_kwargs(kwargs)
        decision = self.route(messages, tools=tools is not None, **routing)

        def start(name: str) -> Iterator[ChatResponse]:
            llm = self._experts[name]
            if tools is not None:
                return llm.stream_chat_with_tools(tools, chat_history=list(messages), **rest)
            return llm.stream_chat(messages, **rest)

        return self._tagged_stream(decision, stream_with_fallbacks(decision.ranking, start, self.fallbacks),
                                   "expert" in routing)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        routing, tools, rest = self._split_kwargs(kwargs)
        decision = await self.aroute(messages, tools=tools is not None, **routing)

        async def start(name: str) -> AsyncIterator[ChatResponse]:
            llm = self._experts[name]
            if tools is not None:
                stream = await llm.astream_chat_with_tools(tools, chat_history=list(messages), **rest)
            else:
                stream = await llm.astream_chat(messages, **rest)
            async for chunk in stream:
                yield chunk

        return self._atagged_stream(decision, astream_with_fallbacks(decision.ranking, start, self.fallbacks),
                                    "expert" in routing)

    def _tagged_stream(self, decision: Decision, chunks: Iterator, forced: bool) -> Iterator:
        outcome = None
        for name, chunk, failures in chunks:
            if outcome is None:
                outcome = self._outcome(decision, name, failures, forced)
            chunk.additional_kwargs[METADATA_KEY] = outcome
            yield chunk

    async def _atagged_stream(self, decision: Decision, chunks: AsyncIterator, forced: bool) -> AsyncIterator:
        outcome = None
        async for name, chunk, failures in chunks:
            if outcome is None:
                outcome = self._outcome(decision, name, failures, forced)
            chunk.additional_kwargs[METADATA_KEY] = outcome
            yield chunk

    # ---- completion ----------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        routing, _, rest = self._split_kwargs(kwargs)
        decision = self.route(prompt, **routing)
        name, response, failures = call_with_fallbacks(
            decision.ranking, lambda n: self._experts[n].complete(prompt, formatted=formatted, **rest),
            self.fallbacks)
        response.additional_kwargs[METADATA_KEY] = self._outcome(decision, name, failures, "expert" in routing)
        return response

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        routing, _, rest = self._split_kwargs(kwargs)
        decision = await self.aroute(prompt, **routing)

        async def call(name: str) -> CompletionResponse:
            return await self._experts[name].acomplete(prompt, formatted=formatted, **rest)

        name, response, failures = await acall_with_fallbacks(decision.ranking, call, self.fallbacks)
        response.additional_kwargs[METADATA_KEY] = self._outcome(decision, name, failures, "expert" in routing)
        return response

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        routing, _, rest = self._split_kwargs(kwargs)
        decision = self.route(prompt, **routing)
        chunks = stream_with_fallbacks(
            decision.ranking, lambda n: self._experts[n].stream_complete(prompt, formatted=formatted, **rest),
            self.fallbacks)
        return self._tagged_stream(decision, chunks, "expert" in routing)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        routing, _, rest = self._split_kwargs(kwargs)
        decision = await self.aroute(prompt, **routing)

        async def start(name: str) -> AsyncIterator[CompletionResponse]:
            stream = await self._experts[name].astream_complete(prompt, formatted=formatted, **rest)
            async for chunk in stream:
                yield chunk

        return self._atagged_stream(decision, astream_with_fallbacks(decision.ranking, start, self.fallbacks),
                                    "expert" in routing)

    # ---- function calling ----------------------------------------------------------

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
        """Keep tools unformatted: each expert formats them its own way once the router has picked it."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg)
                            if isinstance(user_msg, str) else user_msg)
        return {"messages": messages, "tools": list(tools), "verbose": verbose,
                "allow_parallel_tool_calls": allow_parallel_tool_calls, "tool_required": tool_required,
                **kwargs}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        """Parse tool calls with the expert that produced ``response``, since formats differ."""
        routed = response.additional_kwargs.get(METADATA_KEY)
        name = routed.get("expert") if isinstance(routed, dict) else None
        if name is None:
            if error_on_no_tool_call:
                raise ValueError("the response carries no TORouterLLM routing metadata, so the expert "
                                 "that wrote its tool calls is unknown")
            return []
        if name not in self._experts:
            raise ValueError(f"the response names expert {name!r}, which this TORouterLLM does not have")
        return self._experts[name].get_tool_calls_from_response(
            response, error_on_no_tool_call=error_on_no_tool_call, **kwargs)
