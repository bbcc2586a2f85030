"""Local experts answer many prompts at once: batched greedy generation, batched reference
NLL, and the micro-batcher that gathers concurrent single calls into those batches.

A small causal LM on a CPU spends most of a decoding step moving its weights through
memory, not multiplying; eight rows cost little more than one. So every caller of a
local expert (the ``prepare`` runner's workers, ``ChatManifestExpert``, the endpoint's
request threads) still asks for one answer, and ``MicroBatcher`` puts the requests that
arrive within a short, bounded wait into one left-padded ``generate`` call. Each row keeps
its own stop sequences, deadline and cancellation: a row that ends or gives up stops
there while its batch-mates go on, and a streamed row receives its tokens as they are made.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

NLL_LOGIT_BUDGET = 1 << 27
"""Logits (floats) one NLL forward pass may hold: the vocabulary can be 262k wide."""


@dataclass(eq=False)
class Request:
    """One prompt waiting for its row in a batch; ``future`` receives a ``RowResult`` or an error."""

    prompt_ids: list[int]
    deadline: float = float("inf")
    cancel: threading.Event = field(default_factory=threading.Event)
    streamer: Any = None
    """Receives the row's new tokens as they are made (``put``) and ``end()`` when it finishes."""
    reference_ids: list[int] | None = None
    """Tokens whose mean NLL as the answer is wanted, computed after the batch's generation."""
    timeout_s: float | None = None
    """What the caller asked for (its error message says so); ``deadline`` enforces it."""
    future: Future = field(default_factory=Future)
    arrived: float = 0.0
    """When it reached the batcher (``time.monotonic()``)."""

    def given_up(self) -> bool:
        return self.cancel.is_set() or time.monotonic() > self.deadline


@dataclass
class RowResult:
    new_tokens: list[int]
    latency_s: float
    """From the batch's start to the step that finished this row."""
    timed_out: bool = False
    nll: float | None = None


def _row_tracker(requests: Sequence[Request], width: int, stop_criteria: Sequence[Any], start: float,
                 give_up_error: Callable[[Request], BaseException]):
    """A stopping criterion for the whole batch that records where and when each row ended.

    A row given up on fails its request at once (a waiting stream learns it before its
    batch-mates finish).
    """
    import torch
    from transformers import StoppingCriteria

    class RowTracker(StoppingCriteria):
        def __init__(self):
            self.ended_at: list[int | None] = [None] * len(requests)
            self.latency: list[float] = [0.0] * len(requests)
            self.timed_out = [False] * len(requests)

        def finish(self, row: int, made: int, timed_out: bool = False) -> None:
            self.ended_at[row] = made
            self.latency[row] = time.perf_counter() - start
            self.timed_out[row] = timed_out
            request = requests[row]
            if timed_out and not request.future.done():
                request.future.set_exception(give_up_error(request))
            if request.streamer is not None:
                request.streamer.end()

        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for criterion in stop_criteria:
                done |= criterion(input_ids, scores)
            made = input_ids.shape[1] - width
            newest = input_ids[:, -1:].cpu()
            for row, request in enumerate(requests):
                if self.ended_at[row] is not None:
                    done[row] = True
                    continue
                if request.streamer is not None:
                    request.streamer.put(newest[row])
                if done[row]:
                    self.finish(row, made)
                elif request.given_up():
                    self.finish(row, made, timed_out=True)
                    done[row] = True
            return done

        def close(self, made: int) -> None:
            """Rows still running when ``generate`` returned reached ``max_new_tokens``."""
            for row in range(len(requests)):
                if self.ended_at[row] is None:
                    self.finish(row, made)

    return RowTracker()


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any):
    """``(input_ids, attention_mask)`` with every row aligned at its end."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def generate_batch(model, requests: Sequence[Request], generation_config, stop_criteria: Sequence[Any],
                   pad_id: int, give_up_error: Callable[[Request], BaseException] = lambda r: TimeoutError(
                       "given up during generation")) -> list[RowResult]:
    """Greedy (or sampled) generation for every request in one left-padded ``generate`` call.

    ``stop_criteria`` (end-of-sequence, stop strings) end rows one by one; their tokens
    are the row's up to and including the one that ended it, as one-at-a-time decoding
    returns them.
    """
    import torch

    ids, mask = left_pad([r.prompt_ids for r in requests], pad_id, model.device)
    width = ids.shape[1]
    start = time.perf_counter()
    tracker = _row_tracker(requests, width, stop_criteria, start, give_up_error)
    try:
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config,
                                    stopping_criteria=[tracker])
    except BaseException as exc:
        for request in requests:  # failed before the streams end, so a stream sees the error
            if not request.future.done():
                request.future.set_exception(exc)
        tracker.close(0)
        raise
    tracker.close(output.shape[1] - width)
    return [RowResult(new_tokens=output[row, width:width + tracker.ended_at[row]].tolist(),
                      latency_s=tracker.latency[row], timed_out=tracker.timed_out[row])
            for row in range(len(requests))]


def batch_nll(model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Mean NLL per token of each reference after its prompt, in as few forward passes as fit.

    Rows are left-padded so every reference ends at the last position; only the logits
    that predict reference tokens are kept.
    """
    import torch
    import torch.nn.functional as F

    out: list[float] = []
    vocab = model.get_output_embeddings().weight.shape[0]
    i = 0
    while i < len(pairs):
        rows: list[Any] = []
        keep = 1
        while i < len(pairs):
            need = max(keep, len(pairs[i][1]) + 1)
            if rows and (len(rows) + 1) * need * vocab > NLL_LOGIT_BUDGET:
                break
            rows.append(pairs[i])
            keep = need
            i += 1
        ids, mask = left_pad([p + r for p, r in rows], pad_id, model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=keep).logits
            for row, (_, ref) in enumerate(rows):
                row_logits = logits[row, keep - 1 - len(ref):keep - 1]
                target = torch.tensor(ref, device=logits.device)
                out.append(float(F.cross_entropy(row_logits.float(), target)))
    return out


class MicroBatcher:
    """Gathers requests from many threads into batches for one worker thread.

    When the worker is free it takes up to ``max_size`` waiting requests, waiting for the
    batch to fill at most until the oldest of them has waited ``max_wait_s``.
    ``run_batch`` settles every request's future. A request given up on (its cancel set,
    its deadline passed) before its batch starts never runs; one given up during the batch
    ends its own row only.
    """

    IDLE_EXIT_S = 30.0

    def __init__(self, run_batch: Callable[[list[Request]], None], max_size: int, max_wait_s: float,
                 name: str = "batch", on_expired: Callable[[Request], BaseException] | None = None):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.run_batch = run_batch
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.name = name
        self.on_expired = on_expired or (lambda request: TimeoutError("given up before its batch started"))
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self.batch_sizes: list[int] = []
        """The size of every batch run so far (for benchmarks and tests)."""

    def submit(self, request: Request) -> Future:
        request.arrived = time.monotonic()
        with self._cond:
            self._waiting.append(request)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name=f"torouter-batch-{self.name}", daemon=True)
                self._worker.start()
            self._cond.notify()
        return request.future

    def _take(self) -> list[Request] | None:
        with self._cond:
            if not self._waiting:
                self._cond.wait_for(lambda: self._waiting, timeout=self.IDLE_EXIT_S)
                if not self._waiting:
                    self._worker = None
                    return None
            # No request waits for batch-mates longer than max_wait_s after it arrived.
            deadline = self._waiting[0].arrived + self.max_wait_s
            while len(self._waiting) < self.max_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Any] = []
            while self._waiting and len(batch) < self.max_size:
                request = self._waiting.popleft()
                if request.given_up():  # failed before its stream ends, so a stream sees why
                    request.future.set_exception(self.on_expired(request))
                    if request.streamer is not None:
                        request.streamer.end()
                else:
                    batch.append(request)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                self.run_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
