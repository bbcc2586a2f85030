"""Local experts answer many prompts at once: batched greedy generation, batched reference
NLL, and the micro-batcher that gathers concurrent single calls into those batches.

A small causal LM on a CPU spends most of a decoding step moving its weights through
memory, not multiplying; eight rows cost little more than one. So every caller of a
local expert (the ``prepare`` runner's workers, ``ChatManifestExpert``, the endpoint's
request threads) still asks for one answer, and ``MicroBatcher`` puts the requests that
arrive within a short, bounded wait into one left-padded batch (``generate_batch``). Each
row keeps its own stop sequences, deadline and cancellation: a row that ends or gives up
leaves the batch at once while its batch-mates go on, and a streamed row receives its
tokens as they are made. The reference NLL reuses the prompt's key/value cache.
"""

from __future__ import annotations

import collections
import copy
import functools
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


class _Rows:
    """The rows of one batch as they end: their tokens, when they ended and why."""

    def __init__(self, requests: Sequence[Request], start: float,
                 give_up_error: Callable[[Request], BaseException]):
        self.requests = requests
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.latency = [0.0] * len(requests)
        self.timed_out = [False] * len(requests)
        self.start = start
        self.give_up_error = give_up_error

    def add(self, row: int, token: int) -> None:
        import torch

        self.tokens[row].append(token)
        streamer = self.requests[row].streamer
        if streamer is not None:
            streamer.put(torch.tensor([token]))

    def finish(self, row: int, timed_out: bool = False) -> None:
        """End a row; one given up on fails its request at once (a waiting stream learns it now)."""
        self.latency[row] = time.perf_counter() - self.start
        self.timed_out[row] = timed_out
        request = self.requests[row]
        if timed_out and not request.future.done():
            request.future.set_exception(self.give_up_error(request))
        if request.streamer is not None:
            request.streamer.end()

    def results(self) -> list[RowResult]:
        return [RowResult(new_tokens=tokens, latency_s=latency, timed_out=timed_out)
                for tokens, latency, timed_out in zip(self.tokens, self.latency, self.timed_out)]


def _next_tokens(logits, seqs, generation_config):
    """Greedy argmax, or a sample after temperature and top-p when the config samples."""
    import torch

    if not generation_config.do_sample:
        return logits.argmax(-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    if generation_config.temperature:
        logits = TemperatureLogitsWarper(generation_config.temperature)(seqs, logits)
    if generation_config.top_p is not None and generation_config.top_p < 1.0:
        logits = TopPLogitsWarper(generation_config.top_p)(seqs, logits)
    return torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)


def generate_batch(model, requests: Sequence[Request], generation_config, stop_criteria: Sequence[Any],
                   pad_id: int, give_up_error: Callable[[Request], BaseException] = lambda r: TimeoutError(
                       "given up during generation")) -> list[RowResult]:
    """Generate for every request in one left-padded batch, dropping each row as it ends.

    One forward pass reads every prompt into a key/value cache; then each step decodes
    one token for the rows still running. A row ends at end-of-sequence, at one of
    ``stop_criteria`` (its tokens are those up to and including the one that ended it,
    as one-at-a-time decoding returns them), at ``max_new_tokens``, or when its request
    is given up on; its cache rows are dropped at once, so a finished answer no longer
    costs compute while its batch-mates go on (``transformers``' ``generate`` computes
    every row until the last one ends). Greedy decoding takes the argmax of the model's
    logits, as ``generate`` does under the same config.

    Requests with ``reference_ids`` get their mean reference NLL (``RowResult.nll``)
    from the same prompt cache, so the prompt is read once for both.
    """
    import torch

    ids, mask = left_pad([r.prompt_ids for r in requests], pad_id, model.device)
    rows = _Rows(requests, time.perf_counter(), give_up_error)
    scored = [i for i, r in enumerate(requests) if r.reference_ids]
    max_new = int(generation_config.max_new_tokens)
    try:
        with torch.inference_mode():
            cache = _new_cache(model)
            cached = _cache_argument(model)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{cached: cache})
            logits = out.logits[:, -1, :].float()
            # Kept for the reference NLL: the prompt cache of the rows with a reference, and
            # the prompt's last logits, which predict the reference's first token.
            nll_state = ((copy.deepcopy(cache), logits[scored].clone(), mask[scored], positions[scored, -1])
                         if scored else None)
            active = list(range(len(requests)))
            seqs, next_position = ids, positions[:, -1] + 1
            for made in range(1, max_new + 1):
                tokens = _next_tokens(logits, seqs, generation_config)
                seqs = torch.cat([seqs, tokens[:, None]], dim=-1)
                done = torch.zeros(len(active), dtype=torch.bool, device=seqs.device)
                for criterion in stop_criteria:
                    done |= criterion(seqs, logits)
                keep = []
                for j, row in enumerate(active):
                    rows.add(row, int(tokens[j]))
                    if done[j] or made == max_new:
                        rows.finish(row)
                    elif requests[row].given_up():
                        rows.finish(row, timed_out=True)
                    else:
                        keep.append(j)
                if not keep:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=seqs.device)
                    cache.batch_select_indices(index)
                    mask, seqs, tokens, next_position = mask[index], seqs[index], tokens[index], next_position[index]
                    active = [active[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
                out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
                            use_cache=True, logits_to_keep=1, **{cached: cache})
                logits = out.logits[:, -1, :].float()
                next_position = next_position + 1
    except BaseException as exc:
        for row, request in enumerate(requests):  # failed before the streams end, so a stream sees the error
            if not request.future.done():
                request.future.set_exception(exc)
            if request.streamer is not None and not rows.latency[row]:
                request.streamer.end()
        raise
    results = rows.results()
    if nll_state is not None:
        live = [k for k, i in enumerate(scored) if not results[i].timed_out]
        nlls = _continuation_nll(model, nll_state, [requests[scored[k]].reference_ids or [] for k in live], live, pad_id)
        for k, nll in zip(live, nlls):
            results[scored[k]].nll = nll
    return results


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_argument(model) -> str:
    """The name ``forward`` takes the key/value cache under (``cache`` in newer transformers)."""
    return _cache_argument_of(type(model))  # type: ignore[arg-type]  # classes are hashable


@functools.lru_cache(maxsize=None)
def _cache_argument_of(model_class: Any) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _continuation_nll(model, nll_state, references: list[list[int]], rows: list[int], pad_id: int) -> list[float]:
    """Mean NLL per token of each reference read after its prompt, from the prompt's cache.

    ``rows`` index the cached prompts. References are right-padded after their prompt
    (a padded tail is never attended to by the tokens before it); as many rows go into
    one forward pass as ``NLL_LOGIT_BUDGET`` allows.
    """
    import torch
    import torch.nn.functional as F

    cache, first_logits, prompt_mask, last_position = nll_state
    vocab = first_logits.shape[-1]
    out: list[float] = []
    i = 0
    with torch.inference_mode():
        while i < len(rows):
            chunk = [i]
            width = len(references[i])
            while i + len(chunk) < len(rows):
                wider = max(width, len(references[i + len(chunk)]))
                if (len(chunk) + 1) * wider * vocab > NLL_LOGIT_BUDGET:
                    break
                chunk.append(i + len(chunk))
                width = wider
            picked = [rows[k] for k in chunk]
            refs = [references[k] for k in chunk]
            logits = None
            if width > 1:  # the tokens before each reference's last one, right-padded
                index = torch.tensor(picked, device=prompt_mask.device)
                # One pass over every cached prompt extends the cache itself (it is not needed
                # again); a pass over some of them works on a copy.
                sub_cache = cache
                if picked != list(range(first_logits.shape[0])):
                    sub_cache = copy.deepcopy(cache)
                    sub_cache.batch_select_indices(index)
                inputs = torch.full((len(refs), width - 1), pad_id, dtype=torch.long, device=prompt_mask.device)
                ref_mask = torch.zeros_like(inputs)
                for r, ref in enumerate(refs):
                    inputs[r, :len(ref) - 1] = torch.tensor(ref[:-1], dtype=torch.long)
                    ref_mask[r, :len(ref) - 1] = 1
                positions = last_position[index][:, None] + 1 + torch.arange(width - 1, device=inputs.device)
                logits = model(input_ids=inputs, attention_mask=torch.cat([prompt_mask[index], ref_mask], dim=-1),
                               position_ids=positions, use_cache=True, **{_cache_argument(model): sub_cache}).logits
            for r, (row, ref) in enumerate(zip(picked, refs)):
                predicted = first_logits[row][None]
                if logits is not None and len(ref) > 1:
                    predicted = torch.cat([predicted, logits[r, :len(ref) - 1].float()])
                target = torch.tensor(ref, device=predicted.device)
                out.append(float(F.cross_entropy(predicted, target)))
            i += len(chunk)
    return out


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
