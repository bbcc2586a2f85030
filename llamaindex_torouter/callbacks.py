"""``RoutedCallbackManager``: each routed call is one LLM event for every callback handler."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload

from torouter.policy import METADATA_KEY

if TYPE_CHECKING:
    from .base import TORouterLLM


def _routed_expert(payload: Mapping[str, Any] | None) -> str | None:
    """The expert that answered, from a callback end payload's response."""
    if not payload:
        return None
    response = payload.get(EventPayload.RESPONSE) or payload.get(EventPayload.COMPLETION)
    routed = getattr(response, "additional_kwargs", {}).get(METADATA_KEY) if response is not None else None
    return routed.get("expert") if isinstance(routed, dict) else None


class RoutedCallbackManager(CallbackManager):
    """``TORouterLLM``'s callback manager: one LLM event per routed call for every handler.

    A routed call is two LLM calls to LlamaIndex's callback system: the router's and the
    expert's. Where a handler also listens to the experts (``Settings.callback_manager``
    is shared by every LLM built after it is set), counting both would count each call
    twice, so such handlers hear only the expert's own event. The router tells the
    other handlers; one the answering expert turns out not to have (a handler given to
    some experts only) hears the router's event when the call ends. Everything else
    (handlers, traces) is the wrapped manager's, so adding a handler to either shows in both.
    """

    def __init__(self, inner: CallbackManager, llm: TORouterLLM):
        # CallbackManager.__init__ is not called: it would put Settings' or the global
        # handlers on an empty list, while this manager keeps the wrapped one's.
        self.inner = inner
        self._llm = llm
        self._hidden: ContextVar[frozenset[int]] = ContextVar(f"torouter_hidden_{id(self)}", default=frozenset())
        self._held: OrderedDict[str, tuple[Any, str, list, frozenset[int]]] = OrderedDict()

    @property
    def handlers(self) -> list:  # type: ignore[override]
        hidden = self._hidden.get()
        if not hidden:
            return self.inner.handlers
        return [h for h in self.inner.handlers if id(h) not in hidden]

    @handlers.setter
    def handlers(self, handlers: list) -> None:
        self.inner.handlers = handlers

    @property
    def _trace_map(self):  # type: ignore[override]
        return self.inner._trace_map

    @_trace_map.setter
    def _trace_map(self, value) -> None:
        self.inner._trace_map = value

    def _expert_handlers(self, name: str | None = None) -> set[int]:
        experts = self._llm._experts if name is None else {name: self._llm._experts[name]}
        ids: set[int] = set()
        for expert in experts.values():
            manager = getattr(expert, "callback_manager", None)
            if isinstance(manager, CallbackManager):
                ids.update(id(h) for h in manager.handlers)
        return ids

    def on_event_start(self, event_type: CBEventType, payload: dict[str, Any] | None = None,
                       event_id: str | None = None, parent_id: str | None = None, **kwargs: Any) -> str:
        if event_type != CBEventType.LLM:
            return super().on_event_start(event_type, payload, event_id, parent_id, **kwargs)
        event_id = event_id or str(uuid.uuid4())
        shared = frozenset(id(h) for h in self.inner.handlers) & self._expert_handlers()
        token = self._hidden.set(shared)
        try:
            super().on_event_start(event_type, payload, event_id, parent_id, **kwargs)
        finally:
            self._hidden.reset(token)
        if shared:
            from llama_index.core.callbacks.base import global_stack_trace

            held = [h for h in self.inner.handlers
                    if id(h) in shared and event_type not in h.event_starts_to_ignore]
            self._held[event_id] = (payload, parent_id or global_stack_trace.get()[-1], held, shared)
            while len(self._held) > 4096:  # streams abandoned before their end
                self._held.popitem(last=False)
        return event_id

    def on_event_end(self, event_type: CBEventType, payload: dict[str, Any] | None = None,
                     event_id: str | None = None, **kwargs: Any) -> None:
        if event_type != CBEventType.LLM or event_id not in self._held:
            return super().on_event_end(event_type, payload, event_id, **kwargs)
        start_payload, parent_id, held, shared = self._held.pop(event_id)
        expert = _routed_expert(payload)
        if expert in self._llm._experts:
            told = self._expert_handlers(expert)
            for handler in held:
                if id(handler) not in told:
                    handler.on_event_start(event_type, start_payload, event_id=event_id, parent_id=parent_id)
                    if event_type not in handler.event_ends_to_ignore:
                        handler.on_event_end(event_type, payload, event_id=event_id, **kwargs)
        token = self._hidden.set(shared)
        try:
            super().on_event_end(event_type, payload, event_id, **kwargs)
        finally:
            self._hidden.reset(token)
