"""``TORouterLLM``: a LlamaIndex LLM that sends each request to the expert LLM a trained router picks.

Who may answer, which text is routed on, the cost-aware ranking, the prediction cache
and the fallback order all come from ``torouter.Controller`` and its fallback helpers;
this module adapts LlamaIndex's calls, responses and tool calls to them. Message
conversion is in ``utils``, the callback manager in ``callbacks``, the
instrumentation events in ``events``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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
)
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr, field_serializer
from llama_index.core.callbacks import CallbackManager
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import LLMPredictEndEvent, LLMPredictStartEvent
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import (
    LLM,
    ToolSelection,
    astream_chat_response_to_tokens,
    stream_chat_response_to_tokens,
)
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.types import TokenAsyncGen, TokenGen

from torouter.capture import as_capture
from torouter.controller import (
    Controller,
    acall_with_fallbacks,
    astream_with_fallbacks,
    call_with_fallbacks,
    check_cost_options,
    stream_with_fallbacks,
)
from torouter.policy import METADATA_KEY, Decision
from torouter.routers import Router
from torouter.routing_text import ROUTE_ON, RouteOnMode

from .callbacks import RoutedCallbackManager
from .events import ExpertFallbackEvent, RoutingDecisionEvent
from .templates import query_of, template_prompt
from .utils import messages_to_prompt, query_prompt, supports_tools, without_metadata

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

dispatcher = get_dispatcher(__name__)

# Per-call keyword arguments that steer routing; they are never passed on to an expert.
ROUTING_KWARGS = ("expert", "allowed", "cost_weight", "max_cost", "route_prompt")
# Settings that can be changed on a built TORouterLLM; each is checked and takes effect at once.
LIVE_SETTINGS = ("cost_weight", "max_cost", "route_on", "default_expert", "sticky", "fallbacks", "allowed")

RouteOnSetting = RouteOnMode | Callable[..., str]

# Routing options set for a block of code by ``TORouterLLM.routing_options``, by router id.
_SCOPED_OPTIONS: ContextVar[Mapping[int, Mapping[str, Any]] | None] = ContextVar("torouter_routing_options",
                                                                                 default=None)


def _scoped() -> Mapping[int, Mapping[str, Any]]:
    return _SCOPED_OPTIONS.get() or {}


class TORouterLLM(FunctionCallingLLM):
    """An LLM that routes each request to the best expert for its quality/cost trade-off.

    Build it from ``experts`` (name -> LlamaIndex LLM, names matching the router's) and a
    trained router (object or saved directory). Every call asks the router for a
    ranking, delegates to the top expert and, if that expert fails before producing
    output, to the next one (``fallbacks=False`` turns this off). The decision is
    emitted as a ``RoutingDecisionEvent`` inside the call's instrumentation span and
    rides along on the response: ``response.message.additional_kwargs["torouter"]``
    (so agents' ``AgentOutput.response`` carries it), ``response.additional_kwargs``
    and, where the expert's ``raw`` is empty or a dict, ``raw["torouter"]`` (so
    ``AgentStream.raw`` does too)::

        {"expert": <who answered>, "chosen": <the router's pick>, "ranking": [...],
         "scores": {expert: predicted quality}, "cost_weight": ..., "max_cost": ...,
         "fallback": <True if the pick failed>, "failures": {expert: "Error: message"},
         "forced": <True if the caller named the expert>}

    What the router reads: ``route_on`` picks it from the messages (see
    ``torouter.routing_text``: tool results, ReAct observations and summaries are
    skipped, and the question is taken out of RAG templates). When LlamaIndex fills a
    prompt template whose arguments hold the query (``query_str``, or ``question`` in
    condense prompts), as query engines, response synthesizers and chat engines do, the
    router reads that query instead of the filled template.

    With ``sticky`` (default), predictions are cached by routed text, so every step of
    an agent run within one user turn gets the same decision for one router call.

    Per call, ``expert="name"`` forces an expert, ``allowed=[...]`` narrows the choice,
    ``cost_weight`` / ``max_cost`` override the defaults and ``route_prompt`` (a string
    or messages) is read by the router instead of the request; ``routing_options()``
    sets the same for every call in a block, e.g. a whole query or agent run. Tool calls
    (``chat_with_tools``, ``predict_and_call``, structured output, agents) route among
    the experts that support function calling. The settings in ``LIVE_SETTINGS`` can be
    assigned on a built instance and are checked on assignment.
    """

    cost_weight: float = Field(default=0.0, ge=0.0, description="Utility is quality - cost_weight * cost.")
    max_cost: float | None = Field(default=None, description="Experts priced above this are skipped when possible.")
    route_on: RouteOnSetting = Field(
        default="last_user",
        description="Route on the latest user turn, the last few user turns (recent_user), the system prompt "
                    "and every user turn (conversation), or the text a callable returns for the prompt.")
    default_expert: str | None = Field(
        default=None, description="Expert that goes first when a request has no text to route on.")
    sticky: bool = Field(
        default=True, description="Cache predictions by routed text, so an agent's steps within one user turn "
                                  "share one decision; False predicts afresh for every call.")
    fallbacks: bool = Field(default=True, description="Try the next-best expert when the chosen one fails.")
    allowed: list[str] | None = Field(default=None, description="Experts this LLM may route to (default: all).")
    capture: Any = Field(default=None, exclude=True,
                         description="A torouter.capture.PromptCapture (or a file path) recording each routed "
                                     "prompt for training a router on this application's traffic (opt-in).")

    _controller: Controller = PrivateAttr()
    _experts: dict[str, LLM] = PrivateAttr()
    _cache_size: int = PrivateAttr()

    def __init__(
        self,
        experts: dict[str, LLM],
        router: Router | str | os.PathLike,
        cost_weight: float = 0.0,
        max_cost: float | None = None,
        route_on: RouteOnSetting = "last_user",
        fallbacks: bool = True,
        allowed: Iterable[str] | None = None,
        prices: dict[str, float] | None = None,
        default_expert: str | None = None,
        sticky: bool = True,
        callback_manager: CallbackManager | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(experts, dict) or not experts:
            raise ValueError("experts must be a non-empty dict mapping expert names to LlamaIndex LLMs")
        for name, llm in experts.items():
            if not isinstance(llm, LLM):
                raise TypeError(f"expert {name!r} must be a llama_index LLM, got {type(llm).__name__}")
        controller = Controller(router, cost_weight=cost_weight, max_cost=max_cost, route_on=route_on,
                                prices=prices, default_expert=default_expert)
        controller.check_experts(experts)
        allowed = _checked_allowed(allowed, experts)
        _check_bool("sticky", sticky)
        _check_bool("fallbacks", fallbacks)
        cache_size = controller.cache_size
        if not sticky:
            controller.cache_size = 0
        if "capture" in kwargs:
            kwargs["capture"] = as_capture(kwargs["capture"], source="llamaindex")
        super().__init__(cost_weight=cost_weight, max_cost=max_cost, route_on=route_on, fallbacks=fallbacks,
                         allowed=allowed, default_expert=default_expert, sticky=sticky,
                         callback_manager=callback_manager, **kwargs)
        self._controller = controller
        self._experts = dict(experts)
        self._cache_size = cache_size
        self.callback_manager = self.callback_manager  # through __setattr__: one LLM event per call

    @classmethod
    def class_name(cls) -> str:
        return "TORouterLLM"

    # ---- settings ------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "callback_manager" and isinstance(value, CallbackManager):
            if isinstance(value, RoutedCallbackManager):
                value = value if value._llm is self else RoutedCallbackManager(value.inner, self)
            else:
                value = RoutedCallbackManager(value, self)
        elif name in LIVE_SETTINGS and "_controller" in (getattr(self, "__pydantic_private__", None) or {}):
            value = self._apply_setting(name, value)
        super().__setattr__(name, value)

    def _apply_setting(self, name: str, value: Any) -> Any:
        """Check a setting assigned after construction and hand it to the controller."""
        controller = self._controller
        if name == "cost_weight":
            check_cost_options(value, self.max_cost)
            controller.cost_weight = value
        elif name == "max_cost":
            check_cost_options(self.cost_weight, value)
            controller.max_cost = value
        elif name == "route_on":
            if not callable(value) and value not in ROUTE_ON:
                raise ValueError(f"route_on must be one of {ROUTE_ON} or a callable, not {value!r}")
            controller.route_on = value
        elif name == "default_expert":
            if value is not None and value not in self._experts:
                raise ValueError(f"default_expert={value!r} is not one of the experts {sorted(self._experts)}")
            controller.default_expert = value
        elif name == "sticky":
            _check_bool("sticky", value)
            controller.cache_size = self._cache_size if value else 0
            if not value:
                controller.clear_cache()
        elif name == "fallbacks":
            _check_bool("fallbacks", value)
        elif name == "allowed":
            value = _checked_allowed(value, self._experts)
        return value

    @field_serializer("route_on")
    def _serialize_route_on(self, value: RouteOnSetting) -> str:
        if callable(value):
            return f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}>"
        return value

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> TORouterLLM:
        """Rebuild from ``to_dict()`` settings; the experts and the router must be passed again.

        Serialized settings cannot hold the experts (LLM objects, whose credentials are
        left out of serialization) or the trained router, so both are keyword arguments:
        ``TORouterLLM.from_dict(data, experts={...}, router="runs/router")``.
        """
        missing = [k for k in ("experts", "router") if k not in kwargs]
        if missing:
            raise ValueError(
                f"TORouterLLM.from_dict/from_json need {' and '.join(missing)} as keyword arguments: serialized "
                "settings hold neither the expert LLMs (their credentials are never serialized) nor the trained "
                "router; call TORouterLLM.from_json(text, experts={...}, router=<Router or saved directory>)")
        data = dict(data)
        name = data.pop("class_name", cls.class_name())
        if name != cls.class_name():
            raise ValueError(f"these settings are for {name!r}, not {cls.class_name()!r}")
        route_on = data.get("route_on")
        if isinstance(route_on, str) and route_on.startswith("<callable") and "route_on" not in kwargs:
            raise ValueError(f"route_on was the callable {route_on[10:-1]!r}, which cannot be serialized; "
                             "pass route_on= again")
        return cls(**{**data, **kwargs})

    @classmethod
    def from_json(cls, data_str: str, **kwargs: Any) -> TORouterLLM:
        """``from_dict`` on ``to_json()`` text; ``experts=`` and ``router=`` must be passed again."""
        import json

        return cls.from_dict(json.loads(data_str), **kwargs)

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
        route_on = self._serialize_route_on(self.route_on)
        return {**super().to_payload(), "experts": self._in_play(), "cost_weight": self.cost_weight,
                "max_cost": self.max_cost, "route_on": route_on, "fallbacks": self.fallbacks,
                "default_expert": self.default_expert, "sticky": self.sticky}

    # ---- routing -------------------------------------------------------------------

    @contextmanager
    def routing_options(self, *, expert: str | None = None, allowed: Iterable[str] | None = None,
                        cost_weight: float | None = None, max_cost: float | None = None) -> Iterator[TORouterLLM]:
        """Route every call made inside the ``with`` block with these options.

        For calls whose arguments LlamaIndex makes (query and chat engines, agents)::

            with llm.routing_options(cost_weight=200):
                engine.query("...")          # every LLM call of this query
            with llm.routing_options(expert="cloud-large"):
                await agent.run("...")       # the whole agent run

        Options passed to a call directly win; blocks nest. The block follows the
        context, so tasks started inside it (an agent run's steps) keep the options.
        """
        options: dict[str, Any] = {k: v for k, v in (("expert", expert), ("cost_weight", cost_weight),
                                                     ("max_cost", max_cost)) if v is not None}
        if allowed is not None:
            options["allowed"] = [allowed] if isinstance(allowed, str) else list(allowed)
        merged = {**_scoped().get(id(self), {}), **options}
        self._controller.eligible(merged.get("expert"), merged.get("allowed"), self._unable(False))
        check_cost_options(merged.get("cost_weight", self.cost_weight), merged.get("max_cost", self.max_cost))
        token = _SCOPED_OPTIONS.set({**_scoped(), id(self): merged})
        try:
            yield self
        finally:
            _SCOPED_OPTIONS.reset(token)

    def _unable(self, tools: bool) -> dict[str, str]:
        """Experts that cannot take this request, and why: outside ``allowed``, or unable to call tools.

        The core's ``Controller.eligible`` decides from these (with a call's ``expert`` and
        ``allowed``) who may answer, and says why when nobody may.
        """
        unable = {}
        if self.allowed is not None:
            unable = {n: f"not among this LLM's allowed experts {self.allowed}"
                      for n in self._controller.experts if n not in self.allowed}
        if tools:
            for name in self._controller.experts:
                if name not in unable and not supports_tools(self._experts[name]):
                    unable[name] = "tool calling needs a FunctionCallingLLM expert, and it is not one"
        return unable

    def _prompt(self, prompt: str | Sequence[ChatMessage]) -> str | list[dict[str, Any]]:
        if isinstance(prompt, str):
            turns = template_prompt(prompt)
            return prompt if turns is None else turns
        if not prompt:
            raise ValueError("TORouterLLM got an empty message list: there is nothing to route on")
        return messages_to_prompt(prompt)

    def _emit_decision(self, decision: Decision, forced: bool, tools: bool) -> None:
        dispatcher.event(RoutingDecisionEvent(
            expert=decision.expert, ranking=list(decision.ranking), scores=dict(decision.scores),
            costs=dict(decision.costs), cost_weight=decision.cost_weight, max_cost=decision.max_cost,
            forced=forced, tools=tools, routed_text=decision.routed_text))

    @dispatcher.span
    def route(self, prompt: str | Sequence[ChatMessage], tools: bool = False, expert: str | None = None,
              allowed: Iterable[str] | None = None, cost_weight: float | None = None,
              max_cost: float | None = None) -> Decision:
        """Decide which expert would answer ``prompt`` (and in which order the others would follow)."""
        routed = self._prompt(prompt)
        decision = self._controller.decide(routed, allowed, expert=expert, unable=self._unable(tools),
                                           cost_weight=cost_weight, max_cost=max_cost)
        self._emit_decision(decision, expert is not None, tools)
        if self.capture is not None:
            self.capture.record(routed, decision, source="llamaindex")
        return decision

    @dispatcher.span
    async def aroute(self, prompt: str | Sequence[ChatMessage], tools: bool = False, expert: str | None = None,
                     allowed: Iterable[str] | None = None, cost_weight: float | None = None,
                     max_cost: float | None = None) -> Decision:
        """``route`` with router inference in a worker thread, off the event loop."""
        routed = self._prompt(prompt)
        decision = await self._controller.adecide(routed, allowed, expert=expert, unable=self._unable(tools),
                                                  cost_weight=cost_weight, max_cost=max_cost)
        self._emit_decision(decision, expert is not None, tools)
        if self.capture is not None:
            self.capture.record(routed, decision, source="llamaindex")
        return decision

    def _split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any, dict[str, Any], Any]:
        """Routing options (block options under call options), tools (or None), what is left for the
        expert, and the prompt to route on instead of the request (or None)."""
        rest = dict(kwargs)
        routing = {**_scoped().get(id(self), {}),
                   **{k: rest.pop(k) for k in ROUTING_KWARGS if k in rest}}
        route_prompt = routing.pop("route_prompt", None)
        return routing, rest.pop("tools", None), rest, route_prompt

    def _outcome(self, decision: Decision, expert: str, failures: dict[str, BaseException],
                 forced: bool) -> dict[str, Any]:
        """The routing metadata a response carries; emits a fallback event when one happened."""
        meta = decision.outcome(expert, failures, forced)
        if meta["failures"]:
            dispatcher.event(ExpertFallbackEvent(expert=expert, chosen=decision.expert, failures=meta["failures"]))
        return meta

    @staticmethod
    def _tag(response: ChatResponse | CompletionResponse, outcome: dict[str, Any]) -> None:
        """Put the decision everywhere LlamaIndex passes a response's details on."""
        response.additional_kwargs[METADATA_KEY] = outcome
        message = getattr(response, "message", None)
        if isinstance(message, ChatMessage):
            message.additional_kwargs[METADATA_KEY] = outcome
        if response.raw is None:
            response.raw = {METADATA_KEY: outcome}
        elif isinstance(response.raw, dict):
            response.raw = {**response.raw, METADATA_KEY: outcome}

    # ---- chat ----------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        routing, tools, rest, route_prompt = self._split_kwargs(kwargs)
        decision = self.route(messages if route_prompt is None else route_prompt, tools=tools is not None, **routing)
        messages = without_metadata(messages)

        def call(name: str) -> ChatResponse:
            llm = self._experts[name]
            if tools is not None:
                return llm.chat_with_tools(tools, chat_history=list(messages), **rest)
            return llm.chat(messages, **rest)

        name, response, failures = call_with_fallbacks(decision.ranking, call, self.fallbacks)
        self._tag(response, self._outcome(decision, name, failures, "expert" in routing))
        return response

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        routing, tools, rest, route_prompt = self._split_kwargs(kwargs)
        decision = await self.aroute(messages if route_prompt is None else route_prompt,
                                     tools=tools is not None, **routing)
        messages = without_metadata(messages)

        async def call(name: str) -> ChatResponse:
            llm = self._experts[name]
            if tools is not None:
                return await llm.achat_with_tools(tools, chat_history=list(messages), **rest)
            return await llm.achat(messages, **rest)

        name, response, failures = await acall_with_fallbacks(decision.ranking, call, self.fallbacks)
        self._tag(response, self._outcome(decision, name, failures, "expert" in routing))
        return response

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        routing, tools, rest, route_prompt = self._split_kwargs(kwargs)
        decision = self.route(messages if route_prompt is None else route_prompt, tools=tools is not None, **routing)
        messages = without_metadata(messages)

        def start(name: str) -> Iterator[ChatResponse]:
            llm = self._experts[name]
            if tools is not None:
                return llm.stream_chat_with_tools(tools, chat_history=list(messages), **rest)
            return llm.stream_chat(messages, **rest)

        return self._tagged_stream(decision, stream_with_fallbacks(decision.ranking, start, self.fallbacks),
                                   "expert" in routing)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        routing, tools, rest, route_prompt = self._split_kwargs(kwargs)
        decision = await self.aroute(messages if route_prompt is None else route_prompt,
                                     tools=tools is not None, **routing)
        messages = without_metadata(messages)

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
            self._tag(chunk, outcome)
            yield chunk

    async def _atagged_stream(self, decision: Decision, chunks: AsyncIterator, forced: bool) -> AsyncIterator:
        outcome = None
        async for name, chunk, failures in chunks:
            if outcome is None:
                outcome = self._outcome(decision, name, failures, forced)
            self._tag(chunk, outcome)
            yield chunk

    # ---- completion ----------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        routing, _, rest, route_prompt = self._split_kwargs(kwargs)
        decision = self.route(prompt if route_prompt is None else route_prompt, **routing)
        name, response, failures = call_with_fallbacks(
            decision.ranking, lambda n: self._experts[n].complete(prompt, formatted=formatted, **rest),
            self.fallbacks)
        self._tag(response, self._outcome(decision, name, failures, "expert" in routing))
        return response

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        routing, _, rest, route_prompt = self._split_kwargs(kwargs)
        decision = await self.aroute(prompt if route_prompt is None else route_prompt, **routing)

        async def call(name: str) -> CompletionResponse:
            return await self._experts[name].acomplete(prompt, formatted=formatted, **rest)

        name, response, failures = await acall_with_fallbacks(decision.ranking, call, self.fallbacks)
        self._tag(response, self._outcome(decision, name, failures, "expert" in routing))
        return response

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        routing, _, rest, route_prompt = self._split_kwargs(kwargs)
        decision = self.route(prompt if route_prompt is None else route_prompt, **routing)
        chunks = stream_with_fallbacks(
            decision.ranking, lambda n: self._experts[n].stream_complete(prompt, formatted=formatted, **rest),
            self.fallbacks)
        return self._tagged_stream(decision, chunks, "expert" in routing)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        routing, _, rest, route_prompt = self._split_kwargs(kwargs)
        decision = await self.aroute(prompt if route_prompt is None else route_prompt, **routing)

        async def start(name: str) -> AsyncIterator[CompletionResponse]:
            stream = await self._experts[name].astream_complete(prompt, formatted=formatted, **rest)
            async for chunk in stream:
                yield chunk

        return self._atagged_stream(decision, astream_with_fallbacks(decision.ranking, start, self.fallbacks),
                                    "expert" in routing)

    # ---- prompt templates: route on the query, not the filled template --------------

    def _template_call(self, prompt: BasePromptTemplate,
                       prompt_args: dict[str, Any]) -> tuple[list[ChatMessage], dict[str, Any]]:
        """The messages of a filled template, and the routing kwargs that make the router read its query."""
        messages = self._get_messages(prompt, **prompt_args)
        query = query_of(prompt, prompt_args, self)
        return messages, ({} if query is None else {"route_prompt": query_prompt(messages, query)})

    def _structured_kwargs(self, prompt: BasePromptTemplate, prompt_args: dict[str, Any],
                           llm_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """``llm_kwargs`` for a structured-output program, routing on the template's query."""
        llm_kwargs = dict(llm_kwargs or {})
        query = query_of(prompt, prompt_args, self)
        if query is not None and "route_prompt" not in llm_kwargs:
            llm_kwargs["route_prompt"] = query_prompt(self._get_messages(prompt, **prompt_args), query)
        return llm_kwargs

    @dispatcher.span
    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        """``LLM.predict``, routed on the template's query (``query_str``/``question``) when it has one."""
        dispatcher.event(LLMPredictStartEvent(template=prompt, template_args=prompt_args))
        self._log_template_data(prompt, **prompt_args)
        messages, routing = self._template_call(prompt, prompt_args)
        output = self._parse_output(self.chat(messages, **routing).message.content or "")
        dispatcher.event(LLMPredictEndEvent(output=output))
        return output

    @dispatcher.span
    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        """``LLM.apredict``, routed on the template's query when it has one."""
        dispatcher.event(LLMPredictStartEvent(template=prompt, template_args=prompt_args))
        self._log_template_data(prompt, **prompt_args)
        messages, routing = self._template_call(prompt, prompt_args)
        output = self._parse_output((await self.achat(messages, **routing)).message.content or "")
        dispatcher.event(LLMPredictEndEvent(output=output))
        return output

    @dispatcher.span
    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenGen:
        """``LLM.stream``, routed on the template's query when it has one."""
        self._log_template_data(prompt, **prompt_args)
        dispatcher.event(LLMPredictStartEvent(template=prompt, template_args=prompt_args))
        if prompt.output_parser is not None or self.output_parser is not None:
            raise NotImplementedError("Output parser is not supported for streaming.")
        messages, routing = self._template_call(prompt, prompt_args)
        return stream_chat_response_to_tokens(self.stream_chat(messages, **routing))

    @dispatcher.span
    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenAsyncGen:
        """``LLM.astream``, routed on the template's query when it has one."""
        self._log_template_data(prompt, **prompt_args)
        dispatcher.event(LLMPredictStartEvent(template=prompt, template_args=prompt_args))
        if prompt.output_parser is not None or self.output_parser is not None:
            raise NotImplementedError("Output parser is not supported for streaming.")
        messages, routing = self._template_call(prompt, prompt_args)
        return await astream_chat_response_to_tokens(await self.astream_chat(messages, **routing))

    def structured_predict(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                           llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> BaseModel:
        """``LLM.structured_predict``, routed on the template's query when it has one."""
        return super().structured_predict(output_cls, prompt, self._structured_kwargs(prompt, prompt_args, llm_kwargs),
                                          **prompt_args)

    async def astructured_predict(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                                  llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> BaseModel:
        """``LLM.astructured_predict``, routed on the template's query when it has one."""
        return await super().astructured_predict(
            output_cls, prompt, self._structured_kwargs(prompt, prompt_args, llm_kwargs), **prompt_args)

    def stream_structured_predict(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                                  llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any):
        """``LLM.stream_structured_predict``, routed on the template's query when it has one."""
        return super().stream_structured_predict(
            output_cls, prompt, self._structured_kwargs(prompt, prompt_args, llm_kwargs), **prompt_args)

    async def astream_structured_predict(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                                         llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any):
        """``LLM.astream_structured_predict``, routed on the template's query when it has one."""
        return await super().astream_structured_predict(
            output_cls, prompt, self._structured_kwargs(prompt, prompt_args, llm_kwargs), **prompt_args)

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
        routed = response.additional_kwargs.get(METADATA_KEY) or response.message.additional_kwargs.get(METADATA_KEY)
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


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _checked_allowed(allowed: Iterable[str] | None, experts: Mapping[str, Any]) -> list[str] | None:
    if allowed is None:
        return None
    allowed = [allowed] if isinstance(allowed, str) else list(allowed)
    unknown = set(allowed) - set(experts)
    if unknown:
        raise ValueError(f"allowed names unknown experts {sorted(unknown)}; experts are {sorted(experts)}")
    if not allowed:
        raise ValueError("allowed must name at least one expert")
    return allowed
