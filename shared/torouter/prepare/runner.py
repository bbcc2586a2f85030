"""Query every expert on every prompt: asyncio, per-expert concurrency, retries, timeouts.

Each expert gets ``concurrency`` workers pulling from its own queue of pending calls.
A call that hits a transient error (timeout, rate limit, 5xx, dropped connection) is
retried with exponential backoff and full jitter, honouring ``Retry-After`` when the
provider sends one. A call that still fails is committed as an error for that
(prompt, expert), never as a score, and the run goes on.

When the cache cannot be written (a full disk), no new call starts; the calls in flight
finish and are committed if they can be, writes that failed are tried once more, and
the run ends with a ``CacheError`` that says how many finished calls are saved.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data import Prompt
from .cache import CacheError, CallCache
from .base import Expert

_TRANSIENT_NAMES = ("RateLimit", "Timeout", "TimedOut", "APIConnection", "ServiceUnavailable",
                    "InternalServer", "Overloaded", "TooManyRequests", "ServerError", "Throttl",
                    "RemoteDisconnected", "ConnectError", "ReadError")
MAX_ERROR_CHARS = 2000


def _status(exc: BaseException) -> int | None:
    for holder in (exc, getattr(exc, "response", None)):
        for attr in ("status_code", "status", "http_status"):
            value = getattr(holder, attr, None)
            if isinstance(value, int):
                return value
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call may succeed: timeouts, rate limits, 5xx, connection errors."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    status = _status(exc)
    if status is not None and (status in (408, 409, 425, 429) or status >= 500):
        return True
    names = [cls.__name__ for cls in type(exc).__mro__]
    return any(marker in name for name in names for marker in _TRANSIENT_NAMES)


def retry_after(exc: BaseException | None) -> float | None:
    """Seconds the provider asked us to wait, if it said."""
    if exc is None:
        return None
    value = getattr(exc, "retry_after", None)
    if value is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)
        if headers is not None:
            try:
                value = headers.get("retry-after")
            except Exception:  # noqa: BLE001 - headers of unknown shape
                value = None
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


@dataclass
class Backoff:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**(attempt-1))), at least Retry-After."""

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def wait(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        ceiling = min(self.cap, self.base * 2 ** (attempt - 1))
        wait = self.rng.uniform(0, ceiling)
        asked = retry_after(exc)
        return max(wait, min(asked, self.cap * 4)) if asked is not None else wait


@dataclass
class Job:
    """One (prompt, expert) call to make."""

    key: str
    expert: str
    record_id: str
    prompt: Prompt
    reference: str | None
    prompt_hash: str


@dataclass
class RunStats:
    done: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def calls(self) -> int:
        return sum(self.done.values()) + sum(self.failed.values())

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.elapsed_s if self.elapsed_s > 0 else 0.0


class RunProgress:
    """A rich progress display: one row per expert (done / failed) and a total with rate and ETA."""

    def __init__(self, totals: Mapping[str, int], enabled: bool = True, console=None):
        self.enabled = enabled and sum(totals.values()) > 0
        self.totals = dict(totals)
        self._tasks: dict[str, Any] = {}
        self._failed = {name: 0 for name in totals}
        self._done = {name: 0 for name in totals}
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeRemainingColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return Text(f"{speed:.1f} calls/s" if speed else "– calls/s")

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"), Rate(), TimeRemainingColumn(),
            console=console or Console(stderr=True), transient=False)
        width = max(len(n) for n in totals)
        for name, total in totals.items():
            self._tasks[name] = self._progress.add_task(name.ljust(width), total=total, failed=0)
        self._all = self._progress.add_task("all".ljust(width), total=sum(totals.values()), failed=0)

    def __enter__(self) -> RunProgress:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()

    def advance(self, expert: str, ok: bool) -> None:
        if ok:
            self._done[expert] += 1
        else:
            self._failed[expert] += 1
        if not self.enabled:
            return
        self._progress.update(self._tasks[expert], advance=1, failed=self._failed[expert])
        self._progress.update(self._all, advance=1, failed=sum(self._failed.values()))


class Runner:
    """Runs jobs against experts and commits each finished call to the cache."""

    def __init__(self, experts: Mapping[str, Expert], cache: CallCache, *, backoff: Backoff | None = None,
                 progress: bool = True, console=None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        self.experts = dict(experts)
        self.cache = cache
        self.backoff = backoff or Backoff()
        self.progress = progress
        self.console = console
        self.sleep = sleep

    async def call(self, expert: Expert, job: Job) -> dict[str, Any]:
        """One call with retries; returns the result to commit (``ok`` true or false)."""
        attempts = 0
        while True:
            attempts += 1
            try:
                answer = await self._invoke(expert, job)
                result = {"ok": True, **answer.to_json(), "attempts": attempts}
                # An endpoint that echoes the request (a proxy, a debug server) must not
                # carry a credential into the cache and the routing data.
                result["text"] = expert.redact(result["text"])
                return result
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
                if attempts > expert.retries or not is_transient(exc):
                    message = expert.redact(f"{type(exc).__name__}: {exc}")[:MAX_ERROR_CHARS]
                    return {"ok": False, "error": message, "attempts": attempts}
                await self.sleep(self.backoff.wait(attempts, exc))

    async def _invoke(self, expert: Expert, job: Job):
        timeout = expert.timeout_s
        if expert.handles_timeout:
            return await expert.agenerate(job.prompt, job.reference, timeout)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await expert.agenerate(job.prompt, job.reference, timeout)
        except TimeoutError:
            if deadline.expired():
                raise TimeoutError(f"no answer within {timeout:g} s") from None
            raise

    async def run(self, jobs: Sequence[Job]) -> RunStats:
        by_expert: dict[str, list[Job]] = {name: [] for name in self.experts}
        for job in jobs:
            if job.expert not in by_expert:
                raise KeyError(f"job for unknown expert {job.expert!r}")
            by_expert[job.expert].append(job)
        by_expert = {name: js for name, js in by_expert.items() if js}
        for name in by_expert:
            await self.experts[name].start()
        stats = RunStats(done={n: 0 for n in by_expert}, failed={n: 0 for n in by_expert})
        loop = asyncio.get_running_loop()
        started = loop.time()
        display = RunProgress({n: len(js) for n, js in by_expert.items()}, self.progress, self.console)

        write_errors: list[CacheError] = []
        unsaved: list[tuple[Expert, Job, dict[str, Any]]] = []

        def commit(expert: Expert, job: Job, result: dict[str, Any]) -> None:
            self.cache.put(job.key, expert.name, expert.settings_hash, job.prompt_hash, result)
            (stats.done if result["ok"] else stats.failed)[expert.name] += 1
            display.advance(expert.name, result["ok"])

        async def worker(expert: Expert, queue) -> None:
            for job in queue:  # a shared iterator: each job goes to exactly one worker
                if write_errors:  # the cache cannot take more: start no new call
                    return
                result = await self.call(expert, job)
                try:
                    commit(expert, job, result)
                except CacheError as exc:
                    write_errors.append(exc)
                    unsaved.append((expert, job, result))

        with display:
            async with asyncio.TaskGroup() as group:
                for name, expert_jobs in by_expert.items():
                    expert = self.experts[name]
                    queue = iter(expert_jobs)
                    for _ in range(min(expert.concurrency, len(expert_jobs))):
                        group.create_task(worker(expert, queue))
        stats.elapsed_s = loop.time() - started
        if write_errors:
            raise self._stopped(write_errors[0], unsaved, commit, stats, len(jobs))
        return stats

    @staticmethod
    def _stopped(error: CacheError, unsaved, commit, stats: RunStats, total: int) -> CacheError:
        """Try the failed writes once more, then say what is saved and what to do."""
        lost = 0
        for expert, job, result in unsaved:
            try:
                commit(expert, job, result)
            except CacheError:
                lost += 1
        saved = stats.calls
        message = f"{error}. The run stopped: {saved} finished calls are saved"
        if lost:
            message += f", {lost} finished but could not be saved (they will be made again)"
        message += (f"; {total - saved - lost} calls were not made. Free some space (or fix the cache) and run "
                    "the same command to resume.")
        return CacheError(message)
