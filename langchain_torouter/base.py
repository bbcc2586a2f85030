"""``BaseTORouter``: what ``ChatTORouter`` and ``TORouterRunnable`` share.

Both are LangChain runnables in front of a core ``torouter.Controller``: the same
routing settings (pydantic fields), the controller rebuilt when a setting it holds
changes, ``route``/``aroute``/``eligible``, the routing step of a call, and ``batch``
routing a whole batch in one router call. Only how an input becomes a core prompt
and how the chosen expert is called differ; the subclasses supply those. As
``BaseChatOpenAI`` serves ``ChatOpenAI`` and ``AzureChatOpenAI`` in langchain-openai,
this base holds the shared fields once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list, get_executor_for_config
from langchain_core.runnables.utils import gather_with_concurrency
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from torouter.capture import PromptCapture, as_capture
from torouter.controller import Controller
from torouter.policy import Decision
from torouter.routers import Router
from torouter.routing_text import RouteOnMode

from ._routing import check_router, forced_expert, predecided, run_batch, split_options, take_predecided


class BaseTORouter(BaseModel):
    """Routing settings and the routing step shared by ``ChatTORouter`` and ``TORouterRunnable``.

    Subclasses name their experts (``_expert_names``), turn a LangChain input into the
    core's prompt (``_routing_prompt``) and may restrict who answers (``_allowed``) or
    report experts unable to take the current request (``_unable``); the core
    controller decides everything else.
    """

    router: Router | str | Path = Field(exclude=True)
    """A fitted ``torouter`` router, or the directory it was saved to."""

    cost_weight: float = Field(default=0.0, ge=0.0)
    """Price of one unit of cost in quality units: 0 picks the best expert regardless of cost."""

    max_cost: float | None = Field(default=None, ge=0.0)
    """Skip experts whose expected cost per query is above this (the cheapest is kept if none fit)."""

    route_on: RouteOnMode | Callable[[Any], str] = "last_user"
    """Text the router reads: the latest user turn (default), the last few user turns, the system
    prompt and every user turn, or a callable of the core prompt; see ``torouter.routing_text``."""

    default_expert: str | None = None
    """Expert ranked first when a request has no text to route on (e.g. image-only)."""

    sticky: bool = True
    """Reuse the router's prediction for text it has already read (one router pass per agent turn)."""

    prices: dict[str, float] | None = None
    """Expected cost per query by expert, overriding the costs the router was trained with."""

    fallbacks: bool = True
    """Let the next expert in the ranking answer when the chosen one fails before any output."""

    capture: PromptCapture | None = Field(default=None, exclude=True)
    """Opt-in: record each routed prompt (and the expert chosen) to a JSONL file that
    ``torouter prepare --prompts`` reads, to train a router on this application's traffic;
    a path builds a ``PromptCapture`` with its defaults (no answers, secrets masked)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _controller: Controller | None = PrivateAttr(default=None)
    _controller_key: tuple | None = PrivateAttr(default=None)
    _forced_model: str | None = PrivateAttr(default=None)

    @field_validator("router", mode="before")
    @classmethod
    def _check_router(cls, router: Any) -> Any:
        return check_router(router)

    @field_validator("capture", mode="before")
    @classmethod
    def _check_capture(cls, capture: Any) -> Any:
        return as_capture(capture, source="langchain")

    # --- what subclasses supply ---------------------------------------------------------
    def _expert_names(self) -> list[str]:
        """The names this object routes among."""
        raise NotImplementedError

    def _routing_prompt(self, input: Any, metadata: Mapping[str, Any] | None = None) -> Any:
        """The core prompt (text or role/content messages) for a LangChain input."""
        raise NotImplementedError

    def _allowed(self) -> list[str] | None:
        """Experts this object may route to (None: all of the router's)."""
        return None

    def _unable(self) -> dict[str, str]:
        """Experts that cannot take requests through this object, and why (e.g. unbound tools)."""
        return {}

    # --- the controller -------------------------------------------------------------------
    @property
    def controller(self) -> Controller:
        """The core controller that makes every decision (router, costs, ``route_on``, eligibility).

        Rebuilt when a setting it holds changed, so assignment and ``model_copy(update=...)``
        take effect; ``cost_weight`` and ``max_cost`` are read from this object at every call.
        """
        key = (id(self.router), self.router if isinstance(self.router, (str, Path)) else None,
               tuple(sorted((self.prices or {}).items())), self.route_on, self.default_expert, self.sticky)
        if self._controller is None or self._controller_key != key:
            self._controller = Controller(self.router, self.cost_weight, self.max_cost, self.route_on, self.prices,
                                          default_expert=self.default_expert,
                                          cache_size=1024 if self.sticky else 0)
            self._controller_key = key
        return self._controller

    # --- routing ------------------------------------------------------------------------
    def eligible(self, expert: str | None = None) -> list[str] | None:
        """Experts a request may go to (None: all), as the core decides: ``expert`` forces one."""
        return self.controller.eligible(expert, self._allowed(), self._unable())

    def route(self, input: Any, *, expert: str | None = None, cost_weight: float | None = None,
              max_cost: float | None = None, model: str | None = None) -> Decision:
        """Which expert would take ``input``, and the fallback order, without calling any."""
        forced = forced_expert({"expert": expert, "model": model}) or self._forced_model
        return self.controller.decide(self._routing_prompt(input), **self._options(forced, cost_weight, max_cost))

    async def aroute(self, input: Any, *, expert: str | None = None, cost_weight: float | None = None,
                     max_cost: float | None = None, model: str | None = None) -> Decision:
        """``route`` with router inference in a worker thread, off the event loop."""
        forced = forced_expert({"expert": expert, "model": model}) or self._forced_model
        return await self.controller.adecide(self._routing_prompt(input),
                                             **self._options(forced, cost_weight, max_cost))

    def _options(self, forced: str | None, cost_weight: float | None, max_cost: float | None) -> dict[str, Any]:
        """``Controller.decide`` keyword arguments: who may answer and this object's current trade-off."""
        return {"expert": forced, "allowed": self._allowed(), "unable": self._unable(),
                "cost_weight": self.cost_weight if cost_weight is None else cost_weight,
                "max_cost": self.max_cost if max_cost is None else max_cost}

    def _decide(self, input: Any, kwargs: dict[str, Any],
                metadata: Mapping[str, Any] | None = None) -> tuple[Decision, bool]:
        """Pop the routing options from ``kwargs`` and decide (or take the batch's decision)."""
        forced, cost_weight, max_cost = split_options(kwargs)
        forced = forced or self._forced_model
        prompt = self._routing_prompt(input, metadata)
        decision = take_predecided(self)
        if decision is None:
            decision = self.controller.decide(prompt, **self._options(forced, cost_weight, max_cost))
        if self.capture is not None:
            self.capture.record(prompt, decision, metadata=metadata, source="langchain")
        return decision, forced is not None

    async def _adecide(self, input: Any, kwargs: dict[str, Any],
                       metadata: Mapping[str, Any] | None = None) -> tuple[Decision, bool]:
        forced, cost_weight, max_cost = split_options(kwargs)
        forced = forced or self._forced_model
        prompt = self._routing_prompt(input, metadata)
        decision = take_predecided(self)
        if decision is None:
            decision = await self.controller.adecide(prompt, **self._options(forced, cost_weight, max_cost))
        if self.capture is not None:
            self.capture.record(prompt, decision, metadata=metadata, source="langchain")
        return decision, forced is not None

    # --- batch: one router call for the whole batch -------------------------------------
    def _batch_request(self, inputs: Sequence[Any], kwargs: dict[str, Any]) -> dict | None:
        """Arguments of one ``decide_many`` call for a batch, or None if an input cannot be routed."""
        try:
            forced, cost_weight, max_cost = split_options(dict(kwargs))
            prompts = [self._routing_prompt(x) for x in inputs]
            options = self._options(forced or self._forced_model, cost_weight, max_cost)
        except (ValueError, TypeError):
            return None  # a bad input or option: each request routes (and fails) inside its own run
        return {"prompts": prompts, **options}

    def _decide_batch(self, inputs: Sequence[Any], kwargs: dict[str, Any]) -> list[Decision] | None:
        request = self._batch_request(inputs, kwargs)
        try:
            return None if request is None else self.controller.decide_many(**request)
        except ValueError:
            return None  # e.g. no eligible expert or a bad cost option: it fails inside each request's own run

    async def _adecide_batch(self, inputs: Sequence[Any], kwargs: dict[str, Any]) -> list[Decision] | None:
        request = self._batch_request(inputs, kwargs)
        try:
            return None if request is None else await self.controller.adecide_many(**request)
        except ValueError:
            return None

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Route the whole batch with one router call, then call the chosen experts in parallel."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        decisions = self._decide_batch(inputs, kwargs)

        def invoke(i: int) -> Any:
            with predecided(self, decisions[i] if decisions else None):
                return self.invoke(inputs[i], configs[i], **kwargs)  # type: ignore[attr-defined]

        one = run_batch(invoke, return_exceptions)
        if len(inputs) == 1:
            return [one(0)]
        with get_executor_for_config(configs[0]) as executor:
            return list(executor.map(one, range(len(inputs))))

    async def abatch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """``batch`` with router inference in a worker thread and the experts called concurrently."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        decisions = await self._adecide_batch(inputs, kwargs)

        async def ainvoke(i: int) -> Any:
            with predecided(self, decisions[i] if decisions else None):
                if not return_exceptions:
                    return await self.ainvoke(inputs[i], configs[i], **kwargs)  # type: ignore[attr-defined]
                try:
                    return await self.ainvoke(inputs[i], configs[i], **kwargs)  # type: ignore[attr-defined]
                except Exception as exc:  # noqa: BLE001 - returned to the caller, as Runnable.abatch does
                    return exc

        return await gather_with_concurrency(configs[0].get("max_concurrency"),
                                             *(ainvoke(i) for i in range(len(inputs))))
