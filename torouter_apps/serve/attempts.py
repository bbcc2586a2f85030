"""One expert working on one request, and the watch that stops it when its client goes away.

An attempt runs the expert's call (plain or streamed, on the event loop or on the
expert's own threads) as a task of its own and hands the answer over a queue that the
request reads with its deadlines; the client watch cancels the attempt as soon as the
connection closes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from langchain_torouter import as_chunk

from .lanes import _LANE, _Lane


class ExpertTimeout(TimeoutError):
    """An expert gave no answer (or, streaming, no token) within its deadline; its call was cancelled."""


class EmptyAnswer(RuntimeError):
    """An expert answered with no text and no tool call: counted as its failure, so the next expert answers."""


class _ClientGone(Exception):
    """The client disconnected: whatever was still working for it has been cancelled."""


class _Overdue(Exception):
    """A wait this server bounds ran out (not a TimeoutError, which an expert may raise itself)."""


_END = object()  # an expert's answer is complete
_GONE = object()  # the client went away while a request waited on an expert


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _has_output(message: Any) -> bool:
    return bool(message.text or getattr(message, "tool_calls", None) or getattr(message, "tool_call_chunks", None))


class _Attempt:
    """One expert working on one request: a task of its own puts the answer (or its chunks) on a queue.

    The request reads the queue with its deadlines; stopping the attempt cancels the
    expert's call (async experts) or stops it at its next chunk (experts on threads).
    ``hard_deadline`` (loop time) bounds the task even if nobody reads the queue any more.
    """

    def __init__(self, lane: _Lane, runnable: Any, messages: list[Any], config: dict[str, Any],
                 kwargs: dict[str, Any], stream: bool, hard_deadline: float):
        self.lane = lane
        self.queue: asyncio.Queue = asyncio.Queue()
        self._stop = threading.Event()
        self.task = asyncio.create_task(self._run(runnable, messages, config, kwargs, stream, hard_deadline))

    async def next(self, timeout: float) -> Any:
        """The next item (a message, a chunk or ``_END``); raises the expert's error, _Overdue or _ClientGone."""
        try:
            async with asyncio.timeout(timeout):
                item = await self.queue.get()
        except TimeoutError:
            raise _Overdue from None
        if item is _GONE:
            raise _ClientGone
        if isinstance(item, _Failed):
            raise item.error
        return item

    def stop(self) -> None:
        self._stop.set()
        self.task.cancel()

    async def _run(self, runnable: Any, messages: list[Any], config: dict[str, Any], kwargs: dict[str, Any],
                   stream: bool, hard_deadline: float) -> None:
        lane = self.lane
        lane.active += 1
        _LANE.set(lane)  # this task's blocking work goes to the expert's threads (see _LoopExecutor)
        try:
            async with asyncio.timeout_at(hard_deadline), lane.slots:
                if lane.on_threads(runnable, stream):
                    await self._on_threads(runnable, messages, config, kwargs, stream)
                elif stream:
                    chunks = runnable.astream(messages, config, **kwargs)
                    try:
                        while True:
                            try:
                                chunk = await anext(chunks)
                            except StopAsyncIteration:
                                break
                            self.queue.put_nowait(as_chunk(chunk))
                    finally:
                        await chunks.aclose()
                else:
                    self.queue.put_nowait(await runnable.ainvoke(messages, config, **kwargs))
            self.queue.put_nowait(_END)
        except Exception as exc:  # noqa: BLE001 - the expert's failure, read by the request
            self.queue.put_nowait(_Failed(exc))
        finally:
            lane.active -= 1

    async def _on_threads(self, runnable: Any, messages: list[Any], config: dict[str, Any],
                          kwargs: dict[str, Any], stream: bool) -> None:
        loop = asyncio.get_running_loop()
        chunks, stop = self.queue, self._stop

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the server stopped
                stop.set()

        def work() -> Any:
            if not stream:
                return runnable.invoke(messages, config, **kwargs)
            iterator = runnable.stream(messages, config, **kwargs)
            try:
                for chunk in iterator:
                    if stop.is_set():
                        break
                    put(as_chunk(chunk))
            finally:
                iterator.close()
            return _END

        try:
            result = await loop.run_in_executor(self.lane.threads, work)
        finally:
            stop.set()  # cancelled: a streaming thread stops at its next chunk
        if result is not _END:
            self.queue.put_nowait(result)


class _ClientWatch:
    """Watches one request's connection; when the client disconnects, stops what works for it."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]]):
        self.gone = False
        self.attempt: _Attempt | None = None
        self.task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - a broken receive channel is a client gone as well
            pass
        self.gone = True
        if self.attempt is not None:
            self.attempt.stop()
            self.attempt.queue.put_nowait(_GONE)

    async def run(self, awaitable: Awaitable[Any], timeout: float) -> Any:
        """``awaitable``'s result; cancelled with _Overdue after ``timeout`` s, or _ClientGone on a disconnect."""
        if self.gone:
            raise _ClientGone
        task = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({task, self.task}, timeout=max(timeout, 0),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        if self.gone:
            raise _ClientGone
        raise _Overdue

    def close(self) -> None:
        self.task.cancel()
        if self.attempt is not None:
            self.attempt.stop()
