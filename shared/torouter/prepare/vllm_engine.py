"""Local experts generating with vLLM (``engine: vllm`` in a ``huggingface`` section).

The expert stays a ``HuggingFaceExpert``: it tokenizes the prompt the same way (chat or
completion template), gathers concurrent calls with the same micro-batcher, cuts the
answer at the same stop sequences and reports the same token counts and reference NLL.
Only the batch itself runs differently: each micro-batch is one ``vllm.LLM.generate``
call, which schedules its rows on the GPU with paged attention and continuous batching.

vLLM is an optional extra (``pip install 'torouter[vllm]'``, which pulls a CUDA build of
torch); without it the default ``transformers`` engine runs everything on a CPU.

What the offline API cannot do, and what torouter does instead:

- It cannot stop one row of a running ``generate`` call. A request given up on (its
  deadline passed, or its caller cancelled) before its batch starts never runs; one
  given up during the batch fails with ``GenerationTimeout`` (a ``generate`` caller is
  released at once, a stream when its batch ends), while vLLM finishes computing its row
  with the others and the answer is dropped.
- It returns every row when the whole call ends, so an answer's latency is its
  batch's, and a stream receives the whole answer at once rather than token by token.

GGUF sources: vLLM reads GGUF for only some architectures and quantisation types, and
wants the original repository's tokenizer, which a manifest naming a ``.gguf`` file does
not give. So vLLM gets the dequantized checkpoint the ``transformers`` engine keeps in
torouter's cache (config, weights and the tokenizer ``encode_prompt`` uses), written
once on first use; it runs at the section's ``dtype``, not at the GGUF's quantisation.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .batching import Request, RowResult
from .manifest import ManifestError

INSTALL_HINT = "pip install 'torouter[vllm]' (vLLM needs a CUDA GPU), or remove 'engine: vllm'"

# One vLLM engine per model/dtype/settings in a process: each reserves a share of the GPU's
# memory, so two experts naming the same model share one; its lock keeps their calls apart.
_ENGINES: dict[str, tuple[Any, threading.Lock]] = {}
_ENGINES_LOCK = threading.Lock()


def import_vllm(expert: str):
    """The ``vllm`` module; ``ManifestError`` naming the expert and the extra when it is missing."""
    try:
        import vllm
    except ImportError as exc:
        raise ManifestError(f"expert {expert!r} asks for engine 'vllm', which cannot be imported ({exc}); "
                            f"{INSTALL_HINT}") from None
    return vllm


def model_dir(source: str, gguf_file: str | None, dtype: str) -> str:
    """What vLLM loads: ``source`` itself, or for a GGUF file its dequantized copy in the cache."""
    if gguf_file is None:
        return source
    from .local import _converted_dir, _save_converted, _torch_dtype

    file = Path(source) / gguf_file
    if not file.is_file():  # a GGUF file inside a hub repository
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(source, gguf_file))
    target = _converted_dir(str(file.parent), file.name, dtype)
    if not (target / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                     dtype=_torch_dtype(dtype, "cpu"))
        _save_converted(model, tokenizer, target)
    return str(target)


def _eos_ids(path: str, tokenizer) -> list[int]:
    """The end-of-sequence ids the ``transformers`` engine stops at: the model's generation
    config's, else the tokenizer's."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(path)
    except OSError:
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


class VLLMEngine:
    """Runs a ``HuggingFaceExpert``'s batches with one ``vllm.LLM``."""

    def __init__(self, vllm, llm, lock: threading.Lock, eos_ids: list[int]):
        self.vllm = vllm
        self.llm = llm
        self.lock = lock
        self.eos_ids = eos_ids

    @classmethod
    def load(cls, name: str, source: str, gguf_file: str | None, dtype: str, settings: dict[str, Any]):
        """``(tokenizer, engine)`` for an expert's model; configuration problems raise ``ManifestError``."""
        vllm = import_vllm(name)
        from transformers import AutoTokenizer

        try:
            path = model_dir(source, gguf_file, dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
            eos_ids = _eos_ids(path, tokenizer)
            key = json.dumps([path, dtype, settings], sort_keys=True, default=str)
            with _ENGINES_LOCK:
                if key not in _ENGINES:
                    _ENGINES[key] = (vllm.LLM(model=path, tokenizer=path, dtype=dtype, **settings), threading.Lock())
                llm, lock = _ENGINES[key]
        except (OSError, ValueError, TypeError, ImportError) as exc:
            raise ManifestError(f"expert {name!r}: vLLM cannot load {source!r}: {exc}") from None
        return tokenizer, cls(vllm, llm, lock, eos_ids)

    def sampling_params(self, max_new_tokens: int, temperature: float | None, top_p: float | None,
                        stops: list[str]):
        """Greedy unless ``temperature`` is set; ends at the model's end of sequence or a stop sequence."""
        sample = {"temperature": temperature, "top_p": top_p if top_p is not None else 1.0} if temperature \
            else {"temperature": 0.0}
        return self.vllm.SamplingParams(max_tokens=max_new_tokens, stop=list(stops) or None,
                                        stop_token_ids=self.eos_ids or None, **sample)

    def _scoring_params(self):
        # One token generated (vLLM generates at least one); the prompt's own log-probabilities wanted.
        return self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def run_batch(self, requests: Sequence[Request], params, give_up_error: Callable[[Request], BaseException]
                  ) -> list[RowResult]:
        """Answer a micro-batch in one ``LLM.generate`` call: each prompt, and for the requests with
        ``reference_ids`` prompt + reference read for its log-probabilities (the reference NLL).

        A row whose request was given up on by the time the call returns fails with
        ``give_up_error`` (vLLM cannot stop it earlier); streams receive their whole answer.
        """
        scored = [i for i, r in enumerate(requests) if r.reference_ids]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        prompts += [{"prompt_token_ids": list(requests[i].prompt_ids) + list(requests[i].reference_ids or [])}
                    for i in scored]
        all_params = [params] * len(requests) + [self._scoring_params()] * len(scored)
        start = time.perf_counter()
        try:
            with self.lock:
                outputs = self.llm.generate(prompts, all_params, use_tqdm=False)
        except BaseException as exc:
            for request in requests:  # failed before the streams end, so a stream sees the error
                if not request.future.done():
                    request.future.set_exception(exc)
                if request.streamer is not None:
                    request.streamer.end()
            raise
        latency = time.perf_counter() - start
        rows = [RowResult(new_tokens=[int(t) for t in out.outputs[0].token_ids], latency_s=latency)
                for out in outputs[:len(requests)]]
        for k, i in enumerate(scored):
            rows[i].nll = reference_nll(outputs[len(requests) + k].prompt_logprobs, requests[i].reference_ids or [])
        for request, row in zip(requests, rows):
            if request.given_up():
                row.timed_out = True
                if not request.future.done():
                    request.future.set_exception(give_up_error(request))
            elif request.streamer is not None and row.new_tokens:
                import torch

                request.streamer.put(torch.tensor(row.new_tokens))
            if request.streamer is not None:
                request.streamer.end()
        return rows

    def nll(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """Mean NLL per token of each reference after its prompt (as ``batching.batch_nll``)."""
        prompts = [{"prompt_token_ids": list(p) + list(r)} for p, r in pairs]
        with self.lock:
            outputs = self.llm.generate(prompts, self._scoring_params(), use_tqdm=False)
        return [reference_nll(out.prompt_logprobs, ref) for out, (_, ref) in zip(outputs, pairs)]


def reference_nll(prompt_logprobs, reference_ids: Sequence[int]) -> float:
    """Mean negative log-likelihood of the last ``len(reference_ids)`` prompt tokens, from vLLM's
    ``prompt_logprobs`` (one ``{token id: Logprob}`` per prompt token, ``None`` for the first;
    each holds the prompt's own token whatever the top-k asked for)."""
    n = len(reference_ids)
    if prompt_logprobs is None or n == 0 or len(prompt_logprobs) <= n:
        raise ValueError("vLLM returned no prompt log-probabilities for the reference")
    total = 0.0
    for position, token in zip(range(len(prompt_logprobs) - n, len(prompt_logprobs)), reference_ids):
        total -= prompt_logprobs[position][token].logprob
    return total / n
