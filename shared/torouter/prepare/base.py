"""What every expert is: the ``Expert`` interface ``prepare`` and the adapters call, and the
``Answer`` it returns.

An expert is built from one manifest entry (``ExpertSpec``) by the backend that entry
names (see ``torouter.prepare.backends``): ``start`` builds the client or loads the
model, ``agenerate`` answers one prompt with its token counts and latency. The helpers
here (messages, stop sequences, token estimates, secrets in constructor kwargs) are the
ones every backend shares, so each answers and fails the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from ..credentials import MissingEnvironmentVariable, Redactor, import_object, reveal
from ..data import Prompt, content_text, prompt_text
from .manifest import BackendSpec, ExpertBuildError, ExpertSpec, ManifestError
from .threads import ExpertThreads


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
        messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
    else:
        messages = [{"role": str(roles.get(m.get("role", "user"), m.get("role", "user"))),
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
    """One expert: ``start`` builds the client or loads the model, ``agenerate`` answers a prompt.

    A backend is a subclass: ``kind`` is its key in the manifest, ``spec_class`` the class
    that checks its section (needed only for backends added with ``register_backend``),
    and the ``default_*`` settings apply where the manifest entry sets none.
    """

    kind: ClassVar[str] = ""
    spec_class: ClassVar[type[BackendSpec] | None] = None
    # True when ``agenerate`` enforces ``timeout_s`` itself (local models stop generating).
    handles_timeout: ClassVar[bool] = False
    default_concurrency: ClassVar[int] = 8
    default_timeout_s: ClassVar[float] = 120.0
    default_retries: ClassVar[int] = 5

    def __init__(self, spec: ExpertSpec):
        self.spec = spec
        self.name = spec.name
        self._redactor = Redactor()

    @property
    def options(self) -> BackendSpec:
        """The manifest entry's backend section (``spec.langchain`` for a LangChain expert, ...)."""
        return self.spec.backend

    @property
    def concurrency(self) -> int:
        return self.spec.concurrency or self.default_concurrency

    @property
    def timeout_s(self) -> float:
        return self.spec.timeout_s or self.default_timeout_s

    @property
    def retries(self) -> int:
        return self.spec.retries if self.spec.retries is not None else self.default_retries

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

    def _reveal(self, value: Any, where: str = "kwargs") -> Any:
        """Kwargs ready for a constructor: secrets unwrapped, ``${VAR}`` read from the environment."""
        return reveal_kwargs(self.name, value, self._redactor, where)

    def _build(self, factory, kwargs: dict[str, Any], what: str):
        return build_with(self.name, factory, kwargs, what, self._redactor)

    def _import(self, path: str, field: str = ""):
        return import_for(self.name, path, field)

    def _check_fields(self, cls, kwargs: Mapping[str, Any]) -> None:
        check_generation_fields(self.name, cls, kwargs)

    def _answer(self, text: str, prompt: Prompt, input_tokens, output_tokens, latency: float) -> Answer:
        text = cut_at_stop(text, self.spec.generation.stop)
        if input_tokens is None or output_tokens is None:
            return Answer(text=text, input_tokens=estimate_tokens(prompt_text(prompt)),
                          output_tokens=estimate_tokens(text), latency_s=latency, tokens_estimated=True)
        return Answer(text=text, input_tokens=int(input_tokens), output_tokens=int(output_tokens),
                      latency_s=latency)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tier={self.spec.tier!r})"




def reveal_kwargs(expert: str, value: Any, redactor: Redactor, where: str = "kwargs") -> Any:
    """``value`` ready for a constructor: secrets unwrapped and handed to ``redactor``, ``${VAR}``
    read from the environment; an unset variable is an ``ExpertBuildError`` at its key."""
    try:
        return reveal(value, redactor, where)
    except MissingEnvironmentVariable as exc:
        raise ExpertBuildError(expert, f"environment variable {exc.var} is not set", exc.where) from None


def build_with(expert: str, factory, kwargs: dict[str, Any], what: str, redactor: Redactor):
    """``factory(**kwargs)``; any failure is an ``ExpertBuildError`` with secrets masked."""
    try:
        return factory(**kwargs)
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - any construction error is a configuration error
        raise ExpertBuildError(expert, f"could not build {what}: {type(exc).__name__}: {redactor(str(exc))}") from None


def import_for(expert: str, path: str, field: str = ""):
    """The object at import path ``path``; failing that, an ``ExpertBuildError`` at ``field``."""
    try:
        return import_object(path)
    except (ImportError, AttributeError) as exc:
        raise ExpertBuildError(expert, f"cannot import {path!r}: {exc}", field) from None


def check_generation_fields(expert: str, cls, kwargs: Mapping[str, Any]) -> None:
    """Refuse generation settings a pydantic-based class would not accept (before building it,
    so the error names the manifest's ``generation`` rather than a constructor's internals)."""
    fields = getattr(cls, "model_fields", None)
    if not fields:
        return
    accepted = set(fields) | {f.alias for f in fields.values() if f.alias}
    config = getattr(cls, "model_config", None)
    extra = config.get("extra") if isinstance(config, Mapping) else None
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and extra != "allow":
        raise ExpertBuildError(expert, f"{cls.__name__} has no setting {unknown[0]!r}; remove it from 'generation'",
                               "generation")
