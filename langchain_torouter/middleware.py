"""torouter inside LangChain v1 agents: a model-routing middleware.

``TORouterMiddleware`` is an ``AgentMiddleware`` for ``create_agent``: on each model
call it swaps the request's model for the expert a trained router picks, among the
experts that can take the call's tools and structured output. By default one decision
serves a whole run (the agent's tool-calling loop keeps the expert that started the
answer); ``mode="per_call"`` decides at every model call.

``TORouterDecisionModel`` (in ``decision_model``) lets a trained router drive LangChain's
own ``ModelRouterMiddleware`` instead.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal, NotRequired

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain.agents.middleware.types import ExtendedModelResponse, OmitFromInput
from langchain.agents.structured_output import (
    AutoStrategy,
    OutputToolBinding,
    ProviderStrategy,
    ToolStrategy,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langgraph.errors import GraphBubbleUp
from langgraph.types import Command
from typing_extensions import TypedDict

from torouter.controller import AllExpertsFailed, Controller, check_cost_options
from torouter.policy import Decision
from torouter.routers import Router
from torouter.routing_text import RouteOn

from ._routing import METADATA_KEY, build_experts, messages_to_prompt

MODES = ("per_run", "per_call")
"""When ``TORouterMiddleware`` decides: once per agent run, or at every model call."""


class TORouterContext(TypedDict, total=False):
    """Per-run routing options ``TORouterMiddleware`` reads from the agent's runtime context.

    Pass them as ``agent.invoke(..., context={"cost_weight": 0.0})``; with your own
    ``context_schema`` (a TypedDict, dataclass or Pydantic model), add these fields to
    it. A missing or None value keeps the middleware's own setting.
    """

    cost_weight: float
    """Price of one unit of cost in quality units for this run (0: quality only)."""

    max_cost: float
    """Skip experts expected to cost more per query than this, for this run."""


class TORouterState(AgentState):
    """Agent state with the routing decision of the current run (or of the latest model call)."""

    torouter: NotRequired[Annotated[dict[str, Any] | None, OmitFromInput]]


class TORouterMiddleware(AgentMiddleware[TORouterState, Any]):
    """Route an agent's model calls among expert chat models with a trained TO-Router.

    ``experts`` maps the router's expert names to chat models (or ``init_chat_model``
    strings such as ``"openai:gpt-4o-mini"``); the model given to ``create_agent`` is
    replaced on every call, so any of the experts will do there.

    For each decision the router reads the conversation (``route_on``: the latest user
    turn by default; tool results, ReAct observations and conversation summaries are
    never read, and a RAG template's question is taken out of its context) and ranks the
    experts by ``quality - cost_weight * cost``, skipping experts that cannot take the
    call: with tools (or ``create_agent``'s structured-output tool) only experts whose
    ``bind_tools`` accepts them and whose profile does not rule out tool calling; with
    provider-native structured output, only experts whose profile does not rule it out.

    ``mode="per_run"`` (default) decides at the first model call of each run and reuses
    the decision for the run's later calls (after tool results), so one router pass
    serves the run and one expert writes the whole answer; a later call re-decides only
    if the expert cannot take its tools. ``mode="per_call"`` decides at every call
    (predictions for an unchanged question come from the controller's cache).

    The decision is in the agent state under ``"torouter"`` and on each AI message as
    ``response_metadata["torouter"]``: ``expert`` (answered), ``chosen`` (the router's
    pick), ``ranking``, ``scores``, ``cost_weight``, ``max_cost``, ``fallback``,
    ``failures``, ``mode``, ``reused`` (this call reused the run's decision) and
    ``routed_text``.

    Per run, ``cost_weight`` and ``max_cost`` in the runtime context
    (``agent.invoke(..., context={"cost_weight": 0})``, see :class:`TORouterContext`)
    override the middleware's settings.

    If the chosen expert fails, the next expert in the ranking is called
    (``fallbacks=False`` re-raises instead); when all fail, ``torouter.AllExpertsFailed``
    names each failure. A call whose expert fails after streaming some tokens is
    retried whole, so a token stream then carries the failed attempt's tokens first.
    To fall back to models outside the router, put ``ModelFallbackMiddleware`` *after*
    this middleware in ``create_agent(middleware=[...])``, so it wraps each expert's call.

    Example:
        ```python
        from langchain.agents import create_agent
        from langchain_torouter import TORouterMiddleware

        experts = {"small": "openai:gpt-4o-mini", "large": "openai:gpt-4o"}
        router = TORouterMiddleware(experts=experts, router="runs/router", cost_weight=50.0)
        agent = create_agent("openai:gpt-4o-mini", tools=[...], middleware=[router])
        result = agent.invoke({"messages": [{"role": "user", "content": "..."}]},
                              context={"cost_weight": 0.0})  # this run: quality only
        result["torouter"]["expert"]
        ```
    """

    state_schema = TORouterState

    def __init__(
        self,
        experts: Mapping[str, BaseChatModel | str],
        router: Router | str | os.PathLike,
        *,
        cost_weight: float = 0.0,
        max_cost: float | None = None,
        route_on: RouteOn = "last_user",
        default_expert: str | None = None,
        prices: Mapping[str, float] | None = None,
        mode: Literal["per_run", "per_call"] = "per_run",
        fallbacks: bool = True,
        cache_size: int = 1024,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.experts: dict[str, BaseChatModel] = build_experts(experts)
        self._controller = Controller(router, cost_weight, max_cost, route_on, dict(prices) if prices else None,
                                      default_expert, cache_size)
        self._controller.check_experts(self.experts)
        self.mode = mode
        self.fallbacks = fallbacks

    @property
    def controller(self) -> Controller:
        """The core controller that makes every decision (router, costs, ``route_on``, counters)."""
        return self._controller

    # --- run boundaries -------------------------------------------------------------------
    def before_agent(self, state: TORouterState, runtime: Any) -> dict[str, Any] | None:
        """A new run decides anew: forget the previous run's decision (kept by a checkpointer)."""
        return {METADATA_KEY: None} if state.get(METADATA_KEY) is not None else None

    async def abefore_agent(self, state: TORouterState, runtime: Any) -> dict[str, Any] | None:
        return self.before_agent(state, runtime)

    # --- model calls ----------------------------------------------------------------------
    def wrap_model_call(
        self,
        request: ModelRequest,
        handler: Callable[[ModelRequest], ModelResponse],
    ) -> ExtendedModelResponse:
        plan = self._plan(request)
        if plan.stored is None:
            plan.decision = self._controller.decide(plan.prompt, allowed=plan.eligible,
                                                    cost_weight=plan.cost_weight, max_cost=plan.max_cost)
        failures: dict[str, BaseException] = {}
        for name in plan.order():
            try:
                response = handler(request.override(model=self.experts[name]))
            except GraphBubbleUp:
                raise  # interrupts and graph control flow are not failures
            except Exception as exc:  # noqa: BLE001 - any expert failure moves on to the next one
                failures[name] = exc
                if not self.fallbacks:
                    raise
                continue
            return self._answer(plan, name, response, failures)
        raise AllExpertsFailed(failures)

    async def awrap_model_call(
        self,
        request: ModelRequest,
        handler: Callable[[ModelRequest], Awaitable[ModelResponse]],
    ) -> ExtendedModelResponse:
        plan = self._plan(request)
        if plan.stored is None:
            plan.decision = await self._controller.adecide(plan.prompt, allowed=plan.eligible,
                                                           cost_weight=plan.cost_weight, max_cost=plan.max_cost)
        failures: dict[str, BaseException] = {}
        for name in plan.order():
            try:
                response = await handler(request.override(model=self.experts[name]))
            except GraphBubbleUp:
                raise
            except Exception as exc:  # noqa: BLE001
                failures[name] = exc
                if not self.fallbacks:
                    raise
                continue
            return self._answer(plan, name, response, failures)
        raise AllExpertsFailed(failures)

    # --- helpers --------------------------------------------------------------------------
    def _plan(self, request: ModelRequest) -> _Plan:
        """What this call may use: eligible experts, the run's options, and the decision to reuse."""
        cost_weight, max_cost = self._run_options(request)
        eligible = self._controller.eligible(unable=self._unable(request)) or list(self._controller.experts)
        messages: list[BaseMessage] = list(request.messages)
        if request.system_message is not None:
            messages.insert(0, request.system_message)
        plan = _Plan(mode=self.mode, prompt=messages_to_prompt(messages), eligible=eligible,
                     cost_weight=cost_weight, max_cost=max_cost)
        stored = request.state.get(METADATA_KEY) if isinstance(request.state, Mapping) else None
        if (self.mode == "per_run" and isinstance(stored, Mapping) and stored.get("expert") in eligible
                and stored.get("cost_weight") == cost_weight and stored.get("max_cost") == max_cost):
            plan.reuse(stored)
        return plan

    def _run_options(self, request: ModelRequest) -> tuple[float, float | None]:
        """``cost_weight`` and ``max_cost`` for this run: the runtime context's, else the middleware's."""
        context = getattr(request.runtime, "context", None)
        cost_weight = _option(context, "cost_weight")
        max_cost = _option(context, "max_cost")
        cost_weight = self._controller.cost_weight if cost_weight is None else cost_weight
        max_cost = self._controller.max_cost if max_cost is None else max_cost
        try:
            check_cost_options(cost_weight, max_cost)
        except ValueError as exc:
            raise ValueError(f"TORouterMiddleware: bad routing option in the runtime context: {exc}") from None
        return cost_weight, max_cost

    def eligible_experts(self, request: ModelRequest) -> tuple[list[str], dict[str, str]]:
        """Experts that can take ``request``'s tools and response format, and why the others cannot."""
        unable = self._unable(request)
        return [name for name in self._controller.experts if name not in unable], unable

    def _unable(self, request: ModelRequest) -> dict[str, str]:
        """Why each expert that cannot take ``request``'s tools or response format cannot (the core's
        ``Controller.eligible`` decides from these)."""
        tools = list(request.tools or [])
        fmt = request.response_format
        if not tools and fmt is None:
            return {}
        unable: dict[str, str] = {}
        for name, expert in self.experts.items():
            reason = _cannot_take(expert, tools, fmt, request.tool_choice)
            if reason is not None:
                unable[name] = reason
        return unable

    def _answer(self, plan: _Plan, name: str, response: ModelResponse,
                failures: Mapping[str, BaseException]) -> ExtendedModelResponse:
        meta = plan.outcome(name, failures)
        result = [_tagged(m, meta) if isinstance(m, AIMessage) else m for m in response.result]
        return ExtendedModelResponse(model_response=dataclasses.replace(response, result=result),
                                     command=Command(update={METADATA_KEY: meta}))


@dataclasses.dataclass
class _Plan:
    """One model call's routing: the decision (new or the run's), and the order to try experts in."""

    mode: str
    prompt: list[dict[str, Any]]
    eligible: list[str]
    cost_weight: float
    max_cost: float | None
    decision: Decision | None = None
    stored: Mapping[str, Any] | None = None

    def reuse(self, stored: Mapping[str, Any]) -> None:
        self.stored = stored

    def order(self) -> list[str]:
        if self.stored is not None:
            # The expert that answered the run so far first, then the rest of the run's ranking.
            first = self.stored["expert"]
            rest = [e for e in self.stored.get("ranking", []) if e != first and e in self.eligible]
            return [first, *rest]
        assert self.decision is not None
        return list(self.decision.ranking)

    def outcome(self, expert: str, failures: Mapping[str, BaseException]) -> dict[str, Any]:
        failed = {name: f"{type(exc).__name__}: {exc}" for name, exc in failures.items()}
        if self.stored is not None:
            meta = {**self.stored, "expert": expert, "fallback": bool(failed), "failures": failed, "reused": True}
        else:
            assert self.decision is not None
            meta = {**self.decision.outcome(expert, failures), "reused": False,
                    "routed_text": self.decision.routed_text}
        meta["mode"] = self.mode
        return meta


def _option(context: Any, key: str) -> Any:
    if context is None:
        return None
    if isinstance(context, Mapping):
        return context.get(key)
    return getattr(context, key, None)


def _tagged(message: AIMessage, meta: dict[str, Any]) -> AIMessage:
    return message.model_copy(update={"response_metadata": {**message.response_metadata, METADATA_KEY: meta}})


def _structured_tools(fmt: Any) -> tuple[list[Any], str | None]:
    """The schema tools create_agent binds for ``fmt``, and its kind: "tool", "provider", "auto" or None."""
    if fmt is None:
        return [], None
    if isinstance(fmt, ProviderStrategy):
        return [], "provider"
    if isinstance(fmt, ToolStrategy):
        return [OutputToolBinding.from_schema_spec(spec).tool for spec in fmt.schema_specs], "tool"
    schema = fmt.schema if isinstance(fmt, AutoStrategy) else fmt
    return [OutputToolBinding.from_schema_spec(spec).tool for spec in ToolStrategy(schema=schema).schema_specs], "auto"


def _cannot_take(expert: BaseChatModel, tools: list[Any], fmt: Any, tool_choice: Any) -> str | None:
    """Why ``expert`` cannot take a call with these tools and response format (None: it can)."""
    profile = expert.profile if isinstance(expert.profile, Mapping) else {}
    schema_tools, kind = _structured_tools(fmt)
    if kind == "provider" or (kind == "auto" and profile.get("structured_output")):
        # Native structured output: create_agent passes the schema through ``bind_tools``.
        if kind == "provider" and profile.get("structured_output") is False:
            return "its profile says it has no native structured output"
        if type(expert).bind_tools is BaseChatModel.bind_tools:
            return f"{type(expert).__name__} does not implement bind_tools, which structured output goes through"
        return _bind_failure(expert, profile, tools, tool_choice) if tools else None
    if schema_tools:
        return _bind_failure(expert, profile, tools + schema_tools, "any")
    return _bind_failure(expert, profile, tools, tool_choice)


def _bind_failure(expert: BaseChatModel, profile: Mapping[str, Any], tools: list[Any], tool_choice: Any) -> str | None:
    if profile.get("tool_calling") is False:
        return "its profile says it cannot call tools"
    if type(expert).bind_tools is BaseChatModel.bind_tools:
        return f"{type(expert).__name__} does not implement tool calling"
    try:
        if tool_choice is None:
            expert.bind_tools(tools)
        else:
            expert.bind_tools(tools, tool_choice=tool_choice)
    except (NotImplementedError, TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


__all__ = ["MODES", "TORouterContext", "TORouterMiddleware", "TORouterState"]
