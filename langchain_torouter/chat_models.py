"""``ChatTORouter``: a LangChain chat model that routes each request among expert chat models."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import (
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.load.serializable import SerializedNotImplemented
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import (
    ensure_config,
)
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator
from torouter.controller import (
    acall_with_fallbacks,
    astream_with_fallbacks,
    call_with_fallbacks,
    stream_with_fallbacks,
)
from torouter.policy import Decision

from ._routing import (
    METADATA_KEY,
    ROUTE_TEXT_KEY,
    ROUTING_OPTIONS,
    achild_callbacks,
    ahide_relays,
    as_chunk,
    attempt_config,
    build_experts,
    child_callbacks,
    forced_expert,
    hide_relays,
    merged_profile,
    messages_to_prompt,
    model_name,
    outcome,
    relays_hidden,
    stream_parent,
    take_stream_parent,
)
from .base import BaseTORouter
from .runnables import TORouterRunnable

try:  # run ids are time-ordered UUIDs in recent langchain-core; any UUID works
    from langchain_core.utils.uuid import uuid7 as _new_run_id
except ImportError:  # pragma: no cover - older langchain-core 1.x
    from uuid import uuid4 as _new_run_id

_DONE = object()


class ChatTORouter(BaseTORouter, BaseChatModel):
    """Chat model that sends each request to the expert chat model a trained TO-Router picks.

    The router reads the conversation, predicts every expert's quality and the expert
    with the best ``quality - cost_weight * cost`` answers; ``max_cost`` skips pricier
    experts when a cheaper one exists. ``invoke``, ``batch``, ``stream`` and their async
    forms delegate to that expert (streaming its tokens as they come) and the decision
    rides along in ``response_metadata["torouter"]``; the expert's own call is a child
    run of this model's run in callbacks and traces, tagged with the same decision.

    If the chosen expert fails before producing output, the next expert in the
    router's ranking answers (``fallbacks=False`` turns this off); when every expert
    fails, ``torouter.AllExpertsFailed`` names each failure. ``bind_tools`` and
    ``with_structured_output`` route only among the experts that support them.

    Per call, ``expert="<name>"`` forces an expert (``model=`` is its deprecated alias) and ``cost_weight=`` / ``max_cost=``
    override the defaults, through ``invoke`` keyword arguments, ``.bind(...)``,
    ``bind_tools(..., cost_weight=...)`` or ``create_agent`` model settings, in any order;
    they are never passed to an expert. Other keyword arguments go to the expert.

    The router reads the user's question (see ``route_on``): in a ``prompt | llm`` RAG
    chain the question is taken out of the filled template, tool results and agent
    observations are skipped, and ``route_on_input(chain, "question")`` names the input
    key explicitly. Within an agent run the question stays the same, so the router runs
    once and later model calls reuse its prediction (``sticky=False`` routes every call
    afresh). Streamed tokens and token usage reach callbacks once: the expert's own run
    is hidden from streaming and usage-counting handlers, which see this model's run.

    Setup:
        ``pip install "torouter[langchain]"``, then train a router with
        ``torouter train`` (or ``torouter.make_router(...).fit(...)``).

    Instantiate:
        ```python
        from langchain_openai import ChatOpenAI
        from langchain_torouter import ChatTORouter

        llm = ChatTORouter(
            experts={"small": ChatOpenAI(model="gpt-4o-mini"), "large": ChatOpenAI(model="gpt-4o")},
            router="runs/router",  # a saved router directory, or a fitted Router
            cost_weight=50.0,
        )
        ```

    Invoke:
        ```python
        msg = llm.invoke("Write a Python function that reverses a string.")
        msg.response_metadata["torouter"]["expert"]  # which expert answered
        msg.response_metadata["torouter"]["scores"]  # the router's quality estimates
        ```

    Stream:
        ```python
        for chunk in llm.stream("What is the capital of Peru?"):
            print(chunk.text, end="")
        ```

    Tool calling:
        ```python
        llm_with_tools = llm.bind_tools([get_weather])
        llm_with_tools.invoke("What is the weather in Lima?").tool_calls
        ```

    Structured output:
        ```python
        llm.with_structured_output(Answer).invoke("...")
        ```
    """

    experts: dict[str, BaseChatModel]
    """Expert chat models by name; the names must be exactly the router's experts."""

    model_name: str = "torouter"
    """Name reported to tracing as the model; the expert's own name is in ``response_metadata``."""

    stop: list[str] | None = None
    """Default stop sequences passed to the answering expert."""

    temperature: float | None = None
    """Sampling temperature passed to the answering expert per call; None leaves each expert's own."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Output token limit passed to the answering expert per call; None leaves each expert's own."""

    streaming: bool = False
    """Make ``invoke`` stream from the expert (``on_llm_new_token`` fires per token)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True,
                              validate_assignment=True)

    _model_names: dict[str, str] = PrivateAttr(default_factory=dict)
    _bound: dict[str, Runnable] | None = PrivateAttr(default=None)
    _skipped: dict[str, str] = PrivateAttr(default_factory=dict)
    _bound_params: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("experts", mode="before")
    @classmethod
    def _check_experts(cls, experts: Any) -> Any:
        return build_experts(experts)

    @model_validator(mode="after")
    def _build_controller(self) -> ChatTORouter:
        self._controller = None
        self.controller.check_experts(self.experts)
        if self.default_expert is not None and self.default_expert not in self.experts:
            raise ValueError(f"default_expert={self.default_expert!r} is not one of the experts {sorted(self.experts)}")
        self._model_names = {name: model_name(expert, name) for name, expert in self.experts.items()}
        if self.profile is None:
            self.__dict__["profile"] = merged_profile(self.experts.values())
        return self

    # --- LangChain model identity -----------------------------------------------------
    @classmethod
    def is_lc_serializable(cls) -> bool:
        return False

    def to_json(self) -> SerializedNotImplemented:
        """A clear refusal: expert objects and a fitted router do not round-trip through ``dumpd``/``loads``."""
        serialized = super().to_json()
        serialized["repr"] = ("ChatTORouter cannot be serialised: rebuild it from its expert chat models and the "
                              "saved router directory (Router.save) instead")
        return serialized

    @property
    def _llm_type(self) -> str:
        return "torouter-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        route_on = self.route_on if isinstance(self.route_on, str) else getattr(self.route_on, "__name__", "callable")
        return {"experts": dict(self._model_names), "router": self.controller.router.method,
                "cost_weight": self.cost_weight, "max_cost": self.max_cost, "route_on": route_on,
                "default_expert": self.default_expert, "sticky": self.sticky,
                "prices": self.prices, "fallbacks": self.fallbacks, **self._bound_params,
                **({"expert": self._forced_model} if self._forced_model else {})}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="torouter", ls_model_name=kwargs.get("expert") or kwargs.get("model")
                                 or self._forced_model or self.model_name,
                                 ls_model_type="chat")
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # --- routing (the rest is in BaseTORouter) -----------------------------------------
    def _expert_names(self) -> list[str]:
        return list(self.experts)

    def _unable(self) -> dict[str, str]:
        """Experts that could not take the tools bound by ``bind_tools``, and why."""
        if self._bound is None:
            return {}
        return {name: self._skipped.get(name, "could not take the bound tools")
                for name in self.experts if name not in self._bound}

    def _routing_prompt(self, input: Any, metadata: Mapping[str, Any] | None = None) -> Any:
        messages = input if isinstance(input, list) and all(isinstance(m, BaseMessage) for m in input) \
            else self._convert_input(input).to_messages()
        if not messages:
            raise ValueError("ChatTORouter got an empty message list: there is nothing to route on")
        if metadata and isinstance(metadata.get(ROUTE_TEXT_KEY), str):
            return metadata[ROUTE_TEXT_KEY]  # the question, named by ``route_on_input``
        return messages_to_prompt(messages)

    def expert_runnable(self, name: str) -> Runnable:
        """What answers as expert ``name``: its chat model, with the tools ``bind_tools`` bound on it.

        For callers that run the chosen expert themselves (the OpenAI-compatible endpoint
        calls it under its own deadlines after ``route``).
        """
        if name not in self.experts:
            raise KeyError(f"{name!r} is not one of the experts {sorted(self.experts)}")
        return self._runnable(name)

    def _runnable(self, name: str) -> Runnable:
        return self._bound[name] if self._bound is not None else self.experts[name]

    def _expert_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs.pop("stream", None)
        if self._bound is not None:
            kwargs.pop("tools", None)  # already bound on each expert, in its own format
            kwargs.pop("tool_choice", None)
        if self.temperature is not None:
            kwargs.setdefault("temperature", self.temperature)
        if self.max_tokens is not None:
            kwargs.setdefault("max_tokens", self.max_tokens)
        return kwargs

    def _answer(self, message: AIMessage, name: str, decision: Decision, failures: Mapping[str, BaseException],
                forced: bool) -> AIMessage:
        meta = dict(message.response_metadata)
        if not meta.get("model_name"):
            meta["model_name"] = self._model_names[name]
        meta[METADATA_KEY] = outcome(decision, name, failures, forced)
        return message.model_copy(update={"response_metadata": meta})

    def _tagger(self, decision: Decision, forced: bool) -> _ChunkTagger:
        return _ChunkTagger(decision, forced, self._model_names)

    # --- generation -----------------------------------------------------------------------
    def _should_stream(self, *, async_api: bool, run_manager: Any = None, **kwargs: Any) -> bool:
        # Inside generate (run_manager given) ``_generate`` streams by itself when asked, so
        # the expert's call stays a child run; ``stream()`` (no run_manager) streams as usual.
        if run_manager is not None:
            return False
        return super()._should_stream(async_api=async_api, **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if super()._should_stream(async_api=False, run_manager=run_manager, **kwargs):
            chunks = []
            for chunk in self._stream(messages, stop=stop, run_manager=run_manager, **kwargs):
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                chunks.append(chunk)
            return generate_from_stream(iter(chunks))
        stop = self.stop if stop is None else stop
        decision, forced = self._decide(messages, kwargs, run_manager.metadata if run_manager else None)
        callbacks = child_callbacks(run_manager) if run_manager is not None else None
        expert_kwargs = self._expert_kwargs(kwargs)

        def call(name: str) -> AIMessage:
            config = attempt_config(callbacks, decision, name, forced)
            with relays_hidden():
                return self._runnable(name).invoke(messages, config, stop=stop, **expert_kwargs)

        name, message, failures = call_with_fallbacks(decision.ranking, call, self.fallbacks)
        return ChatResult(generations=[ChatGeneration(message=self._answer(message, name, decision, failures,
                                                                           forced))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if super()._should_stream(async_api=True, run_manager=run_manager, **kwargs):
            chunks = []
            async for chunk in self._astream(messages, stop=stop, run_manager=run_manager, **kwargs):
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                chunks.append(chunk)
            return await agenerate_from_stream(_aiter(chunks))
        stop = self.stop if stop is None else stop
        decision, forced = await self._adecide(messages, kwargs, run_manager.metadata if run_manager else None)
        callbacks = achild_callbacks(run_manager) if run_manager is not None else None
        expert_kwargs = self._expert_kwargs(kwargs)

        async def call(name: str) -> AIMessage:
            config = attempt_config(callbacks, decision, name, forced)
            with relays_hidden():
                return await self._runnable(name).ainvoke(messages, config, stop=stop, **expert_kwargs)

        name, message, failures = await acall_with_fallbacks(decision.ranking, call, self.fallbacks)
        return ChatResult(generations=[ChatGeneration(message=self._answer(message, name, decision, failures,
                                                                           forced))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        callbacks = (child_callbacks(run_manager) if run_manager is not None
                     else take_stream_parent(self, CallbackManager))
        stop = self.stop if stop is None else stop
        decision, forced = self._decide(messages, kwargs, (run_manager or callbacks).metadata
                                        if (run_manager or callbacks) is not None else None)
        expert_kwargs = self._expert_kwargs(kwargs)

        def start(name: str) -> Iterator[AIMessageChunk]:
            config = attempt_config(callbacks, decision, name, forced)
            return hide_relays(iter(self._runnable(name).stream(messages, config, stop=stop, **expert_kwargs)))

        tagger = self._tagger(decision, forced)
        for name, chunk, failures in stream_with_fallbacks(decision.ranking, start, self.fallbacks):
            yield tagger.tag(name, chunk, failures)
        if (tail := tagger.tail()) is not None:
            yield tail

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        callbacks = (achild_callbacks(run_manager) if run_manager is not None
                     else take_stream_parent(self, AsyncCallbackManager))
        stop = self.stop if stop is None else stop
        decision, forced = await self._adecide(messages, kwargs, (run_manager or callbacks).metadata
                                               if (run_manager or callbacks) is not None else None)
        expert_kwargs = self._expert_kwargs(kwargs)

        def start(name: str) -> AsyncIterator[AIMessageChunk]:
            config = attempt_config(callbacks, decision, name, forced)
            return ahide_relays(self._runnable(name).astream(messages, config, stop=stop, **expert_kwargs))

        tagger = self._tagger(decision, forced)
        async for name, chunk, failures in astream_with_fallbacks(decision.ranking, start, self.fallbacks):
            yield tagger.tag(name, chunk, failures)
        if (tail := tagger.tail()) is not None:
            yield tail

    # ``BaseChatModel.stream`` does not hand its run manager to ``_stream``; these overrides
    # fix the run id up front and tell ``_stream`` about it, so the expert's streamed call
    # is still traced as a child of this model's run.
    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        config = ensure_config(config)
        config["run_id"] = config.get("run_id") or _new_run_id()
        chunks = super().stream(input, {**config}, stop=stop, **kwargs)
        with stream_parent(self, config):
            first = next(chunks, _DONE)
        if first is _DONE:
            return
        yield first
        yield from chunks

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        config = ensure_config(config)
        config["run_id"] = config.get("run_id") or _new_run_id()
        chunks = super().astream(input, {**config}, stop=stop, **kwargs)
        with stream_parent(self, config):
            first = await anext(chunks, _DONE)
        if first is _DONE:
            return
        yield first
        async for chunk in chunks:
            yield chunk

    # --- run-time routing options ----------------------------------------------------------
    def with_routing(self, *, expert: str | None = None, cost_weight: float | None = None,
                     max_cost: float | None = None, model: str | None = None) -> ChatTORouter:
        """A copy that routes with these options; they survive a later ``bind_tools``/``bind``.

        ``expert`` forces an expert (``model`` is its deprecated alias)."""
        options = {"expert": expert, "model": model}
        model = forced_expert(options)
        update: dict[str, Any] = {}
        if cost_weight is not None:
            update["cost_weight"] = cost_weight
        if max_cost is not None:
            update["max_cost"] = max_cost
        routed = self.model_copy(update=update)
        if model is not None:
            self.controller.eligible(model)  # an unknown name fails here, not at the call
            routed._forced_model = model
        return routed

    def bind(self, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """``Runnable.bind``, except that ``model``, ``cost_weight`` and ``max_cost`` become this model's own
        settings (``with_routing``), so code that binds tools afterwards (agents do) keeps them."""
        options = {key: kwargs.pop(key) for key in ROUTING_OPTIONS if key in kwargs}
        routed = self.with_routing(**options) if options else self
        return super(ChatTORouter, routed).bind(**kwargs) if kwargs else routed

    # --- tools and structured output ------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind ``tools`` on every expert that supports them; requests route only among those.

        An expert whose ``bind_tools`` is missing or rejects these tools (or this
        ``tool_choice``) is skipped; if none accepts them this raises ValueError.
        Routing options among ``kwargs`` (``cost_weight``, ``max_cost``, ``model``: what
        ``create_agent`` passes as model settings) set this model's routing instead.
        """
        options = {key: kwargs.pop(key) for key in ROUTING_OPTIONS if key in kwargs}
        if options:
            return self.with_routing(**options).bind_tools(tools, tool_choice=tool_choice, **kwargs)
        bound: dict[str, Runnable] = {}
        skipped: dict[str, str] = {}
        for name, expert in self.experts.items():
            if type(expert).bind_tools is BaseChatModel.bind_tools:
                skipped[name] = f"{type(expert).__name__} does not implement tool calling"
                continue
            try:
                if tool_choice is None:
                    bound[name] = expert.bind_tools(tools, **kwargs)
                else:
                    bound[name] = expert.bind_tools(tools, tool_choice=tool_choice, **kwargs)
            except (NotImplementedError, TypeError, ValueError) as exc:
                skipped[name] = f"{type(exc).__name__}: {exc}"
        if not bound:
            raise ValueError(f"no expert can take these tools: {skipped}")
        routed = self.model_copy()
        routed._bound, routed._skipped = bound, skipped
        routed._bound_params = {"tool_experts": sorted(bound)}
        # Bound like any chat model's tools, for tracing, caching and code that inspects
        # ``binding.kwargs["tools"]``; ``_generate`` drops them since the experts hold their own.
        binding: dict[str, Any] = {"tools": [_tool_repr(t) for t in tools]}
        if tool_choice is not None:
            binding["tool_choice"] = tool_choice
        if kwargs.get("ls_structured_output_format"):
            binding["ls_structured_output_format"] = kwargs["ls_structured_output_format"]
        return routed.bind(**binding)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Structured output from whichever expert the router picks, among those that support it.

        Each expert's own ``with_structured_output(schema, include_raw=..., **kwargs)`` is
        used (so ``method=`` and ``strict=`` mean what they mean for that expert); experts
        that raise are skipped. The result is a ``TORouterRunnable`` over those runnables:
        its child run for the expert carries the decision in its metadata, and with
        ``include_raw=True`` the raw message carries it in ``response_metadata``.
        """
        runnables: dict[str, Runnable] = {}
        skipped: dict[str, str] = {}
        for name, expert in self.experts.items():
            try:
                runnables[name] = expert.with_structured_output(schema, include_raw=include_raw, **kwargs)
            except (NotImplementedError, TypeError, ValueError) as exc:
                skipped[name] = f"{type(exc).__name__}: {exc}"
        if not runnables:
            raise ValueError(f"no expert supports structured output for this schema: {skipped}")
        return TORouterRunnable(
            runnables=runnables, router=self.controller.router, cost_weight=self.cost_weight,
            max_cost=self.max_cost, route_on=self.route_on, prices=self.prices, fallbacks=self.fallbacks,
            default_expert=self.default_expert if self.default_expert in runnables else None,
            sticky=self.sticky, allowed=list(runnables))


    # --- token counting: an expert's tokenizer ----------------------------------------------
    def _counting_expert(self) -> BaseChatModel:
        """The expert whose tokenizer counts tokens: the forced one, else the first."""
        return self.experts.get(self._forced_model or "", next(iter(self.experts.values())))

    def get_num_tokens(self, text: str) -> int:
        """Tokens in ``text`` by an expert's tokenizer (experts' tokenizers differ; this is one estimate)."""
        return self._counting_expert().get_num_tokens(text)

    def get_token_ids(self, text: str) -> list[int]:
        return self._counting_expert().get_token_ids(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        return self._counting_expert().get_num_tokens_from_messages(messages, tools=tools)


class _ChunkTagger:
    """Puts the decision on a stream's first chunk and ``model_name`` on its end if the expert sent none."""

    def __init__(self, decision: Decision, forced: bool, model_names: Mapping[str, str]):
        self.decision, self.forced, self.model_names = decision, forced, model_names
        self.name: str | None = None
        self.last: AIMessageChunk | None = None
        self.named = False

    def tag(self, name: str, chunk: AIMessageChunk, failures: Mapping[str, BaseException]) -> ChatGenerationChunk:
        chunk = as_chunk(chunk)  # an expert that cannot stream yields its whole message
        meta = dict(chunk.response_metadata)
        self.named = self.named or bool(meta.get("model_name"))
        if self.last is None:
            meta[METADATA_KEY] = outcome(self.decision, name, failures, self.forced)
        self.name = name
        self.last = chunk.model_copy(update={"response_metadata": meta})
        return ChatGenerationChunk(message=self.last)

    def tail(self) -> ChatGenerationChunk | None:
        if self.last is None or self.named:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(
            content="" if isinstance(self.last.content, str) else [], chunk_position="last",
            response_metadata={"model_name": self.model_names[self.name]}))


def _tool_repr(tool: Any) -> Any:
    """A JSON-able description of a tool for tracing and cache keys."""
    try:
        return convert_to_openai_tool(tool)
    except Exception:  # noqa: BLE001 - provider-specific tool formats are kept by name
        return getattr(tool, "name", None) or repr(tool)


async def _aiter(items: list) -> AsyncIterator:
    for item in items:
        yield item


