"""Routing concurrent requests together: one router call per batch, on the router's own thread."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .lanes import _Threads

logger = logging.getLogger("torouter.serve")


class _RoutingBatcher:
    """Routes concurrent requests together: one router call (one encoder pass) per batch.

    Requests that arrive while a batch is in the router wait for the next one, so an
    idle server adds no delay and a busy one spreads each forward pass over many
    prompts instead of queueing one pass per request. Inference runs on the router's
    own thread, never on the event loop nor on threads an expert could exhaust. A batch
    the router fails on is routed again prompt by prompt, so one bad prompt fails alone.
    """

    def __init__(self, controller: Any, threads: _Threads, max_batch: int = 64):
        self.controller = controller
        self.threads = threads
        self.max_batch = max_batch
        self._pending: list[tuple[Any, tuple, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    def bind(self) -> None:
        """Forget the queue of an event loop that is no longer running."""
        self._pending, self._worker = [], None

    async def decide(self, prompt: Any, allowed: list[str] | None, cost_weight: float | None = None,
                     max_cost: float | None = None) -> Any:
        self.controller.text(prompt)  # a prompt with nothing to route on fails alone, not its batch
        future = asyncio.get_running_loop().create_future()
        options = (None if allowed is None else tuple(allowed), cost_weight, max_cost)
        self._pending.append((prompt, options, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            # One router call per distinct (allowed experts, cost_weight, max_cost).
            groups: dict[tuple, list] = {}
            for item in batch:
                if not item[2].done():  # skip requests whose client went away or timed out
                    groups.setdefault(item[1], []).append(item)
            for options, items in groups.items():
                decisions = await self._route([prompt for prompt, _, _ in items], *options)
                for (_, _, future), decision in zip(items, decisions):
                    if future.done():
                        continue
                    if isinstance(decision, BaseException):
                        future.set_exception(decision)
                    else:
                        future.set_result(decision)

    async def _route(self, prompts: list[Any], allowed: tuple | None, cost_weight: float | None,
                     max_cost: float | None) -> list[Any]:
        """A decision (or the exception) per prompt."""
        loop = asyncio.get_running_loop()

        def decide(batch: list[Any]) -> list[Any]:
            return self.controller.decide_many(batch, allowed=allowed, cost_weight=cost_weight, max_cost=max_cost)

        try:
            return await loop.run_in_executor(self.threads, decide, prompts)
        except Exception as exc:  # noqa: BLE001 - handed to the request(s) below
            if len(prompts) == 1:
                return [exc]
            logger.warning("a routing batch of %d failed (%s); routing its requests one by one", len(prompts),
                           type(exc).__name__)
        decisions: list[Any] = []
        for prompt in prompts:
            try:
                decisions.extend(await loop.run_in_executor(self.threads, decide, [prompt]))
            except Exception as exc:  # noqa: BLE001 - this prompt's own failure
                decisions.append(exc)
        return decisions
