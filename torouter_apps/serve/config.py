"""The ``torouter serve`` config file: its schema, loading it, and building the router it describes.

A config names a saved router and the experts to serve (LangChain chat models by
constructor, or the experts of a ``torouter prepare`` manifest), the routing trade-off,
bearer auth, request limits and deadlines. Every problem is a ``ConfigError`` naming the
field, raised before the server listens; keys read through ``${VAR}`` stay masked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from langchain_torouter import ChatManifestExpert, ChatTORouter
from torouter.capture import PromptCapture
from torouter.credentials import Redactor, hide_secrets
from torouter.prepare import ExpertBuildError
from torouter.prepare import build_chat_model as build_expert_chat_model
from torouter.routers import RouterFileError, load_router
from torouter.routing_text import RouteOnMode

DEFAULT_NAME = "torouter"
"""Model id that lets the router decide (a configured ``name`` is accepted as well)."""


class ConfigError(ValueError):
    """A server config that cannot be loaded or built; the message names the bad field."""


class _Strict(BaseModel):
    # No NaN or infinity: ``cost_weight: .inf`` or ``request_s: .inf`` would switch a guard off silently.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class ExpertConfig(_Strict):
    """How to build one expert: an ``init_chat_model`` string or an import path, plus kwargs."""

    model: str | None = None
    """``"provider:model"`` for ``langchain.chat_models.init_chat_model`` (needs ``pip install langchain``)."""

    class_: str | None = Field(None, alias="class")
    """Import path of a LangChain chat model class, ``"module:Class"`` or ``"module.Class"``."""

    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Constructor arguments; ``${VAR}`` in a string is read from the environment at startup."""

    threaded: bool = False
    """Call this expert's blocking (sync) API on its own threads instead of its async API on the
    event loop: for an expert whose async code blocks (a local model run inline, a sync SDK
    behind ``async def``), which would otherwise stall every other request while it works."""

    @field_validator("kwargs", mode="before")
    @classmethod
    def _kwargs(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError("kwargs must be a mapping of constructor arguments")
        return hide_secrets(value)

    @model_validator(mode="after")
    def _one_builder(self) -> ExpertConfig:
        if (self.model is None) == (self.class_ is None):
            raise ValueError("give exactly one of model: 'provider:model' or class: 'module:Class'")
        return self


class AuthConfig(_Strict):
    """Bearer-token auth; the token itself lives in an environment variable, never in the file."""

    token_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class Limits(_Strict):
    """Limits on requests and on what each expert may hold, so one client cannot tie up the server
    or run up an expert's bill, and one slow or hung expert cannot starve the others."""

    max_request_bytes: int = Field(1_048_576, ge=1)
    """Largest request body; bigger ones get 413."""

    max_tokens: int = Field(4096, ge=1)
    """Largest ``max_tokens`` a request may ask for (400 above); requests without one get this cap."""

    max_messages: int = Field(256, ge=1)
    """Most messages in one conversation (400 above)."""

    max_connections: int = Field(1024, ge=1)
    """Most open connections (and requests in progress); a request beyond it gets 503."""

    expert_concurrency: int = Field(256, ge=1)
    """Most calls in progress to one expert; more wait their turn, within their expert deadline."""

    expert_threads: int = Field(16, ge=1)
    """Threads of each expert's own for blocking work (sync-only experts, and work an expert's
    async code hands to a thread): a hung call holds one of them, never another expert's."""


class Timeouts(_Strict):
    """Deadlines, in seconds: past one the work is cancelled, so nothing waits without bound."""

    request_s: float = Field(600.0, gt=0)
    """One request from its arrival to its last byte, routing and every expert tried included:
    504 when no expert answered in time; a stream past it ends with an error event."""

    expert_s: float = Field(120.0, gt=0)
    """One expert attempt: its whole answer (plain), or its first token and then each gap
    between tokens (streamed). Past it the call is cancelled and the next expert answers."""

    experts: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(default_factory=dict)
    """``expert_s`` for particular experts, by name (a slow but valued model, a fast local one)."""

    read_s: float = Field(15.0, gt=0)
    """A client's request head and body: a connection that has not sent its head by then is
    closed, a body not received by then is a 408."""

    keep_alive_s: float = Field(5.0, gt=0)
    """An idle keep-alive connection is closed after this."""

    @model_validator(mode="after")
    def _within_request(self) -> Timeouts:
        for where, seconds in [("expert_s", self.expert_s), *((f"experts.{n}", s) for n, s in self.experts.items())]:
            if seconds > self.request_s:
                raise ValueError(f"{where} ({seconds:g} s) is longer than request_s ({self.request_s:g} s), "
                                 "so it could never take effect")
        return self

    def for_expert(self, name: str) -> float:
        return self.experts.get(name, self.expert_s)


class CaptureConfig(_Strict):
    """Opt-in capture of routed prompts (``torouter.capture.PromptCapture``), to train a router on
    this endpoint's own traffic: a JSONL file ``torouter prepare --prompts`` reads as is."""

    path: Path
    """Where to append the prompts (relative paths resolve against the config file's folder)."""

    include_answers: bool = False
    """Also record the answer of each plain (non-streamed) request."""

    redact: list[str] = Field(default_factory=list)
    """Metadata fields to mask."""

    patterns: list[str] = Field(default_factory=list)
    """Regular expressions masked in every captured text (e-mail addresses, account numbers)."""

    task: str | None = None
    """Task name given to every captured prompt."""


class ServeConfig(_Strict):
    """The ``torouter serve`` config file."""

    name: str = Field(DEFAULT_NAME, min_length=1)
    """Model id of the router in ``/v1/models``; ``"torouter"`` is always accepted too."""

    router: Path
    """Saved router directory (relative paths resolve against the config file's folder)."""

    experts: dict[str, ExpertConfig] = Field(default_factory=dict)
    """LangChain chat models by expert name."""

    manifest: Path | None = None
    """An experts manifest of ``torouter prepare`` (relative to this file): its experts, local
    Hugging Face models included, are served as they were when the routing data was made."""

    cost_weight: float = Field(0.0, ge=0.0)
    max_cost: float | None = Field(None, ge=0.0)
    route_on: RouteOnMode = "last_user"
    prices: dict[str, float] | None = None
    fallbacks: bool = True
    auth: AuthConfig | None = None
    limits: Limits = Field(default_factory=Limits)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    capture: CaptureConfig | None = None

    @model_validator(mode="after")
    def _names(self) -> ServeConfig:
        if not self.experts and self.manifest is None:
            raise ValueError("give experts: (LangChain chat models) or manifest: (an experts.yaml), or both")
        for reserved in {self.name, DEFAULT_NAME}:
            if reserved in self.experts:
                raise ValueError(f"expert name {reserved!r} is the router's own model id; rename the expert")
        return self


# Union members pydantic adds to error locations (``content.str``, ``content.list[...]``).
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|^(function-|tagged-union\[|list\[|dict\[)")


def _location(loc: tuple, untag: bool = False) -> str:
    """A field path like ``messages.0.content``; ``untag`` drops union-member tags (request models only)."""
    return ".".join(str(p) for p in loc if not (untag and isinstance(p, str) and _TYPE_TAG.search(p)))


def _describe(exc: ValidationError, untag: bool = False) -> str:
    """The first few problems as ``field.path: message``, one entry per field."""
    by_field: dict[str, list[str]] = {}
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        messages = by_field.setdefault(_location(error["loc"], untag) or "(top level)", [])
        if message not in messages:
            messages.append(message)
    parts = [f"{field}: {' or '.join(messages)}" for field, messages in list(by_field.items())[:5]]
    more = len(by_field) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def load_config(path: str | os.PathLike) -> ServeConfig:
    """Read and validate a server config; raises ``ConfigError`` naming the bad field."""
    path = Path(path)
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml comes with the serve extra
        raise ConfigError("reading the config needs PyYAML: pip install 'torouter[serve]'") from None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the config must be a mapping with at least router: and experts:")
    try:
        config = ServeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    if not config.router.is_absolute():
        config = config.model_copy(update={"router": (path.parent / config.router).resolve()})
    if config.manifest is not None and not config.manifest.is_absolute():
        config = config.model_copy(update={"manifest": (path.parent / config.manifest).resolve()})
    if config.capture is not None and not config.capture.path.is_absolute():
        capture = config.capture.model_copy(update={"path": (path.parent / config.capture.path).resolve()})
        config = config.model_copy(update={"capture": capture})
    return config


def _build_expert(name: str, spec: ExpertConfig, redactor: Redactor) -> Any:
    """The chat model of one ``experts:`` entry, built exactly as ``prepare`` builds a manifest's."""
    try:
        return build_expert_chat_model(name, spec, redactor)
    except ExpertBuildError as exc:
        raise ConfigError(exc.at(f"experts.{name}")) from None


def _build(config: ServeConfig, redactor: Redactor) -> Any:
    experts = {name: _build_expert(name, spec, redactor) for name, spec in config.experts.items()}
    if config.manifest is not None:
        experts.update(_manifest_experts(config.manifest, set(experts)))
    if not config.router.exists():
        raise ConfigError(f"router: no saved router at {config.router}")
    try:
        router = load_router(config.router)
    except (RouterFileError, ValueError) as exc:
        raise ConfigError(f"router: {exc}") from None
    capture = None
    if config.capture is not None:
        try:
            capture = PromptCapture(config.capture.path, include_answers=config.capture.include_answers,
                                    redact=config.capture.redact, patterns=config.capture.patterns,
                                    task=config.capture.task, source="serve")
        except ValueError as exc:
            raise ConfigError(f"capture: {exc}") from None
    try:
        return ChatTORouter(experts=experts, router=router, cost_weight=config.cost_weight,
                            max_cost=config.max_cost, route_on=config.route_on, prices=config.prices,
                            fallbacks=config.fallbacks, capture=capture)
    except ValidationError as exc:  # ChatTORouter's own checks, e.g. names that differ from the router's
        problems = "; ".join(f"{_location(e['loc']) or 'experts'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise ConfigError(problems) from None
    except ValueError as exc:
        raise ConfigError(f"experts: {exc}") from None


def _manifest_experts(path: Path, taken: set[str]) -> dict[str, Any]:
    try:
        from torouter.prepare import ManifestError
    except ImportError:
        raise ConfigError("manifest: serving manifest experts needs the prepare extra: "
                          "pip install 'torouter[prepare]'") from None
    try:
        experts = ChatManifestExpert.from_manifest(path)
    except ManifestError as exc:
        raise ConfigError(f"manifest: {exc}") from None
    clash = taken & set(experts)
    if clash:
        raise ConfigError(f"manifest: experts {sorted(clash)} are also listed under experts:")
    for name in {DEFAULT_NAME} & set(experts):
        raise ConfigError(f"manifest: expert name {name!r} is the router's own model id; rename the expert")
    return experts


def build_chat_model(config: ServeConfig | str | os.PathLike) -> Any:
    """The ``ChatTORouter`` a config describes (experts built, router loaded)."""
    if not isinstance(config, ServeConfig):
        config = load_config(config)
    return _build(config, Redactor())


def _auth_token(auth: AuthConfig) -> str:
    token = os.environ.get(auth.token_env, "")
    if not token.strip():
        raise ConfigError(f"auth.token_env: environment variable {auth.token_env} is not set or empty; "
                          "export the bearer token clients must send, or remove auth:")
    return token
