"""``TORouterRunnable``: route each input among arbitrary runnables, e.g. one sub-chain per domain."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    CallbackManagerForChainRun,
)
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.base import coerce_to_runnable
from pydantic import ConfigDict, field_validator, model_validator
from torouter.controller import (
    acall_with_fallbacks,
    astream_with_fallbacks,
    call_with_fallbacks,
    stream_with_fallbacks,
)
from torouter.policy import Decision

from ._routing import attempt_config, outcome, tag_output, to_prompt
from .base import BaseTORouter


class TORouterRunnable(BaseTORouter, RunnableSerializable[Any, Any]):
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

    input_key: str | None = None
    """For dict inputs, the key whose value (text or messages) the router reads."""

    allowed: list[str] | None = None
    """Route only among these experts (then ``runnables`` holds exactly these); default: all of them."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

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

    @model_validator(mode="after")
    def _check_names(self) -> TORouterRunnable:
        self._controller = None
        if self.allowed is None:
            self.controller.check_experts(self.runnables)
        else:
            self.controller.eligible(allowed=self.allowed)  # unknown names fail here
            if set(self.runnables) != set(self.allowed):
                raise ValueError(f"runnables {sorted(self.runnables)} must be exactly the allowed experts "
                                 f"{sorted(self.allowed)}")
        return self

    # --- routing (the rest is in BaseTORouter) -----------------------------------------
    def _expert_names(self) -> list[str]:
        return list(self.runnables)

    def _allowed(self) -> list[str] | None:
        return self.allowed

    def _routing_prompt(self, input: Any, metadata: Mapping[str, Any] | None = None) -> Any:
        if self.input_key is None:
            return to_prompt(input)
        if not isinstance(input, Mapping):
            raise ValueError(f"input_key={self.input_key!r} needs a dict input, got a {type(input).__name__}")
        if self.input_key not in input:
            raise ValueError(f"the input has no key {self.input_key!r} to route on (keys: {sorted(input)})")
        return to_prompt(input[self.input_key])

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

def _gather(inputs: Iterator[Any]) -> Any:
    """The whole input of a transform (chunks added up, as LCEL does)."""
    input = None
    for part in inputs:
        input = part if input is None else input + part
    return input

async def _aiter_one(value: Any) -> AsyncIterator[Any]:
    yield value
