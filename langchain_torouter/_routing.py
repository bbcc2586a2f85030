"""Glue shared by ``ChatTORouter`` and ``TORouterRunnable``: LangChain inputs, callbacks and metadata.

No routing happens here: which text is routed on, the ranking and the fallback order
come from ``torouter.Controller`` and its fallback helpers. This module only turns
LangChain inputs into the core's prompt format, builds the callback managers that
make an expert's call a child run, and shapes the decision into response metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    BaseRunManager,
    CallbackManager,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig

from torouter.policy import Decision

METADATA_KEY = "torouter"
"""Key of the routing decision in ``response_metadata`` and in child-run metadata."""

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}

# Decisions made ahead of time for one request (``batch`` routes a whole batch in one
# router call) and the parent run of a ``stream`` call; see ``predecided``/``stream_parent``.
_PREDECIDED: ContextVar[tuple[int, Decision] | None] = ContextVar("torouter_predecided", default=None)
_STREAM_PARENT: ContextVar[tuple[int, RunnableConfig] | None] = ContextVar("torouter_stream_parent", default=None)


def messages_to_prompt(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the core's ``[{"role", "content"}]`` prompt (content blocks kept as they are)."""
    prompt = []
    for message in messages:
        if isinstance(message, ChatMessage):
            role = "system" if message.role == "developer" else message.role
        else:
            role = _ROLES.get(message.type, message.type)
        prompt.append({"role": role, "content": message.content})
    return prompt


def to_prompt(value: Any) -> str | list[dict[str, Any]]:
    """A LangChain model input (string, prompt value, message or message list) as a core prompt."""
    if isinstance(value, str):
        return value
    if isinstance(value, PromptValue):
        messages = value.to_messages()
    elif isinstance(value, BaseMessage):
        messages = [value]
    elif isinstance(value, Mapping):
        raise ValueError("cannot route on a dict input; set input_key to the key that holds the text")
    elif isinstance(value, Sequence):
        messages = convert_to_messages(value)
    else:
        raise TypeError(f"cannot route on a {type(value).__name__}; expected a string, prompt value or messages")
    if not messages:
        raise ValueError("got an empty message list: there is nothing to route on")
    return messages_to_prompt(messages)


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


def child_callbacks(run_manager: BaseRunManager, manager_cls: type = CallbackManager):
    """What ``get_child`` gives a chain run, for a chat-model run (which has no ``get_child``)."""
    manager = manager_cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(run_manager.inheritable_handlers)
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
    manager.handlers = list(manager.inheritable_handlers)
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


def split_options(kwargs: dict[str, Any]) -> tuple[str | None, float | None, float | None]:
    """Pop the per-call routing options ``model``, ``cost_weight`` and ``max_cost`` from ``kwargs``."""
    forced = kwargs.pop("model", None)
    if forced is not None and not isinstance(forced, str):
        raise TypeError(f"model must be an expert name, got {type(forced).__name__}")
    return forced, kwargs.pop("cost_weight", None), kwargs.pop("max_cost", None)


def candidates(forced: str | None, experts: Sequence[str], usable: Sequence[str] | None,
               skipped: Mapping[str, str]) -> list[str] | None:
    """Experts a request may go to (None: all), checking a forced ``model=`` name."""
    if forced is None:
        return None if usable is None else list(usable)
    if forced not in experts:
        raise ValueError(f"model={forced!r} is not one of the experts {sorted(experts)}")
    if usable is not None and forced not in usable:
        raise ValueError(f"expert {forced!r} cannot take this request: {skipped.get(forced, 'not usable')}")
    return [forced]


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
