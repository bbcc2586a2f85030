"""A thin controller over a trained router: one conversation in, a decision and fallbacks out.

This is all the routing logic the framework adapters (LangChain, LlamaIndex, the
HTTP endpoint) need: which text to route on, the cost-aware ranking, and trying
the next expert in that ranking when the chosen one fails before producing output.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from .data import Prompt, prompt_text
from .policy import Decision, rank
from .routers import Router, load_router

T = TypeVar("T")
ROUTE_ON = ("last_user", "conversation")


class AllExpertsFailed(RuntimeError):
    """Every expert tried for a request failed; ``failures`` maps each to its exception."""

    def __init__(self, failures: dict[str, BaseException]):
        self.failures = failures
        detail = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failures.items())
        super().__init__(f"all {len(failures)} experts failed: {detail}")


class Controller:
    """Decides which expert answers a prompt.

    ``route_on`` picks the text the router reads in a multi-turn conversation:
    ``last_user`` (default) reads the latest user message, so a long system prompt
    shared by every request (RAG instructions, a persona) cannot drown the question;
    ``conversation`` reads every system and user message, oldest first, which is
    also how routers read message-list prompts in routing data. For single-turn
    prompts, the usual case in routing data, both read the same text.
    """

    def __init__(self, router: Router | str | os.PathLike, cost_weight: float = 0.0,
                 max_cost: float | None = None, route_on: str = "last_user",
                 prices: dict[str, float] | None = None):
        self.router = router if isinstance(router, Router) else load_router(router)
        self.router._check_fitted()
        if route_on not in ROUTE_ON:
            raise ValueError(f"route_on must be one of {ROUTE_ON}, not {route_on!r}")
        if cost_weight < 0:
            raise ValueError(f"cost_weight must be >= 0, got {cost_weight}")
        self.cost_weight = cost_weight
        self.max_cost = max_cost
        self.route_on = route_on
        self.costs = self.router.costs(prices)

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
        text = prompt_text(prompt, self.route_on)
        if not text.strip():
            what = "user message text" if self.route_on == "last_user" else "user or system text"
            raise ValueError(f"nothing to route on: the prompt has no {what} (route_on={self.route_on!r})")
        return text

    def decide(self, prompt: Prompt, allowed: Iterable[str] | None = None,
               cost_weight: float | None = None, max_cost: float | None = None) -> Decision:
        """Rank the (allowed) experts for ``prompt``; ``Decision.ranking`` is the fallback order."""
        return self.decide_many([prompt], allowed, cost_weight, max_cost)[0]

    async def adecide(self, prompt: Prompt, allowed: Iterable[str] | None = None,
                      cost_weight: float | None = None, max_cost: float | None = None) -> Decision:
        """``decide`` in a worker thread, so router inference never blocks the event loop."""
        return await asyncio.to_thread(self.decide, prompt, allowed, cost_weight, max_cost)

    def decide_many(self, prompts: Sequence[Prompt], allowed: Iterable[str] | None = None,
                    cost_weight: float | None = None, max_cost: float | None = None) -> list[Decision]:
        """``decide`` for many prompts with one router call: batched inference costs far less per prompt."""
        texts = [self.text(prompt) for prompt in prompts]
        if not texts:
            return []
        allowed = None if allowed is None else list(allowed)
        quality = self.router.predict(texts)
        return [self._decision(text, q, allowed, cost_weight, max_cost) for text, q in zip(texts, quality)]

    async def adecide_many(self, prompts: Sequence[Prompt], allowed: Iterable[str] | None = None,
                           cost_weight: float | None = None, max_cost: float | None = None) -> list[Decision]:
        """``decide_many`` in a worker thread, off the event loop."""
        return await asyncio.to_thread(self.decide_many, prompts, allowed, cost_weight, max_cost)

    def _decision(self, text: str, quality, allowed, cost_weight, max_cost) -> Decision:
        weight = self.cost_weight if cost_weight is None else cost_weight
        budget = self.max_cost if max_cost is None else max_cost
        mask = None
        if allowed is not None:
            allowed = set(allowed)
            unknown = allowed - set(self.experts)
            if unknown:
                raise ValueError(f"unknown experts {sorted(unknown)}; the router knows {self.experts}")
            if not allowed:
                raise ValueError("no expert is allowed for this request")
            mask = [e in allowed for e in self.experts]
        order = rank(quality, self.costs, weight, budget, mask)
        names = [self.experts[i] for i in order]
        return Decision(
            expert=names[0], ranking=names,
            scores={e: float(q) for e, q in zip(self.experts, quality)},
            costs={e: float(c) for e, c in zip(self.experts, self.costs)},
            cost_weight=weight, max_cost=budget, routed_text=text)


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
