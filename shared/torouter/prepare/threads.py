"""Threads of one expert's own: blocking calls run there, never in the event loop's shared pool.

A blocking expert (a sync Python callable, a LangChain or LlamaIndex model with no
async implementation, a local model) would otherwise share asyncio's default thread
pool, ``min(32, cpu + 4)`` threads for the whole process: ``concurrency: 32`` ran 6
calls at once on a 2-core machine, and the threads of a hung expert, which a timeout
abandons but cannot stop, took every thread the healthy experts needed.

``ExpertThreads(n)`` runs at most ``n`` calls at once, each in a daemon thread of its
own. A slot is held until the call's thread really ends, not when its caller stops
waiting: a hung expert fills its own ``n`` slots and then waits (and times out) on
them, while other experts keep their capacity. Calls still queued for a slot when
their caller gives up never start. The threads are daemons, so a call hung forever
does not keep the process alive after the run.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _grant(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller stopped waiting (a timeout); the outcome goes nowhere
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ExpertThreads:
    """At most ``size`` blocking calls of one expert at once, hung ones included, in daemon threads."""

    def __init__(self, size: int, name: str = "expert"):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.name = name
        self._lock = threading.Lock()
        self._busy = 0
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = collections.deque()

    @property
    def busy(self) -> int:
        """Slots held now: calls running, including those whose caller has given up on them."""
        return self._busy

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a thread of this expert, once a slot is free."""
        await self._acquire()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)

        def target() -> None:
            result, error = None, None
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                error = exc
            finally:
                self._release()
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the event loop is closed: nobody waits for this call any more
                pass

        try:
            threading.Thread(target=target, name=f"torouter-{self.name}", daemon=True).start()
        except BaseException:
            self._release()
            raise
        return await future

    async def _acquire(self) -> None:
        with self._lock:
            if self._busy < self.size and not self._waiters:
                self._busy += 1
                return
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove((loop, waiter))
                    handed = False
                except ValueError:  # a finishing call already handed its slot to us
                    handed = True
            if handed:
                self._release()
            raise

    def _release(self) -> None:
        """Hand the slot to the next waiter whose event loop still runs, or free it."""
        with self._lock:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(_grant, waiter)
                    return
                except RuntimeError:  # that waiter's event loop is closed
                    continue
            self._busy -= 1

    def __repr__(self) -> str:
        return f"ExpertThreads({self.name!r}, {self._busy}/{self.size} busy, {len(self._waiters)} waiting)"
