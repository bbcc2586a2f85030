"""Glue shared by ``ChatTORouter`` and ``TORouterRunnable``: LangChain inputs, callbacks and metadata.

No routing happens here: who may answer, which text is routed on, the ranking and the
fallback order come from ``torouter.Controller`` and its fallback helpers, and LangChain
inputs become the core's prompt format in ``messages``. This module builds the callback managers that
make an expert's call a child run, and shapes the decision into response metadata.
"""

from __future__ import annotations

import contextlib
import warnings
import os
from pathlib import Path
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    BaseCallbackHandler,
    BaseRunManager,
    CallbackManager,
    UsageMetadataCallbackHandler,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig, RunnableLambda

from torouter.policy import METADATA_KEY, Decision
from torouter.routers import Router

from .messages import as_chunk, messages_to_prompt, to_prompt  # noqa: F401 - moved there; still imported from here

try:  # context variables whose handlers LangChain adds to every run it configures
    from langchain_core.tracers.context import _configure_hooks as _CONFIGURE_HOOKS
except ImportError:  # pragma: no cover - older langchain-core 1.x
    _CONFIGURE_HOOKS = []

try:  # handlers that turn a run's tokens into a stream (astream_events, astream_log, LangGraph "messages")
    from langchain_core.tracers._streaming import _StreamingCallbackHandler, _V2StreamingCallbackHandler
except ImportError:  # pragma: no cover - older langchain-core 1.x
    from langchain_core.tracers._streaming import _StreamingCallbackHandler
    _V2StreamingCallbackHandler = _StreamingCallbackHandler


ROUTE_TEXT_KEY = "torouter_route_text"
"""Run-metadata key holding the text to route on, set by ``route_on_input`` for every run inside a chain."""

ROUTING_OPTIONS = ("expert", "model", "cost_weight", "max_cost")
"""Per-call keyword arguments that steer routing and are never passed to an expert."""

# Decisions made ahead of time for one request (``batch`` routes a whole batch in one
# router call) and the parent run of a ``stream`` call; see ``predecided``/``stream_parent``.
_PREDECIDED: ContextVar[tuple[int, Decision] | None] = ContextVar("torouter_predecided", default=None)
_STREAM_PARENT: ContextVar[tuple[int, RunnableConfig] | None] = ContextVar("torouter_stream_parent", default=None)


def outcome(decision: Decision, expert: str, failures: Mapping[str, BaseException], forced: bool) -> dict[str, Any]:
    """The routing metadata a response carries (built by the core, shared with LlamaIndex)."""
    return decision.outcome(expert, failures, forced)


def attempt_config(callbacks: Any, decision: Decision, expert: str, forced: bool) -> RunnableConfig:
    """Config for calling ``expert``: a child of the routing run, tagged with the decision."""
    meta = {**decision.as_metadata(), "expert": expert, "chosen": decision.expert, "forced": forced,
            "attempt": decision.ranking.index(expert) + 1 if expert in decision.ranking else 1}
    config: RunnableConfig = {"metadata": {METADATA_KEY: meta}, "tags": [f"torouter:{expert}"]}
    if callbacks is not None:
        config["callbacks"] = callbacks
    return config


def relays_output(handler: BaseCallbackHandler) -> bool:
    """Whether ``handler`` re-emits or adds up what a run produces, so seeing it twice doubles it.

    Streaming handlers (``astream_events``, ``astream_log``, LangGraph's ``messages`` stream)
    forward each token of every chat-model run, and usage handlers
    (``get_usage_metadata_callback``, ``get_openai_callback``) add up every run's usage.
    The routed model's run already carries the expert's tokens and usage, so the
    expert's own child run must not reach these handlers a second time; tracers and
    other handlers still see it.
    """
    return (isinstance(handler, (_StreamingCallbackHandler, _V2StreamingCallbackHandler,
                                 UsageMetadataCallbackHandler))
            or type(handler).__name__ == "OpenAICallbackHandler")


@contextlib.contextmanager
def relays_hidden() -> Iterator[None]:
    """Keep context-registered relaying handlers (``get_usage_metadata_callback()``, ...) off an expert's run.

    Such handlers are not passed down with the callbacks: LangChain adds them to every
    run it configures while their context variable is set. Clearing those variables
    while the expert's run is configured keeps them off it (see ``relays_output``).
    """
    tokens = []
    for var, *_ in _CONFIGURE_HOOKS:
        handler = var.get()
        if handler is not None and relays_output(handler):
            tokens.append((var, var.set(None)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def hide_relays(iterator: Iterator[Any]) -> Iterator[Any]:
    """``iterator`` with every step run under ``relays_hidden`` (an expert's stream starts its run lazily)."""
    while True:
        with relays_hidden():
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


async def ahide_relays(iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``hide_relays`` for an async stream."""
    iterator = iterator.__aiter__()
    while True:
        with relays_hidden():
            try:
                item = await iterator.__anext__()
            except StopAsyncIteration:
                return
        yield item


def child_callbacks(run_manager: BaseRunManager, manager_cls: type = CallbackManager):
    """What ``get_child`` gives a chain run, for a chat-model run (which has no ``get_child``),
    less the handlers that would relay the expert's output a second time (see ``relays_output``)."""
    manager = manager_cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers([h for h in run_manager.inheritable_handlers if not relays_output(h)])
    manager.add_tags(run_manager.inheritable_tags)
    manager.add_metadata(run_manager.inheritable_metadata)
    return manager


def achild_callbacks(run_manager: BaseRunManager) -> AsyncCallbackManager:
    return child_callbacks(run_manager, AsyncCallbackManager)


@contextlib.contextmanager
def predecided(owner: object, decision: Decision | None) -> Iterator[None]:
    """Hand a decision made ahead of time to ``owner``'s next routing step in this context."""
    if decision is None:
        yield
        return
    token = _PREDECIDED.set((id(owner), decision))
    try:
        yield
    finally:
        _PREDECIDED.reset(token)


def take_predecided(owner: object) -> Decision | None:
    """The decision ``predecided`` left for ``owner``, once."""
    value = _PREDECIDED.get()
    if value is None or value[0] != id(owner):
        return None
    _PREDECIDED.set(None)
    return value[1]


@contextlib.contextmanager
def stream_parent(owner: object, config: RunnableConfig) -> Iterator[None]:
    """Tell ``owner``'s ``_stream`` the config (with ``run_id``) of the run it streams in."""
    token = _STREAM_PARENT.set((id(owner), config))
    try:
        yield
    finally:
        _STREAM_PARENT.reset(token)


def take_stream_parent(owner: object, manager_cls: type[CallbackManager] | type[AsyncCallbackManager]):
    """A child callback manager of the run ``stream_parent`` announced, or None.

    ``BaseChatModel.stream`` does not pass its run manager to ``_stream``; this rebuilds
    what that run's ``get_child`` would return from the same config and run id.
    """
    value = _STREAM_PARENT.get()
    if value is None or value[0] != id(owner):
        return None
    _STREAM_PARENT.set(None)
    config = value[1]
    manager = manager_cls.configure(
        inheritable_callbacks=config.get("callbacks"), inheritable_tags=config.get("tags"),
        inheritable_metadata=config.get("metadata"))
    # As ``get_child`` does: only what the parent run passes on (not e.g. its ``seq:step`` tag).
    manager.set_handlers([h for h in manager.inheritable_handlers if not relays_output(h)])
    manager.tags = list(manager.inheritable_tags)
    manager.metadata = dict(manager.inheritable_metadata)
    manager.parent_run_id = config["run_id"]
    return manager


def model_name(runnable: Runnable, fallback: str) -> str:
    """The model name a (possibly bound) chat model reports to tracing, else ``fallback``."""
    model = runnable
    while isinstance(model, RunnableBinding):
        model = model.bound
    if isinstance(model, BaseChatModel):
        try:
            name = model._get_ls_params().get("ls_model_name")
        except Exception:  # noqa: BLE001 - a name is a nicety; never fail a call over it
            name = None
        if isinstance(name, str) and name:
            return name
    return fallback


def tag_output(output: Any, meta: dict[str, Any]) -> Any:
    """Attach routing metadata to a message output (or the ``raw`` message of ``include_raw``)."""
    if isinstance(output, AIMessage):
        return output.model_copy(update={"response_metadata": {**output.response_metadata, METADATA_KEY: meta}})
    if isinstance(output, dict) and isinstance(output.get("raw"), AIMessage):
        return {**output, "raw": tag_output(output["raw"], meta)}
    return output


def forced_expert(kwargs: dict[str, Any]) -> str | None:
    """Pop the expert a call forces: ``expert=`` (as in LlamaIndex), or the deprecated ``model=``."""
    forced = kwargs.pop("expert", None)
    if "model" in kwargs:
        model = kwargs.pop("model")
        if model is not None:
            warnings.warn("model= to force an expert is deprecated; use expert= (the same keyword as "
                          "llamaindex_torouter)", DeprecationWarning, stacklevel=4)
            if forced is not None and forced != model:
                raise ValueError(f"expert={forced!r} and model={model!r} name different experts")
            forced = model
    if forced is not None and not isinstance(forced, str):
        raise TypeError(f"expert must be an expert name, got {type(forced).__name__}")
    return forced


def split_options(kwargs: dict[str, Any]) -> tuple[str | None, float | None, float | None]:
    """Pop the per-call routing options (``ROUTING_OPTIONS``) from ``kwargs``: forced expert, cost_weight, max_cost."""
    return forced_expert(kwargs), kwargs.pop("cost_weight", None), kwargs.pop("max_cost", None)


def run_batch(invoke: Callable[[int], Any], return_exceptions: bool) -> Callable[[int], Any]:
    """Wrap ``invoke(i)`` with ``Runnable.batch``'s ``return_exceptions`` semantics."""
    def one(i: int) -> Any:
        if not return_exceptions:
            return invoke(i)
        try:
            return invoke(i)
        except Exception as exc:  # noqa: BLE001 - returned to the caller, as Runnable.batch does
            return exc
    return one


def check_router(router: Any) -> Router | str | Path:
    """A fitted router or the directory it was saved to (the pydantic ``router`` field's check)."""
    if isinstance(router, os.PathLike) and not isinstance(router, Path):
        return Path(router)
    if not isinstance(router, (Router, str, Path)):
        raise ValueError(f"router must be a fitted torouter Router or a saved router directory, "
                         f"not a {type(router).__name__}")
    return router


def build_experts(experts: Any) -> dict[str, BaseChatModel]:
    """Expert chat models by name; a string is a model for ``langchain.chat_models.init_chat_model``."""
    if not isinstance(experts, Mapping) or not experts:
        raise ValueError("experts must be a non-empty dict of name -> LangChain chat model")
    built = {}
    for name, expert in experts.items():
        if isinstance(expert, str):
            try:
                import langchain.chat_models as chat_models
            except ImportError:
                raise ValueError(f"expert {name!r} is given as the string {expert!r}, which needs "
                                 "init_chat_model: pip install 'torouter[langchain]'") from None
            try:
                expert = chat_models.init_chat_model(expert)
            except Exception as exc:  # noqa: BLE001 - say which expert could not be built, and why
                raise ValueError(f"expert {name!r}: init_chat_model({expert!r}) failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(expert, BaseChatModel):
            raise ValueError(f"expert {name!r} is a {type(expert).__name__}, not a LangChain chat model; "
                             "use TORouterRunnable to route among other runnables")
        built[name] = expert
    return built


_ANY_EXPERT = ("tool_calling", "tool_choice", "structured_output")


def merged_profile(experts: Iterable[BaseChatModel]) -> dict[str, Any] | None:
    """What every routed request can count on: the smallest limits of the experts that state them.

    Numeric limits (``max_input_tokens``, ...) are the smallest any expert states, since any
    expert may answer. Tool calling and structured output hold if any expert has them
    (requests that need them route only among those); other capabilities only if all do.
    """
    profiles = [dict(expert.profile) for expert in experts if getattr(expert, "profile", None)]
    if not profiles:
        return None
    merged: dict[str, Any] = {}
    for key in {k for profile in profiles for k in profile}:
        values = [profile[key] for profile in profiles if key in profile]
        if all(isinstance(v, bool) for v in values):
            merged[key] = any(values) if key in _ANY_EXPERT else (all(values) and len(values) == len(profiles))
        elif all(isinstance(v, (int, float)) for v in values):
            merged[key] = min(values)
    return merged


def route_on_input(runnable: Runnable, key: str) -> Runnable:
    """Make every ``ChatTORouter`` inside ``runnable`` route on ``input[key]`` (a chain's question).

    For chains whose prompt buries the question where it cannot be found, for example
    ``route_on_input(prompt | llm, "question")`` with ``{"question": ..., "context": ...}``
    inputs. The text travels in the run's metadata, so ``invoke``, ``stream``, ``batch``
    and their async forms all see it.
    """
    def with_route_text(inputs: Mapping[str, Any]) -> Runnable:
        if not isinstance(inputs, Mapping) or key not in inputs:
            found = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise KeyError(f"route_on_input: the input has no key {key!r} (got {found})")
        value = inputs[key]
        text = value if isinstance(value, str) else str(value)
        return runnable.with_config(metadata={ROUTE_TEXT_KEY: text})

    return RunnableLambda(with_route_text, name=f"route_on_input[{key}]")
