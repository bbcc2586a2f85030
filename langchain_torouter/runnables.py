"""``TORouterRunnable``: route each input among arbitrary runnables, e.g. one sub-chain per domain."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    CallbackManagerForChainRun,
)
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.base import coerce_to_runnable
from langchain_core.runnables.config import get_config_list, get_executor_for_config
from langchain_core.runnables.utils import gather_with_concurrency
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator
from torouter.controller import (
    Controller,
    acall_with_fallbacks,
    astream_with_fallbacks,
    call_with_fallbacks,
    stream_with_fallbacks,
)
from torouter.policy import Decision
from torouter.routers import Router
from torouter.routing_text import RouteOnMode

from ._routing import (
    attempt_config,
    candidates,
    check_router,
    forced_expert,
    outcome,
    predecided,
    run_batch,
    split_options,
    tag_output,
    take_predecided,
    to_prompt,
)


class TORouterRunnable(RunnableSerializable[Any, Any]):
    """Runnable that sends each input to the runnable a trained TO-Router picks for it.

    For experts that are whole chains (a retrieval chain for biomedical questions, a
    code chain with its own prompt, ...): the router reads the input's text, the
    runnable with the best ``quality - cost_weight * cost`` runs, and if it fails
    before producing output the next one in the router's ranking does
    (``fallbacks=False`` turns this off). ``invoke``, ``batch``, ``stream`` and their
    async forms delegate to it; its run is a child of this one, tagged with the
    decision. A message output (or the ``raw`` message of ``include_raw``) also gets
    the decision in ``response_metadata["torouter"]``.

    Inputs are routed on directly when they are text, messages or a prompt value; for
    dict inputs set ``input_key`` to the key that holds the text. Per call,
    ``expert="<name>"`` forces a runnable (``model=`` is its deprecated alias) and ``cost_weight=`` / ``max_cost=`` override
    the defaults; other keyword arguments go to the runnable.

    Example:
        ```python
        from langchain_torouter import TORouterRunnable

        chain = TORouterRunnable(
            runnables={"med-7b": biomed_rag_chain, "code-7b": code_chain, ...},
            router="runs/router", input_key="question", cost_weight=50.0)
        chain.invoke({"question": "What does metformin do?"})
        ```
    """

    runnables: dict[str, Runnable]
    """Runnables by expert name (callables and dicts are coerced as in LCEL)."""

    router: Router | str | Path = Field(exclude=True)
    """A fitted ``torouter`` router, or the directory it was saved to."""

    cost_weight: float = Field(default=0.0, ge=0.0)
    """Price of one unit of cost in quality units: 0 picks the best runnable regardless of cost."""

    max_cost: float | None = Field(default=None, ge=0.0)
    """Skip runnables whose expected cost per query is above this (the cheapest is kept if none fit)."""

    route_on: RouteOnMode | Callable[[Any], str] = "last_user"
    """Text the router reads: the latest user turn (default), the last few user turns, the system
    prompt and every user turn, or a callable of the core prompt; see ``torouter.routing_text``."""

    default_expert: str | None = None
    """Runnable ranked first when an input has no text to route on."""

    sticky: bool = True
    """Reuse the router's prediction for text it has already read."""

    prices: dict[str, float] | None = None
    """Expected cost per query by expert, overriding the costs the router was trained with."""

    fallbacks: bool = True
    """Let the next runnable in the ranking answer when the chosen one fails before any output."""

    input_key: str | None = None
    """For dict inputs, the key whose value (text or messages) the router reads."""

    allowed: list[str] | None = None
    """Route only among these experts (then ``runnables`` holds exactly these); default: all of them."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    _controller: Controller = PrivateAttr()

    @field_validator("runnables", mode="before")
    @classmethod
    def _coerce_runnables(cls, runnables: Any) -> Any:
        if not isinstance(runnables, Mapping) or not runnables:
            raise ValueError("runnables must be a non-empty dict of name -> runnable")
        coerced = {}
        for name, runnable in runnables.items():
            try:
                coerced[name] = coerce_to_runnable(runnable)
            except TypeError:
                raise ValueError(f"runnable {name!r} is a {type(runnable).__name__}, not a runnable, "
                                 "callable or dict") from None
        return coerced

    @field_validator("router", mode="before")
    @classmethod
    def _check_router(cls, router: Any) -> Any:
        return check_router(router)

    @model_validator(mode="after")
    def _build_controller(self) -> TORouterRunnable:
        self._controller = Controller(self.router, self.cost_weight, self.max_cost, self.route_on, self.prices,
                                      default_expert=self.default_expert, cache_size=1024 if self.sticky else 0)
        if self.allowed is None:
            self._controller.check_experts(self.runnables)
        else:
            unknown = set(self.allowed) - set(self._controller.experts)
            if unknown:
                raise ValueError(f"allowed names {sorted(unknown)} unknown to the router's experts "
                                 f"{self._controller.experts}")
            if set(self.runnables) != set(self.allowed):
                raise ValueError(f"runnables {sorted(self.runnables)} must be exactly the allowed experts "
                                 f"{sorted(self.allowed)}")
        return self

    @property
    def controller(self) -> Controller:
        """The core controller that makes every decision."""
        return self._controller

    # --- routing ------------------------------------------------------------------------
    def _prompt(self, input: Any) -> Any:
        if self.input_key is None:
            return to_prompt(input)
        if not isinstance(input, Mapping):
            raise ValueError(f"input_key={self.input_key!r} needs a dict input, got a {type(input).__name__}")
        if self.input_key not in input:
            raise ValueError(f"the input has no key {self.input_key!r} to route on (keys: {sorted(input)})")
        return to_prompt(input[self.input_key])

    def route(self, input: Any, *, expert: str | None = None, cost_weight: float | None = None,
              max_cost: float | None = None, model: str | None = None) -> Decision:
        """Which runnable would take ``input``, and the fallback order, without running any."""
        forced = forced_expert({"expert": expert, "model": model})
        return self._controller.decide(self._prompt(input), allowed=self._allowed(forced),
                                       cost_weight=cost_weight, max_cost=max_cost)

    def _allowed(self, forced: str | None) -> list[str] | None:
        return candidates(forced, self._controller.experts, self.allowed, {})

    def _decide(self, input: Any, kwargs: dict[str, Any]) -> tuple[Decision, bool]:
        forced, cost_weight, max_cost = split_options(kwargs)
        decision = take_predecided(self)
        if decision is None:
            decision = self._controller.decide(self._prompt(input), allowed=self._allowed(forced),
                                               cost_weight=cost_weight, max_cost=max_cost)
        return decision, forced is not None

    async def _adecide(self, input: Any, kwargs: dict[str, Any]) -> tuple[Decision, bool]:
        forced, cost_weight, max_cost = split_options(kwargs)
        decision = take_predecided(self)
        if decision is None:
            decision = await self._controller.adecide(self._prompt(input), allowed=self._allowed(forced),
                                                      cost_weight=cost_weight, max_cost=max_cost)
        return decision, forced is not None

    @staticmethod
    def _attempt(config: RunnableConfig, decision: Decision, name: str, forced: bool) -> RunnableConfig:
        extra = attempt_config(config.get("callbacks"), decision, name, forced)
        return {**config, **extra, "metadata": {**(config.get("metadata") or {}), **extra["metadata"]},
                "tags": [*(config.get("tags") or []), *extra["tags"]]}

    # --- invoke -------------------------------------------------------------------------
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, config, **kwargs)

    def _invoke(self, input: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig,
                **kwargs: Any) -> Any:
        decision, forced = self._decide(input, kwargs)
        name, output, failures = call_with_fallbacks(
            decision.ranking,
            lambda name: self.runnables[name].invoke(input, self._attempt(config, decision, name, forced), **kwargs),
            self.fallbacks)
        return tag_output(output, outcome(decision, name, failures, forced))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, config, **kwargs)

    async def _ainvoke(self, input: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig,
                       **kwargs: Any) -> Any:
        decision, forced = await self._adecide(input, kwargs)
        name, output, failures = await acall_with_fallbacks(
            decision.ranking,
            lambda name: self.runnables[name].ainvoke(input, self._attempt(config, decision, name, forced),
                                                      **kwargs),
            self.fallbacks)
        return tag_output(output, outcome(decision, name, failures, forced))

    # --- stream -------------------------------------------------------------------------
    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)

    def _transform(self, inputs: Iterator[Any], run_manager: CallbackManagerForChainRun, config: RunnableConfig,
                   **kwargs: Any) -> Iterator[Any]:
        input = _gather(inputs)
        decision, forced = self._decide(input, kwargs)

        def start(name: str) -> Iterator[Any]:
            return self.runnables[name].stream(input, self._attempt(config, decision, name, forced), **kwargs)

        first = True
        for name, chunk, failures in stream_with_fallbacks(decision.ranking, start, self.fallbacks):
            if first:
                chunk, first = tag_output(chunk, outcome(decision, name, failures, forced)), False
            yield chunk

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        async for chunk in self.atransform(_aiter_one(input), config, **kwargs):
            yield chunk

    async def atransform(self, input: AsyncIterator[Any], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[Any]:
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, **kwargs):
            yield chunk

    async def _atransform(self, inputs: AsyncIterator[Any], run_manager: AsyncCallbackManagerForChainRun,
                          config: RunnableConfig, **kwargs: Any) -> AsyncIterator[Any]:
        input = None
        async for part in inputs:
            input = part if input is None else input + part
        decision, forced = await self._adecide(input, kwargs)

        def start(name: str) -> AsyncIterator[Any]:
            return self.runnables[name].astream(input, self._attempt(config, decision, name, forced), **kwargs)

        first = True
        async for name, chunk, failures in astream_with_fallbacks(decision.ranking, start, self.fallbacks):
            if first:
                chunk, first = tag_output(chunk, outcome(decision, name, failures, forced)), False
            yield chunk

    # --- batch: one router call for the whole batch -------------------------------------
    def _batch_request(self, inputs: list[Any], kwargs: dict[str, Any]) -> dict | None:
        """Arguments of one ``decide_many`` call for a batch, or None if an input cannot be routed."""
        forced, cost_weight, max_cost = split_options(dict(kwargs))
        try:
            prompts = [self._prompt(x) for x in inputs]
            allowed = self._allowed(forced)
        except (ValueError, TypeError):
            return None  # a bad input: each one routes (and fails) inside its own run
        return {"prompts": prompts, "allowed": allowed, "cost_weight": cost_weight, "max_cost": max_cost}

    def _decide_batch(self, inputs: list[Any], kwargs: dict[str, Any]) -> list[Decision] | None:
        request = self._batch_request(inputs, kwargs)
        try:
            return None if request is None else self._controller.decide_many(**request)
        except ValueError:
            return None  # e.g. an input with no text to route on: it fails inside its own run

    async def _adecide_batch(self, inputs: list[Any], kwargs: dict[str, Any]) -> list[Decision] | None:
        request = self._batch_request(inputs, kwargs)
        try:
            return None if request is None else await self._controller.adecide_many(**request)
        except ValueError:
            return None

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Route the whole batch with one router call, then run the chosen runnables in parallel."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        decisions = self._decide_batch(inputs, kwargs)

        def invoke(i: int) -> Any:
            with predecided(self, decisions[i] if decisions else None):
                return self.invoke(inputs[i], configs[i], **kwargs)

        one = run_batch(invoke, return_exceptions)
        if len(inputs) == 1:
            return [one(0)]
        with get_executor_for_config(configs[0]) as executor:
            return list(executor.map(one, range(len(inputs))))

    async def abatch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        decisions = await self._adecide_batch(inputs, kwargs)

        async def ainvoke(i: int) -> Any:
            with predecided(self, decisions[i] if decisions else None):
                if not return_exceptions:
                    return await self.ainvoke(inputs[i], configs[i], **kwargs)
                try:
                    return await self.ainvoke(inputs[i], configs[i], **kwargs)
                except Exception as exc:  # noqa: BLE001 - returned to the caller, as Runnable.abatch does
                    return exc

        return await gather_with_concurrency(configs[0].get("max_concurrency"),
                                             *(ainvoke(i) for i in range(len(inputs))))


def _gather(inputs: Iterator[Any]) -> Any:
    """The whole input of a transform (chunks added up, as LCEL does)."""
    input = None
    for part in inputs:
        input = part if input is None else input + part
    return input


async def _aiter_one(value: Any) -> AsyncIterator[Any]:
    yield value
