"""Each expert's own capacity, so a slow or hung expert can only exhaust its own share.

An expert's lane holds its calls in progress (``Limits.expert_concurrency``) and its
own threads for blocking work (``Limits.expert_threads``); the event loop's default
executor sends blocking work submitted during an expert call to that expert's threads,
and a watch thread moves an expert whose async code blocks the event loop onto its
threads for good.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel

logger = logging.getLogger("torouter.serve")

_BLOCKING_STEP_S = 0.5  # an expert's async code holding the event loop this long runs on threads from then on


class _Threads(concurrent.futures.Executor):
    """A fixed-size pool of daemon threads, started as work arrives.

    Daemon threads, because a call that never returns (a hung expert) must hold only its
    own thread: never another expert's, and never the process's exit on SIGTERM.
    """

    def __init__(self, size: int, name: str):
        self.size, self.name = size, name
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self.name} threads have been shut down")
            self._work.put((future, fn, args, kwargs))
            if self._idle:
                self._idle -= 1  # an idle thread takes it
            elif self._started < self.size:
                self._started += 1
                threading.Thread(target=self._serve, name=f"{self.name}-{self._started}", daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():  # False: cancelled while it waited
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # Never joins: a thread stuck in a hung call would hold shutdown forever.
        with self._lock:
            self._closed = True
            for _ in range(self._started):
                self._work.put(None)


_LANE: contextvars.ContextVar[_Lane | None] = contextvars.ContextVar("torouter_lane", default=None)


class _LoopExecutor(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor, so blocking work lands on its owner's threads.

    LangChain (``run_in_executor(None, ...)``) and many experts (``asyncio.to_thread``) hand
    blocking work to the loop's default executor; submitted while an expert call runs, it
    goes to that expert's own threads, so one expert's slow or hung work cannot take the
    threads every other expert and the router need. Anything else runs here as usual.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        lane = _LANE.get()
        if lane is not None:
            return lane.threads.submit(fn, *args, **kwargs)
        return super().submit(fn, *args, **kwargs)


class _Lane:
    """One expert's own capacity: ``concurrency`` calls in progress and ``threads`` for blocking work."""

    def __init__(self, name: str, concurrency: int, threads: int, threaded: bool):
        self.name = name
        self.concurrency = concurrency
        self.threads = _Threads(threads, f"torouter-expert-{name}")
        self.threaded = threaded
        self.active = 0
        self.slots = asyncio.Semaphore(concurrency)

    def bind(self) -> None:
        """Fresh asyncio state for the event loop now running (a semaphore serves one loop)."""
        self.slots = asyncio.Semaphore(self.concurrency)

    def on_threads(self, runnable: Any, stream: bool) -> bool:
        """Whether a call runs through the expert's sync API on its threads, not its async API on the loop."""
        if self.threaded:
            return True
        model = runnable
        while not isinstance(model, BaseChatModel) and hasattr(model, "bound"):  # tools bound to the expert
            model = model.bound
        if not isinstance(model, BaseChatModel):
            return False
        cls = type(model)
        async_invoke = cls._agenerate is not BaseChatModel._agenerate
        if not stream:
            return not async_invoke
        if cls._astream is not BaseChatModel._astream:
            return False
        # No async stream: LangChain would stream the sync one from threads, or answer with one invoke.
        return cls._stream is not BaseChatModel._stream or not async_invoke


class _LoopWatch(threading.Thread):
    """Notices an expert's async code blocking the event loop, and moves that expert to its own threads.

    A daemon thread pings the loop ten times a second. When a ping has waited
    ``_BLOCKING_STEP_S``, it reads the loop thread's stack three times, a quarter of a
    second apart: an expert whose same call is on the stack every time, while the ping
    still waits, is what holds the loop (a loop merely starved of CPU moves on between
    samples), and its calls run on its own threads from then on. Its first blocking call
    cannot be taken back; ``threaded: true`` in its config avoids even that one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, lanes: Mapping[int, _Lane]):
        super().__init__(name="torouter-loop-watch", daemon=True)
        self.loop, self.lanes, self.loop_thread = loop, lanes, threading.get_ident()

    def run(self) -> None:
        while True:
            beat, sent = threading.Event(), time.monotonic()
            try:
                self.loop.call_soon_threadsafe(beat.set)
            except RuntimeError:  # the loop is closed: the server stopped
                return
            if not beat.wait(_BLOCKING_STEP_S):
                samples = [self._expert_frame()]
                for _ in range(2):
                    time.sleep(0.25)
                    samples.append(self._expert_frame())
                first = samples[0]
                if first is not None and not beat.is_set() and all(
                        sample is not None and sample[0] is first[0] for sample in samples):
                    lane = first[1]
                    if not lane.threaded:
                        lane.threaded = True
                        logger.warning("expert %r blocked the event loop for %.1f s or more in its async code; its "
                                       "calls now run on its own threads (set threaded: true in its config to "
                                       "start that way)", lane.name, time.monotonic() - sent)
                while not beat.wait(1.0):
                    if self.loop.is_closed():
                        return
            time.sleep(0.1)

    def _expert_frame(self) -> tuple[Any, _Lane] | None:
        """The innermost frame on the loop thread that runs a method of an expert, and that expert's lane."""
        frame = sys._current_frames().get(self.loop_thread)
        while frame is not None:
            lane = self.lanes.get(id(frame.f_locals.get("self")))
            if lane is not None:
                return frame, lane
            frame = frame.f_back
        return None
