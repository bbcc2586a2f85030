"""A thin controller over a trained router: one conversation in, a decision and fallbacks out.

This is all the routing logic the framework adapters (LangChain, LlamaIndex, the
HTTP endpoint) need: who may answer a request (``eligible``), which text to route
on, the cost-aware ranking, and trying the next expert in that ranking when the
chosen one fails before producing output. Adapters only translate their framework's
request into a core prompt plus these options, and the decision back.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from dataclasses import replace
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from .data import Prompt
from .errors import AllExpertsFailed, IneligibleRequest, RoutingError
from .policy import Decision, rank
from .routers import Router, load_router
from .routing_text import MAX_CHARS, ROUTE_ON, RouteOn, routing_text

T = TypeVar("T")

__all__ = ["AllExpertsFailed", "Controller", "IneligibleRequest", "RoutingError", "acall_with_fallbacks",
           "astream_with_fallbacks", "call_with_fallbacks", "check_cost_options", "stream_with_fallbacks"]


class Controller:
    """Decides which expert answers a prompt.

    ``route_on`` picks the text the router reads (see :func:`torouter.routing_text`):
    ``last_user`` (default) reads the latest user turn, ``recent_user`` the last few user
    turns, ``conversation`` the system prompt and every user turn, or a callable returns
    the text. Every mode skips tool results, ReAct observations and summaries and takes
    the question out of a filled RAG template, so retrieved context, tool output and a
    shared system prompt cannot drown the question.

    When a request has no text to route on (an image-only or empty request), the router
    ranks the experts for the empty text and ``default_expert``, if set, goes first.

    Predictions are cached by routed text, and decisions by routed text plus the
    settings that shape them (cost weight, budget, eligible experts), ``cache_size``
    entries each, least recently used dropped; 0 turns caching off. An agent's model
    calls within one user turn, and retries, route on the same question, so after the
    first call a decision costs a dictionary look-up instead of an encoder pass.
    ``router_calls`` and ``cache_hits`` count both.
    """

    def __init__(self, router: Router | str | os.PathLike, cost_weight: float = 0.0,
                 max_cost: float | None = None, route_on: RouteOn = "last_user",
                 prices: dict[str, float] | None = None, default_expert: str | None = None,
                 cache_size: int = 1024, max_chars: int = MAX_CHARS):
        self.router = router if isinstance(router, Router) else load_router(router)
        self.router._check_fitted()
        if not callable(route_on) and route_on not in ROUTE_ON:
            raise ValueError(f"route_on must be one of {ROUTE_ON} or a callable, not {route_on!r}")
        check_cost_options(cost_weight, max_cost)
        if default_expert is not None and default_expert not in self.router.experts_:
            raise ValueError(f"default_expert={default_expert!r} is not one of the router's experts "
                             f"{list(self.router.experts_)}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.cost_weight = cost_weight
        self.max_cost = max_cost
        self.route_on = route_on
        self.default_expert = default_expert
        self.cache_size = cache_size
        self.max_chars = max_chars
        self.costs = self.router.costs(prices)
        self.router_calls = 0
        self.cache_hits = 0
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._decisions: OrderedDict[tuple, Decision] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def experts(self) -> list[str]:
        return list(self.router.experts_)

    def check_experts(self, names: Iterable[str]) -> None:
        """Raise if the given expert names and the router's do not match exactly."""
        names = set(names)
        unknown, missing = names - set(self.experts), set(self.experts) - names
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown to the router: {sorted(unknown)}")
            if missing:
                parts.append(f"missing for the router's experts: {sorted(missing)}")
            raise ValueError(f"expert names do not match the router's {self.experts}; " + "; ".join(parts))

    def text(self, prompt: Prompt) -> str:
        """The text the router reads for ``prompt``; empty when there is nothing to route on."""
        return routing_text(prompt, self.route_on, max_chars=self.max_chars)

    def quality(self, texts: Sequence[str]) -> np.ndarray:
        """The router's quality estimates for ``texts`` (one row each), from the cache where possible."""
        rows: list[np.ndarray | None] = [None] * len(texts)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                cached = self._cache.get(text) if self.cache_size else None
                if cached is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._cache.move_to_end(text)
                    self.cache_hits += 1
                    rows[i] = cached
        if missing:
            todo = list(missing)
            predicted = np.asarray(self.router.predict(todo), dtype=float)
            with self._lock:
                self.router_calls += 1
                for text, row in zip(todo, predicted):
                    for i in missing[text]:
                        rows[i] = row
                    if self.cache_size:
                        self._cache[text] = row
                        self._cache.move_to_end(text)
                        while len(self._cache) > self.cache_size:
                            self._cache.popitem(last=False)
        return np.stack(rows) if rows else np.zeros((0, len(self.experts)))  # type: ignore[arg-type]

    def clear_cache(self) -> None:
        """Forget cached predictions and decisions (needed only if the router object is refitted in place)."""
        with self._lock:
            self._cache.clear()
            self._decisions.clear()

    def eligible(self, expert: str | None = None, allowed: Iterable[str] | None = None,
                 unable: Mapping[str, str] | None = None) -> list[str] | None:
        """The experts a request may go to, in the router's order, or None when every expert may.

        ``expert`` forces one expert; ``allowed`` narrows the choice to some experts;
        ``unable`` names experts that cannot take this request and why (the adapter's
        finding, e.g. an expert that could not bind the request's tools). Raises
        ``IneligibleRequest`` saying why when a forced expert is unknown, not allowed or
        unable, when ``allowed`` names unknown experts, and when nobody is left.
        """
        names = self.experts
        allowed_set = None if allowed is None else set([allowed] if isinstance(allowed, str) else allowed)
        unable = dict(unable or {})
        unknown = (allowed_set or set()) - set(names)
        if unknown:
            raise IneligibleRequest(f"unknown experts {sorted(unknown)} in allowed: unknown to the router, "
                                    f"which knows {names}")
        unknown = set(unable) - set(names)
        if unknown:
            raise IneligibleRequest(f"unknown experts {sorted(unknown)} marked unable; the router knows {names}")
        if expert is not None:
            if not isinstance(expert, str):
                raise IneligibleRequest(f"expert must be an expert name, got {type(expert).__name__}")
            if expert not in names:
                raise IneligibleRequest(f"unknown expert {expert!r}: expert={expert!r} is not one of the "
                                        f"experts {sorted(names)}")
            if allowed_set is not None and expert not in allowed_set:
                raise IneligibleRequest(f"expert {expert!r} is not allowed for this request "
                                        f"(allowed: {sorted(allowed_set)})")
            if expert in unable:
                raise IneligibleRequest(f"expert {expert!r} cannot take this request: {unable[expert]}")
            return [expert]
        pool = [n for n in names if (allowed_set is None or n in allowed_set) and n not in unable]
        if not pool:
            if unable:
                raise IneligibleRequest(f"no expert can take this request: {unable}")
            raise IneligibleRequest("no expert is allowed for this request")
        return None if len(pool) == len(names) else pool

    def decide(self, prompt: Prompt, allowed: Iterable[str] | None = None,
               cost_weight: float | None = None, max_cost: float | None = None, *,
               expert: str | None = None, unable: Mapping[str, str] | None = None) -> Decision:
        """Rank the eligible experts for ``prompt`` (see ``eligible``); ``Decision.ranking`` is the fallback order."""
        return self.decide_many([prompt], allowed, cost_weight, max_cost, expert=expert, unable=unable)[0]

    async def adecide(self, prompt: Prompt, allowed: Iterable[str] | None = None,
                      cost_weight: float | None = None, max_cost: float | None = None, *,
                      expert: str | None = None, unable: Mapping[str, str] | None = None) -> Decision:
        """``decide`` in a worker thread, so router inference never blocks the event loop."""
        return await asyncio.to_thread(self.decide, prompt, allowed, cost_weight, max_cost,
                                       expert=expert, unable=unable)

    def decide_many(self, prompts: Sequence[Prompt], allowed: Iterable[str] | None = None,
                    cost_weight: float | None = None, max_cost: float | None = None, *,
                    expert: str | None = None, unable: Mapping[str, str] | None = None) -> list[Decision]:
        """``decide`` for many prompts with one router call: batched inference costs far less per prompt."""
        pool = self.eligible(expert, allowed, unable)
        weight = self.cost_weight if cost_weight is None else cost_weight
        budget = self.max_cost if max_cost is None else max_cost
        check_cost_options(weight, budget)
        texts = [self.text(prompt) for prompt in prompts]
        if not texts:
            return []
        pool_key = None if pool is None else tuple(pool)
        keys = [(text, weight, budget, pool_key) for text in texts]
        decisions: list[Decision | None] = [None] * len(texts)
        todo = list(range(len(texts)))
        if self.cache_size:
            todo = []
            with self._lock:
                for i, (text, key) in enumerate(zip(texts, keys)):
                    cached = self._decisions.get(key)
                    if cached is None:
                        todo.append(i)
                    else:
                        self._decisions.move_to_end(key)
                        if text in self._cache:  # keep both caches' recency in step
                            self._cache.move_to_end(text)
                        self.cache_hits += 1
                        decisions[i] = _copy(cached)
        if todo:
            quality = self.quality([texts[i] for i in todo])
            for i, q in zip(todo, quality):
                decisions[i] = self._decision(texts[i], q, pool, weight, budget)
            if self.cache_size:
                with self._lock:
                    for i in todo:
                        self._decisions[keys[i]] = _copy(decisions[i])  # type: ignore[arg-type]
                        while len(self._decisions) > self.cache_size:
                            self._decisions.popitem(last=False)
        return decisions  # type: ignore[return-value]

    async def adecide_many(self, prompts: Sequence[Prompt], allowed: Iterable[str] | None = None,
                           cost_weight: float | None = None, max_cost: float | None = None, *,
                           expert: str | None = None, unable: Mapping[str, str] | None = None) -> list[Decision]:
        """``decide_many`` in a worker thread, off the event loop."""
        return await asyncio.to_thread(self.decide_many, prompts, allowed, cost_weight, max_cost,
                                       expert=expert, unable=unable)

    def _decision(self, text: str, quality: np.ndarray, pool: list[str] | None, weight: float,
                  budget: float | None) -> Decision:
        mask = None if pool is None else [e in pool for e in self.experts]
        order = rank(quality, self.costs, weight, budget, mask)
        names = [self.experts[i] for i in order]
        if not text.strip() and self.default_expert in names:
            names.remove(self.default_expert)
            names.insert(0, self.default_expert)
        return Decision(
            expert=names[0], ranking=names,
            scores={e: float(q) for e, q in zip(self.experts, quality)},
            costs={e: float(c) for e, c in zip(self.experts, self.costs)},
            cost_weight=weight, max_cost=budget, routed_text=text)


def _copy(decision: Decision) -> Decision:
    """A decision callers may change without touching the cached one."""
    return replace(decision, ranking=list(decision.ranking), scores=dict(decision.scores),
                   costs=dict(decision.costs))


def check_cost_options(cost_weight: float, max_cost: float | None) -> None:
    """Refuse a negative or non-finite ``cost_weight`` and a negative or NaN ``max_cost``."""
    if not isinstance(cost_weight, (int, float)) or isinstance(cost_weight, bool) \
            or not np.isfinite(cost_weight) or cost_weight < 0:
        raise ValueError(f"cost_weight must be a finite number >= 0, got {cost_weight!r}")
    if max_cost is not None and (not isinstance(max_cost, (int, float)) or isinstance(max_cost, bool)
                                 or np.isnan(max_cost) or max_cost < 0):
        raise ValueError(f"max_cost must be a number >= 0 or None, got {max_cost!r}")


def call_with_fallbacks(ranking: list[str], call: Callable[[str], T],
                        fallbacks: bool = True) -> tuple[str, T, dict[str, BaseException]]:
    """Call experts in ranking order until one succeeds: ``(expert, result, earlier failures)``."""
    failures: dict[str, BaseException] = {}
    for name in ranking if fallbacks else ranking[:1]:
        try:
            return name, call(name), failures
        except Exception as exc:  # noqa: BLE001 - any expert failure moves on to the next one
            failures[name] = exc
    if not fallbacks and len(failures) == 1:
        raise next(iter(failures.values()))
    raise AllExpertsFailed(failures)


async def acall_with_fallbacks(ranking: list[str], call: Callable[[str], Awaitable[T]],
                               fallbacks: bool = True) -> tuple[str, T, dict[str, BaseException]]:
    failures: dict[str, BaseException] = {}
    for name in ranking if fallbacks else ranking[:1]:
        try:
            return name, await call(name), failures
        except Exception as exc:  # noqa: BLE001
            failures[name] = exc
    if not fallbacks and len(failures) == 1:
        raise next(iter(failures.values()))
    raise AllExpertsFailed(failures)


def stream_with_fallbacks(ranking: list[str], start: Callable[[str], Iterable[Any]],
                          fallbacks: bool = True) -> Iterator[tuple[str, Any, dict[str, BaseException]]]:
    """Stream from the first expert that yields a first chunk; later errors propagate.

    Yields ``(expert, chunk, failures before this expert)``.
    """
    failures: dict[str, BaseException] = {}
    for name in ranking if fallbacks else ranking[:1]:
        try:
            iterator = iter(start(name))
            first = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001
            failures[name] = exc
            continue
        yield name, first, failures
        for chunk in iterator:
            yield name, chunk, failures
        return
    if not fallbacks and len(failures) == 1:
        raise next(iter(failures.values()))
    raise AllExpertsFailed(failures)


async def astream_with_fallbacks(ranking: list[str], start: Callable[[str], AsyncIterator[Any]],
                                 fallbacks: bool = True) -> AsyncIterator[tuple[str, Any, dict[str, BaseException]]]:
    failures: dict[str, BaseException] = {}
    for name in ranking if fallbacks else ranking[:1]:
        try:
            iterator = start(name).__aiter__()
            first = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except Exception as exc:  # noqa: BLE001
            failures[name] = exc
            continue
        yield name, first, failures
        async for chunk in iterator:
            yield name, chunk, failures
        return
    if not fallbacks and len(failures) == 1:
        raise next(iter(failures.values()))
    raise AllExpertsFailed(failures)
