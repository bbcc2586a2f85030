"""``torouter serve``: an OpenAI-compatible chat completions endpoint in front of a ``ChatTORouter``.

Any OpenAI client can use a trained router as if it were one model: ``POST
/v1/chat/completions`` with ``model="torouter"`` lets the router pick the expert,
``model="<expert>"`` forces one, an optional ``"torouter": {"cost_weight": W, "max_cost": C}``
in the request body overrides the server's routing trade-off for that request (OpenAI
clients send it with ``extra_body``), ``tools`` route among the experts that can call
them, and every response names the answering expert in ``model`` and carries the
routing decision in an extra ``torouter`` field (on the first chunk when streaming).
``GET /v1/models`` lists the router and its experts, ``GET /health`` answers load
balancers.

The server is configured by a YAML file (see ``examples/router.yaml``)::

    router: runs/router                # saved router directory, relative to this file
    experts:
      edge-small: {class: "langchain_torouter:ChatRuleBased", kwargs: {model: edge-small}}
      cloud-large: {model: "openai:gpt-4o-mini", kwargs: {api_key: "${OPENAI_API_KEY}"}}
    cost_weight: 50
    auth: {token_env: TOROUTER_TOKEN}  # clients send "Authorization: Bearer <token>"
    limits: {max_request_bytes: 1048576, max_tokens: 4096, max_messages: 256}
    timeouts: {request_s: 600, expert_s: 120, read_s: 15}

Nothing a client or an expert does can hold the server's resources without bound:

* every request has a deadline (``timeouts.request_s``, routing and every expert tried
  included) and every expert attempt one of its own (``timeouts.expert_s``: its whole
  answer, or for a stream its first token and then each gap between tokens); an expert
  past its deadline is cancelled and the next in the ranking answers;
* a client that disconnects cancels its expert call, streamed or not;
* a connection must send its request head and body within ``timeouts.read_s``;
* router inference runs on a thread of its own and each expert gets its own capacity
  (``limits.expert_concurrency`` calls at once, ``limits.expert_threads`` threads for
  blocking work), so a slow or hung expert can only exhaust its own share. Experts
  without an async implementation, those marked ``threaded: true`` and async experts
  seen blocking the event loop run on their own threads, so ``/health`` and the other
  experts keep answering.

Bad input is a 400 before it reaches the router: text that is not valid Unicode (a lone
UTF-16 surrogate), integers of more than 64 digits, NaN, Infinity and numbers beyond a
float. A prompt that still breaks a batched router call fails alone: the batch's other
requests are routed again one by one. An empty answer (no text and no tool call) counts
as a failure of that expert, plain or streamed, and the next expert answers. Keys read
through ``${VAR}`` and the bearer token never appear in reprs, logs or responses.

FastAPI is imported here only; ``torouter`` itself never imports this module, so the
core works without the ``serve`` extra.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import queue
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .credentials import MissingEnvironmentVariable, Redactor, StreamMasker, hide_secrets, import_object, reveal

logger = logging.getLogger("torouter.serve")

DEFAULT_NAME = "torouter"
"""Model id that lets the router decide (a configured ``name`` is accepted as well)."""

_FINISH_REASONS = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "eos": "stop", "STOP": "stop",
    "length": "length", "max_tokens": "length", "MAX_TOKENS": "length",
    "tool_calls": "tool_calls", "tool_use": "tool_calls", "content_filter": "content_filter",
}
_FAILURE_CHARS = 300
_MAX_INT_DIGITS = 64  # longer JSON integers are refused before Python converts them (quadratic in length)
_BLOCKING_STEP_S = 0.5  # an expert's async code holding the event loop this long runs on threads from then on


class ConfigError(ValueError):
    """A server config that cannot be loaded or built; the message names the bad field."""


# --------------------------------------------------------------------------- config


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
    route_on: Literal["last_user", "conversation"] = "last_user"
    prices: dict[str, float] | None = None
    fallbacks: bool = True
    auth: AuthConfig | None = None
    limits: Limits = Field(default_factory=Limits)
    timeouts: Timeouts = Field(default_factory=Timeouts)

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
    return config


def _import_object(path: str, where: str) -> Any:
    try:
        return import_object(path)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot import {path!r}: {exc}") from None


def _build_expert(name: str, spec: ExpertConfig, redactor: Redactor) -> Any:
    from langchain_core.language_models import BaseChatModel

    where = f"experts.{name}"
    try:
        kwargs = reveal(spec.kwargs, redactor, f"{where}.kwargs")
    except MissingEnvironmentVariable as exc:
        raise ConfigError(str(exc)) from None
    if spec.model is not None:
        try:
            from langchain.chat_models import init_chat_model
        except ImportError:
            raise ConfigError(
                f"{where}.model: {spec.model!r} is built with LangChain's init_chat_model, which needs "
                "`pip install langchain` plus the provider package (e.g. langchain-openai); "
                "or give class: 'module:Class' with kwargs instead") from None
        factory: Callable[..., Any] = partial(init_chat_model, spec.model)
        what = f"model {spec.model!r}"
    else:
        factory = _import_object(spec.class_, f"{where}.class")
        what = spec.class_
    try:
        expert = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - any construction error is a configuration error
        raise ConfigError(f"{where}: could not build {what}: {type(exc).__name__}: {redactor(str(exc))}") from None
    if not isinstance(expert, BaseChatModel):
        raise ConfigError(f"{where}: {what} built a {type(expert).__name__}, not a LangChain chat model")
    return expert


def _build(config: ServeConfig, redactor: Redactor) -> Any:
    from langchain_torouter import ChatTORouter

    from .routers import RouterFileError, load_router

    experts = {name: _build_expert(name, spec, redactor) for name, spec in config.experts.items()}
    if config.manifest is not None:
        experts.update(_manifest_experts(config.manifest, set(experts)))
    if not config.router.exists():
        raise ConfigError(f"router: no saved router at {config.router}")
    try:
        router = load_router(config.router)
    except (RouterFileError, ValueError) as exc:
        raise ConfigError(f"router: {exc}") from None
    try:
        return ChatTORouter(experts=experts, router=router, cost_weight=config.cost_weight,
                            max_cost=config.max_cost, route_on=config.route_on, prices=config.prices,
                            fallbacks=config.fallbacks)
    except ValidationError as exc:  # ChatTORouter's own checks, e.g. names that differ from the router's
        problems = "; ".join(f"{_location(e['loc']) or 'experts'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise ConfigError(problems) from None
    except ValueError as exc:
        raise ConfigError(f"experts: {exc}") from None


def _manifest_experts(path: Path, taken: set[str]) -> dict[str, Any]:
    from langchain_torouter import ChatManifestExpert

    try:
        from .prepare import ManifestError
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


# --------------------------------------------------------------------------- requests


class _Request(BaseModel):
    # Strict: "stream": "yes" or "max_tokens": "10" are client bugs worth a 400, not a guess.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class _TextPart(_Request):
    type: Literal["text"]
    text: str


class _ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class _ImagePart(_Request):
    type: Literal["image_url"]
    image_url: _ImageURL


_Part = Annotated[_TextPart | _ImagePart, Field(discriminator="type")]


class _FunctionCall(_Request):
    name: str = Field(min_length=1)
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, arguments: str) -> str:
        try:
            parsed = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments must be a JSON object encoded as a string ({exc})") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object encoded as a string")
        return arguments


class _ToolCall(_Request):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: _FunctionCall


class _Message(_Request):
    role: str
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        if role == "function":
            raise ValueError("'function' messages are the deprecated form: send 'tool' messages with a tool_call_id")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError("role must be one of 'system', 'developer', 'user', 'assistant', 'tool'")
        return role

    @model_validator(mode="after")
    def _content(self) -> _Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, list) and self.role != "user":
            if any(not isinstance(p, _TextPart) for p in self.content):
                raise ValueError(f"a {self.role} message may only have text parts")
        return self


class _FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _Tool(_Request):
    type: Literal["function"]
    function: _FunctionDef


class _ToolName(_Request):
    name: str


class _NamedToolChoice(_Request):
    type: Literal["function"]
    function: _ToolName


class _StreamOptions(_Request):
    include_usage: bool = False


class _RoutingOptions(_Request):
    # Forbid: a misspelt option silently routing at the server's default would be a hidden bug.
    model_config = ConfigDict(strict=True, extra="forbid")
    cost_weight: float | None = Field(None, ge=0.0)
    max_cost: float | None = Field(None, ge=0.0)


class _ChatRequest(_Request):
    model: str = Field(min_length=1)
    messages: list[_Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    torouter: _RoutingOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s] or None

    @model_validator(mode="after")
    def _tools(self) -> _ChatRequest:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools share a name")
        if isinstance(self.tool_choice, _NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice: {self.tool_choice.function.name!r} is not one of the tools {names}")
        elif self.tool_choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs tools")
        return self

    def langchain_tool_choice(self) -> str | None:
        """``tool_choice`` in LangChain's words: a tool's name, ``"any"`` or ``"auto"``."""
        if isinstance(self.tool_choice, _NamedToolChoice):
            return self.tool_choice.function.name
        return {"required": "any", "auto": "auto"}.get(self.tool_choice or "")


# Parameters that would change what the client gets back and that this server cannot honour.
def _unsupported(payload: Mapping[str, Any]) -> str | None:
    if payload.get("functions"):  # the deprecated form of tools
        return "functions"
    if payload.get("function_call") not in (None, "none"):
        return "function_call"
    response_format = payload.get("response_format")
    if response_format not in (None, {"type": "text"}):
        return "response_format"
    if payload.get("n") not in (None, 1):
        return "n"
    if payload.get("logprobs") or payload.get("audio"):
        return "logprobs" if payload.get("logprobs") else "audio"
    return None


class _NumberError(ValueError):
    """A JSON number this server will not read: NaN, Infinity, out of float range, or too many digits."""


def _json_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > _MAX_INT_DIGITS:
        raise _NumberError(f"an integer with {digits} digits (the most this server reads is {_MAX_INT_DIGITS})")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NumberError(f"the number {text[:40]} is beyond the range of a 64-bit float")
    return value


def _json_constant(name: str) -> Any:
    raise _NumberError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


# A \uD800-\uDFFF escape: the only way a lone surrogate gets into text decoded from UTF-8 JSON.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> str | None:
    """Where in a decoded JSON value a string holds a lone surrogate (``messages.0.content``), or None.

    Walked with a stack rather than recursion: the body may be nested as deep as JSON allows.
    """
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return ".".join(map(str, path)) or "(top level)"
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if _SURROGATE.search(key):
                    return ".".join(map(str, (*path, "<key>")))
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in reversed(list(enumerate(item))))
    return None


class _APIError(Exception):
    """An error answered to the client in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (Starlette refuses NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _usage(usage: Mapping[str, Any] | None) -> dict[str, int] | None:
    if not usage:
        return None
    prompt, completion = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}


def _finish_reason(metadata: Mapping[str, Any]) -> str | None:
    reason = metadata.get("finish_reason") or metadata.get("stop_reason") or metadata.get("done_reason")
    return None if reason is None else _FINISH_REASONS.get(str(reason), "stop")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) if isinstance(b, dict) and b.get("type") == "text"
                       else b if isinstance(b, str) else "" for b in content)
    return ""


def _to_langchain(messages: list[_Message]) -> list[Any]:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    converted = []
    tool_names: dict[str, str] = {}  # OpenAI tool messages name only the call; some experts want the tool
    for message in messages:
        if isinstance(message.content, list):
            content: Any = [p.model_dump(exclude_none=True) for p in message.content]
        else:
            content = message.content or ""
        extra = {"name": message.name} if message.name else {}
        if message.role in ("system", "developer"):
            converted.append(SystemMessage(content=content, **extra))
        elif message.role == "user":
            converted.append(HumanMessage(content=content, **extra))
        elif message.role == "tool":
            name = message.name or tool_names.get(message.tool_call_id or "")
            converted.append(ToolMessage(content=content, tool_call_id=message.tool_call_id,
                                         **({"name": name} if name else {})))
        else:
            calls = [{"name": c.function.name, "args": json.loads(c.function.arguments or "{}"), "id": c.id,
                      "type": "tool_call"} for c in message.tool_calls or []]
            tool_names.update((c["id"], c["name"]) for c in calls)
            converted.append(AIMessage(content=content, tool_calls=calls, **extra))
    return converted


def _openai_tool_calls(calls: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": c.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c.get("args") or {})}} for c in calls]


def _openai_tool_deltas(chunks: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """LangChain tool-call chunks as OpenAI stream deltas: id and name first, then argument pieces."""
    deltas = []
    for position, c in enumerate(chunks):
        delta: dict[str, Any] = {"index": c.get("index") if c.get("index") is not None else position}
        if c.get("id"):
            delta.update(id=c["id"], type="function")
        function = {"arguments": c.get("args") or ""}
        if c.get("name"):
            function["name"] = c["name"]
        delta["function"] = function
        deltas.append(delta)
    return deltas


# --------------------------------------------------------------------------- the app


class ExpertTimeout(TimeoutError):
    """An expert gave no answer (or, streaming, no token) within its deadline; its call was cancelled."""


class EmptyAnswer(RuntimeError):
    """An expert answered with no text and no tool call: counted as its failure, so the next expert answers."""


class _ClientGone(Exception):
    """The client disconnected: whatever was still working for it has been cancelled."""


class _Overdue(Exception):
    """A wait this server bounds ran out (not a TimeoutError, which an expert may raise itself)."""


_END = object()  # an expert's answer is complete
_GONE = object()  # the client went away while a request waited on an expert


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class _Threads(concurrent.futures.Executor):
    """A fixed-size pool of daemon threads, started as work arrives.

    Daemon threads, because a call that never returns (a hung expert) must hold only its
    own thread: never another expert's, and never the process's exit on SIGTERM.
    """

    def __init__(self, size: int, name: str):
        self.size, self.name = size, name
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self.name} threads have been shut down")
            self._work.put((future, fn, args, kwargs))
            if self._idle:
                self._idle -= 1  # an idle thread takes it
            elif self._started < self.size:
                self._started += 1
                threading.Thread(target=self._serve, name=f"{self.name}-{self._started}", daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():  # False: cancelled while it waited
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # Never joins: a thread stuck in a hung call would hold shutdown forever.
        with self._lock:
            self._closed = True
            for _ in range(self._started):
                self._work.put(None)


_LANE: contextvars.ContextVar[_Lane | None] = contextvars.ContextVar("torouter_lane", default=None)


class _LoopExecutor(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor, so blocking work lands on its owner's threads.

    LangChain (``run_in_executor(None, ...)``) and many experts (``asyncio.to_thread``) hand
    blocking work to the loop's default executor; submitted while an expert call runs, it
    goes to that expert's own threads, so one expert's slow or hung work cannot take the
    threads every other expert and the router need. Anything else runs here as usual.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        lane = _LANE.get()
        if lane is not None:
            return lane.threads.submit(fn, *args, **kwargs)
        return super().submit(fn, *args, **kwargs)


class _Lane:
    """One expert's own capacity: ``concurrency`` calls in progress and ``threads`` for blocking work."""

    def __init__(self, name: str, concurrency: int, threads: int, threaded: bool):
        self.name = name
        self.concurrency = concurrency
        self.threads = _Threads(threads, f"torouter-expert-{name}")
        self.threaded = threaded
        self.active = 0
        self.slots = asyncio.Semaphore(concurrency)

    def bind(self) -> None:
        """Fresh asyncio state for the event loop now running (a semaphore serves one loop)."""
        self.slots = asyncio.Semaphore(self.concurrency)

    def on_threads(self, runnable: Any, stream: bool) -> bool:
        """Whether a call runs through the expert's sync API on its threads, not its async API on the loop."""
        if self.threaded:
            return True
        from langchain_core.language_models import BaseChatModel

        model = runnable
        while not isinstance(model, BaseChatModel) and hasattr(model, "bound"):  # tools bound to the expert
            model = model.bound
        if not isinstance(model, BaseChatModel):
            return False
        cls = type(model)
        async_invoke = cls._agenerate is not BaseChatModel._agenerate
        if not stream:
            return not async_invoke
        if cls._astream is not BaseChatModel._astream:
            return False
        # No async stream: LangChain would stream the sync one from threads, or answer with one invoke.
        return cls._stream is not BaseChatModel._stream or not async_invoke


class _LoopWatch(threading.Thread):
    """Notices an expert's async code blocking the event loop, and moves that expert to its own threads.

    A daemon thread pings the loop ten times a second. When a ping has waited
    ``_BLOCKING_STEP_S``, it reads the loop thread's stack three times, a quarter of a
    second apart: an expert whose same call is on the stack every time, while the ping
    still waits, is what holds the loop (a loop merely starved of CPU moves on between
    samples), and its calls run on its own threads from then on. Its first blocking call
    cannot be taken back; ``threaded: true`` in its config avoids even that one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, lanes: Mapping[int, _Lane]):
        super().__init__(name="torouter-loop-watch", daemon=True)
        self.loop, self.lanes, self.loop_thread = loop, lanes, threading.get_ident()

    def run(self) -> None:
        while True:
            beat, sent = threading.Event(), time.monotonic()
            try:
                self.loop.call_soon_threadsafe(beat.set)
            except RuntimeError:  # the loop is closed: the server stopped
                return
            if not beat.wait(_BLOCKING_STEP_S):
                samples = [self._expert_frame()]
                for _ in range(2):
                    time.sleep(0.25)
                    samples.append(self._expert_frame())
                first = samples[0]
                if first is not None and not beat.is_set() and all(
                        sample is not None and sample[0] is first[0] for sample in samples):
                    lane = first[1]
                    if not lane.threaded:
                        lane.threaded = True
                        logger.warning("expert %r blocked the event loop for %.1f s or more in its async code; its "
                                       "calls now run on its own threads (set threaded: true in its config to "
                                       "start that way)", lane.name, time.monotonic() - sent)
                while not beat.wait(1.0):
                    if self.loop.is_closed():
                        return
            time.sleep(0.1)

    def _expert_frame(self) -> tuple[Any, _Lane] | None:
        """The innermost frame on the loop thread that runs a method of an expert, and that expert's lane."""
        frame = sys._current_frames().get(self.loop_thread)
        while frame is not None:
            lane = self.lanes.get(id(frame.f_locals.get("self")))
            if lane is not None:
                return frame, lane
            frame = frame.f_back
        return None


def as_chunk(item: Any) -> Any:
    """A streamed item as a message chunk (``langchain_torouter``'s rule, imported when first needed)."""
    from langchain_torouter._routing import as_chunk as to_chunk

    return to_chunk(item)


def _has_output(message: Any) -> bool:
    return bool(message.text or getattr(message, "tool_calls", None) or getattr(message, "tool_call_chunks", None))


class _Attempt:
    """One expert working on one request: a task of its own puts the answer (or its chunks) on a queue.

    The request reads the queue with its deadlines; stopping the attempt cancels the
    expert's call (async experts) or stops it at its next chunk (experts on threads).
    ``hard_deadline`` (loop time) bounds the task even if nobody reads the queue any more.
    """

    def __init__(self, lane: _Lane, runnable: Any, messages: list[Any], config: dict[str, Any],
                 kwargs: dict[str, Any], stream: bool, hard_deadline: float):
        self.lane = lane
        self.queue: asyncio.Queue = asyncio.Queue()
        self._stop = threading.Event()
        self.task = asyncio.create_task(self._run(runnable, messages, config, kwargs, stream, hard_deadline))

    async def next(self, timeout: float) -> Any:
        """The next item (a message, a chunk or ``_END``); raises the expert's error, _Overdue or _ClientGone."""
        try:
            async with asyncio.timeout(timeout):
                item = await self.queue.get()
        except TimeoutError:
            raise _Overdue from None
        if item is _GONE:
            raise _ClientGone
        if isinstance(item, _Failed):
            raise item.error
        return item

    def stop(self) -> None:
        self._stop.set()
        self.task.cancel()

    async def _run(self, runnable: Any, messages: list[Any], config: dict[str, Any], kwargs: dict[str, Any],
                   stream: bool, hard_deadline: float) -> None:
        lane = self.lane
        lane.active += 1
        _LANE.set(lane)  # this task's blocking work goes to the expert's threads (see _LoopExecutor)
        try:
            async with asyncio.timeout_at(hard_deadline), lane.slots:
                if lane.on_threads(runnable, stream):
                    await self._on_threads(runnable, messages, config, kwargs, stream)
                elif stream:
                    chunks = runnable.astream(messages, config, **kwargs)
                    try:
                        while True:
                            try:
                                chunk = await anext(chunks)
                            except StopAsyncIteration:
                                break
                            self.queue.put_nowait(as_chunk(chunk))
                    finally:
                        await chunks.aclose()
                else:
                    self.queue.put_nowait(await runnable.ainvoke(messages, config, **kwargs))
            self.queue.put_nowait(_END)
        except Exception as exc:  # noqa: BLE001 - the expert's failure, read by the request
            self.queue.put_nowait(_Failed(exc))
        finally:
            lane.active -= 1

    async def _on_threads(self, runnable: Any, messages: list[Any], config: dict[str, Any],
                          kwargs: dict[str, Any], stream: bool) -> None:
        loop = asyncio.get_running_loop()
        chunks, stop = self.queue, self._stop

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the server stopped
                stop.set()

        def work() -> Any:
            if not stream:
                return runnable.invoke(messages, config, **kwargs)
            iterator = runnable.stream(messages, config, **kwargs)
            try:
                for chunk in iterator:
                    if stop.is_set():
                        break
                    put(as_chunk(chunk))
            finally:
                iterator.close()
            return _END

        try:
            result = await loop.run_in_executor(self.lane.threads, work)
        finally:
            stop.set()  # cancelled: a streaming thread stops at its next chunk
        if result is not _END:
            self.queue.put_nowait(result)


class _ClientWatch:
    """Watches one request's connection; when the client disconnects, stops what works for it."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]]):
        self.gone = False
        self.attempt: _Attempt | None = None
        self.task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - a broken receive channel is a client gone as well
            pass
        self.gone = True
        if self.attempt is not None:
            self.attempt.stop()
            self.attempt.queue.put_nowait(_GONE)

    async def run(self, awaitable: Awaitable[Any], timeout: float) -> Any:
        """``awaitable``'s result; cancelled with _Overdue after ``timeout`` s, or _ClientGone on a disconnect."""
        if self.gone:
            raise _ClientGone
        task = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({task, self.task}, timeout=max(timeout, 0),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        if self.gone:
            raise _ClientGone
        raise _Overdue

    def close(self) -> None:
        self.task.cancel()
        if self.attempt is not None:
            self.attempt.stop()


class _RoutingBatcher:
    """Routes concurrent requests together: one router call (one encoder pass) per batch.

    Requests that arrive while a batch is in the router wait for the next one, so an
    idle server adds no delay and a busy one spreads each forward pass over many
    prompts instead of queueing one pass per request. Inference runs on the router's
    own thread, never on the event loop nor on threads an expert could exhaust. A batch
    the router fails on is routed again prompt by prompt, so one bad prompt fails alone.
    """

    def __init__(self, controller: Any, threads: _Threads, max_batch: int = 64):
        self.controller = controller
        self.threads = threads
        self.max_batch = max_batch
        self._pending: list[tuple[Any, tuple, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    def bind(self) -> None:
        """Forget the queue of an event loop that is no longer running."""
        self._pending, self._worker = [], None

    async def decide(self, prompt: Any, allowed: list[str] | None, cost_weight: float | None = None,
                     max_cost: float | None = None) -> Any:
        self.controller.text(prompt)  # a prompt with nothing to route on fails alone, not its batch
        future = asyncio.get_running_loop().create_future()
        options = (None if allowed is None else tuple(allowed), cost_weight, max_cost)
        self._pending.append((prompt, options, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            # One router call per distinct (allowed experts, cost_weight, max_cost).
            groups: dict[tuple, list] = {}
            for item in batch:
                if not item[2].done():  # skip requests whose client went away or timed out
                    groups.setdefault(item[1], []).append(item)
            for options, items in groups.items():
                decisions = await self._route([prompt for prompt, _, _ in items], *options)
                for (_, _, future), decision in zip(items, decisions):
                    if future.done():
                        continue
                    if isinstance(decision, BaseException):
                        future.set_exception(decision)
                    else:
                        future.set_result(decision)

    async def _route(self, prompts: list[Any], allowed: tuple | None, cost_weight: float | None,
                     max_cost: float | None) -> list[Any]:
        """A decision (or the exception) per prompt."""
        loop = asyncio.get_running_loop()

        def decide(batch: list[Any]) -> list[Any]:
            return self.controller.decide_many(batch, allowed=allowed, cost_weight=cost_weight, max_cost=max_cost)

        try:
            return await loop.run_in_executor(self.threads, decide, prompts)
        except Exception as exc:  # noqa: BLE001 - handed to the request(s) below
            if len(prompts) == 1:
                return [exc]
            logger.warning("a routing batch of %d failed (%s); routing its requests one by one", len(prompts),
                           type(exc).__name__)
        decisions: list[Any] = []
        for prompt in prompts:
            try:
                decisions.extend(await loop.run_in_executor(self.threads, decide, [prompt]))
            except Exception as exc:  # noqa: BLE001 - this prompt's own failure
                decisions.append(exc)
        return decisions


class _Plan:
    """What one chat request needs once routed: who may answer, in which order, and by when."""

    __slots__ = ("request_id", "owner", "messages", "kwargs", "decision", "forced", "deadline", "candidates")

    def __init__(self, request_id: str, owner: Any, messages: list[Any], kwargs: dict[str, Any], decision: Any,
                 forced: str | None, deadline: float, fallbacks: bool):
        self.request_id, self.owner, self.messages, self.kwargs = request_id, owner, messages, kwargs
        self.decision, self.forced, self.deadline = decision, forced, deadline
        self.candidates = list(decision.ranking) if fallbacks else list(decision.ranking[:1])

    def config(self, name: str) -> dict[str, Any]:
        """The expert call's run config: tagged with the decision, for tracing."""
        meta = {**self.decision.as_metadata(), "expert": name, "chosen": self.decision.expert,
                "forced": self.forced is not None, "attempt": self.candidates.index(name) + 1}
        return {"metadata": {"torouter": meta}, "tags": [f"torouter:{name}"]}

    def outcome(self, name: str, failures: Mapping[str, BaseException]) -> dict[str, Any]:
        return self.decision.outcome(name, failures, self.forced is not None)


class _Service:
    """Request handling for one ``ChatTORouter``; ``create_app`` wires it to routes."""

    def __init__(self, chat_model: Any, name: str, limits: Limits, timeouts: Timeouts, token: str | None,
                 redactor: Redactor, threaded: Iterable[str] = ()):
        self.chat_model = chat_model
        self.name = name
        self.limits = limits
        self.timeouts = timeouts
        self.experts = list(chat_model.experts)
        threaded = set(threaded)
        for where, names in (("timeouts.experts", set(timeouts.experts)), ("threaded", threaded)):
            if names - set(self.experts):
                raise ConfigError(f"{where}: {sorted(names - set(self.experts))} are not experts of this router "
                                  f"{self.experts}")
        self.lanes = {n: _Lane(n, limits.expert_concurrency, limits.expert_threads, n in threaded)
                      for n in self.experts}
        self.router = _RoutingBatcher(chat_model.controller, _Threads(1, "torouter-routing"))
        self.created = int(time.time())
        self.redact = redactor
        self._loop: asyncio.AbstractEventLoop | None = None
        # Only a digest is kept: compared in constant time, and never the token itself.
        self._token_digest = None if token is None else hashlib.sha256(token.encode()).digest()
        if token is not None:
            redactor.add(token)

    def __repr__(self) -> str:
        return f"_Service(name={self.name!r}, experts={self.experts}, auth={self._token_digest is not None})"

    def live_calls(self) -> int:
        """Expert calls in progress, over all experts."""
        return sum(lane.active for lane in self.lanes.values())

    def bind_loop(self) -> None:
        """Set up per-event-loop state on the first request a loop serves."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        self._loop = loop
        loop.set_default_executor(_LoopExecutor(thread_name_prefix="asyncio"))
        for lane in self.lanes.values():
            lane.bind()
        self.router.bind()
        _LoopWatch(loop, {id(model): self.lanes[name] for name, model in self.chat_model.experts.items()}).start()

    # --- checks ---------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self._token_digest is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).digest()
        if not (hmac.compare_digest(digest, self._token_digest) and scheme.lower() == "bearer"):
            # Connection: close, so a client refused before its body was read cannot keep the socket.
            raise _APIError(401, "Invalid or missing bearer token: send 'Authorization: Bearer <token>'.",
                            type="authentication_error", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer", "Connection": "close"})

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.max_request_bytes
        too_big = _APIError(413, f"Request body is larger than the server's limit of {limit} bytes.",
                            code="request_too_large", headers={"Connection": "close"})
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise _APIError(400, "Invalid Content-Length header.", code="invalid_request",
                                headers={"Connection": "close"})
            if int(declared) > limit:
                raise too_big
        parts, size = [], 0
        try:
            async with asyncio.timeout(self.timeouts.read_s):
                async for part in request.stream():
                    size += len(part)
                    if size > limit:
                        raise too_big
                    parts.append(part)
        except TimeoutError:
            raise _APIError(408, f"The request body did not arrive within {self.timeouts.read_s:g} s.",
                            code="request_timeout", headers={"Connection": "close"}) from None
        return b"".join(parts)

    def parse(self, body: bytes) -> _ChatRequest:
        try:
            payload = json.loads(body, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, _NumberError) as exc:
            raise _APIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise _APIError(400, "Request body is nested too deeply.", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise _APIError(400, "Request body must be a JSON object.", code="invalid_request")
        # Checked here, before anything is batched: a tokenizer raises on a lone surrogate.
        where = _lone_surrogate(payload) if _SURROGATE_ESCAPE.search(body) else None
        if where is not None:
            raise _APIError(400, f"Invalid request: {where}: text holds a lone UTF-16 surrogate (an unpaired "
                                 "\\ud800-\\udfff escape), which is not valid Unicode.",
                            code="invalid_request", param=where)
        unsupported = _unsupported(payload)
        if unsupported is not None:
            raise _APIError(400, f"Parameter {unsupported!r} is not supported by the torouter server.",
                            code="unsupported_parameter", param=unsupported)
        try:
            request = _ChatRequest.model_validate(payload)
        except ValidationError as exc:
            param = _location(exc.errors()[0]["loc"], untag=True)
            raise _APIError(400, f"Invalid request: {_describe(exc, untag=True)}", code="invalid_request",
                            param=param or None) from None
        if len(request.messages) > self.limits.max_messages:
            raise _APIError(400, f"Too many messages: {len(request.messages)} > {self.limits.max_messages}.",
                            code="too_many_messages", param="messages")
        for field in ("max_completion_tokens", "max_tokens"):
            value = getattr(request, field)
            if value is not None and value > self.limits.max_tokens:
                raise _APIError(400, f"{field}={value} is above the server's limit of {self.limits.max_tokens}.",
                                code="max_tokens_exceeded", param=field)
        return request

    def forced_expert(self, model: str) -> str | None:
        """The expert a request's ``model`` forces, or None to let the router decide."""
        if model in (DEFAULT_NAME, self.name):
            return None
        if model in self.experts:
            return model
        raise _APIError(404, f"The model {model!r} does not exist: use {self.name!r} to let the router "
                             f"decide, or one of the experts {self.experts}.", code="model_not_found", param="model")

    def failures_message(self, failures: Mapping[str, BaseException]) -> str:
        parts = []
        for name, exc in failures.items():
            text = self.redact(f"{type(exc).__name__}: {exc}")
            parts.append(f"{name}: {text[:_FAILURE_CHARS]}{'...' if len(text) > _FAILURE_CHARS else ''}")
        return "; ".join(parts)

    def all_failed(self, plan: _Plan, failures: Mapping[str, BaseException]) -> _APIError:
        message = f"All {len(failures)} experts tried failed: {self.failures_message(failures)}"
        logger.warning("%s: %s", plan.request_id, message)
        return _APIError(502, message, type="upstream_error", code="all_experts_failed")

    def deadline_error(self, request_id: str, failures: Mapping[str, BaseException], during: str) -> _APIError:
        message = f"No answer within the request deadline of {self.timeouts.request_s:g} s ({during})."
        if failures:
            message += f" Tried: {self.failures_message(failures)}"
        logger.warning("%s: %s", request_id, message)
        return _APIError(504, message, type="timeout_error", code="deadline_exceeded")

    def routing(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        routed = dict(meta)
        routed["failures"] = {name: self.redact(str(text))[:_FAILURE_CHARS]
                              for name, text in (routed.get("failures") or {}).items()}
        return _jsonable(routed)

    # --- endpoints ------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card(m) for m in [self.name, *self.experts]]}

    def model_card(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self.created,
                "owned_by": "torouter" if model == self.name else "torouter-expert"}

    def with_tools(self, body: _ChatRequest, forced: str | None) -> tuple[Any, list[str] | None]:
        """The chat model holding each expert's runnable (with the request's tools bound) and the
        experts the router may pick."""
        if not body.tools or body.tool_choice == "none":
            return self.chat_model, None if forced is None else [forced]
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        try:
            runnable = self.chat_model.bind_tools(tools, tool_choice=body.langchain_tool_choice())
        except ValueError as exc:
            raise _APIError(400, f"No expert of this router can take these tools: {exc}",
                            code="unsupported_parameter", param="tools") from None
        owner = runnable.bound  # the ChatTORouter copy that holds each expert's bound tools
        try:
            allowed = owner.eligible(forced)
        except ValueError as exc:
            raise _APIError(400, str(exc), code="unsupported_parameter", param="tools") from None
        return owner, allowed

    def expert_kwargs(self, body: _ChatRequest) -> dict[str, Any]:
        chat = self.chat_model
        kwargs: dict[str, Any] = {
            "max_tokens": body.max_completion_tokens or body.max_tokens or chat.max_tokens or self.limits.max_tokens,
            "stop": body.stop if body.stop is not None else chat.stop}
        temperature = body.temperature if body.temperature is not None else chat.temperature
        if temperature is not None:
            kwargs["temperature"] = temperature
        return kwargs

    async def chat(self, request: Request) -> Any:
        from langchain_torouter._routing import messages_to_prompt

        self.bind_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.request_s
        self.check_auth(request)
        body = self.parse(await self.read_body(request))
        forced = self.forced_expert(body.model)
        messages = _to_langchain(body.messages)
        owner, allowed = self.with_tools(body, forced)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        options = body.torouter or _RoutingOptions()
        watch = _ClientWatch(request.receive)
        streaming = False
        try:
            try:
                decision = await watch.run(self.router.decide(messages_to_prompt(messages), allowed,
                                                              options.cost_weight, options.max_cost),
                                           deadline - loop.time())
            except ValueError as exc:  # e.g. no user text to route on
                raise _APIError(400, f"Cannot route this request: {exc}", code="unroutable",
                                param="messages") from None
            except _Overdue:
                raise self.deadline_error(request_id, {}, "routing") from None
            plan = _Plan(request_id, owner, messages, self.expert_kwargs(body), decision, forced, deadline,
                         self.chat_model.fallbacks)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                response = await self.stream(plan, watch, include_usage)
                streaming = True  # the response's body now owns the watch
                return response
            return await self.complete(plan, watch)
        except _ClientGone:
            logger.info("%s: the client went away; the work for it was cancelled", request_id)
            return Response(status_code=499)
        finally:
            if not streaming:
                watch.close()

    def start(self, plan: _Plan, name: str, stream: bool, watch: _ClientWatch) -> _Attempt:
        if watch.gone:
            raise _ClientGone
        attempt = _Attempt(self.lanes[name], plan.owner._runnable(name), plan.messages, plan.config(name),
                           plan.kwargs, stream, plan.deadline)
        watch.attempt = attempt
        return attempt

    def time_left(self, plan: _Plan, name: str) -> tuple[float, float]:
        """Seconds the expert's next step may take, and the expert's own deadline."""
        limit = self.timeouts.for_expert(name)
        return min(limit, plan.deadline - asyncio.get_running_loop().time()), limit

    def timed_out(self, plan: _Plan, failures: dict[str, BaseException], name: str, what: str,
                  limit: float) -> None:
        """Record an expert that ran out of time; raise 504 when it was the request's deadline."""
        if asyncio.get_running_loop().time() >= plan.deadline - 1e-3:
            failures[name] = ExpertTimeout(f"cut off by the request deadline while waiting for {what}")
            raise self.deadline_error(plan.request_id, failures, "every expert tried is listed")
        failures[name] = ExpertTimeout(f"no {what} within {limit:g} s")

    async def complete(self, plan: _Plan, watch: _ClientWatch) -> JSONResponse:
        from langchain_core.messages import AIMessage

        failures: dict[str, BaseException] = {}
        for name in plan.candidates:
            timeout, limit = self.time_left(plan, name)
            if timeout <= 0:
                raise self.deadline_error(plan.request_id, failures, "every expert tried is listed")
            attempt = self.start(plan, name, False, watch)
            try:
                message = await attempt.next(timeout)
            except _Overdue:
                attempt.stop()
                self.timed_out(plan, failures, name, "answer", limit)
                continue
            except _ClientGone:
                raise
            except Exception as exc:  # noqa: BLE001 - this expert failed: the next one answers
                failures[name] = exc
                continue
            finally:
                watch.attempt = None
            if not isinstance(message, AIMessage):
                failures[name] = TypeError(f"the expert returned a {type(message).__name__}, not a message")
            elif not _has_output(message):
                failures[name] = EmptyAnswer("the expert answered with no text and no tool call")
            else:
                return self.reply(plan, name, message, failures)
        raise self.all_failed(plan, failures)

    def reply(self, plan: _Plan, name: str, message: Any, failures: Mapping[str, BaseException]) -> JSONResponse:
        routed = self.routing(plan.outcome(name, failures))
        logger.info("%s -> %s (chosen %s, fallback=%s, forced=%s)", plan.request_id, name, plan.decision.expert,
                    bool(failures), plan.forced is not None)
        # An expert may echo a secret (a key it was given, a header): answers are masked like logs.
        text = self.redact.mask_values(message.text)
        reply: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        finish = _finish_reason(message.response_metadata) or "stop"
        if message.tool_calls:
            calls = _openai_tool_calls(message.tool_calls)
            for call in calls:
                call["function"]["arguments"] = self.redact.mask_values(call["function"]["arguments"])
            reply.update(content=text or None, tool_calls=calls)
            finish = "tool_calls"
        return JSONResponse({
            "id": plan.request_id, "object": "chat.completion", "created": int(time.time()), "model": name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(message.usage_metadata),
            "torouter": routed,
        })

    async def stream(self, plan: _Plan, watch: _ClientWatch, include_usage: bool) -> StreamingResponse:
        # Wait for an expert's first token before answering, so a request no expert answers
        # gets a proper 502 (or 504), and an expert that fails or stays silent before its
        # first token is passed over like a failed plain call.
        failures: dict[str, BaseException] = {}
        for name in plan.candidates:
            timeout, limit = self.time_left(plan, name)
            if timeout <= 0:
                raise self.deadline_error(plan.request_id, failures, "every expert tried is listed")
            attempt = self.start(plan, name, True, watch)
            first_by = asyncio.get_running_loop().time() + timeout
            head: list[Any] = []
            try:
                while not head or not _has_output(head[-1]):
                    item = await attempt.next(first_by - asyncio.get_running_loop().time())
                    if item is _END:
                        raise EmptyAnswer("the expert's stream ended with no text and no tool call")
                    head.append(item)
            except _Overdue:
                attempt.stop()
                watch.attempt = None
                self.timed_out(plan, failures, name, "first token", limit)
                continue
            except _ClientGone:
                raise
            except Exception as exc:  # noqa: BLE001 - this expert failed before any output
                attempt.stop()
                watch.attempt = None
                failures[name] = exc
                continue
            routed = self.routing(plan.outcome(name, failures))
            logger.info("%s -> %s (chosen %s, fallback=%s, forced=%s, stream)", plan.request_id, name,
                        plan.decision.expert, bool(failures), plan.forced is not None)
            return StreamingResponse(self.events(plan, name, attempt, head, routed, watch, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        raise self.all_failed(plan, failures)

    async def events(self, plan: _Plan, expert: str, attempt: _Attempt, head: list[Any], routed: dict[str, Any],
                     watch: _ClientWatch, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        usage: dict[str, int] = {}
        finish = None
        called = False
        masker = StreamMasker(self.redact)  # an echoed secret is masked even when split across chunks

        def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            data = {"id": plan.request_id, "object": "chat.completion.chunk", "created": created, "model": expert,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            if include_usage:
                data.setdefault("usage", None)
            return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

        def absorb(chunk: Any) -> dict[str, Any]:
            nonlocal finish, called
            for key, value in (chunk.usage_metadata or {}).items():
                if isinstance(value, int):
                    usage[key] = usage.get(key, 0) + value
            finish = _finish_reason(chunk.response_metadata) or finish
            text = masker.feed(chunk.text) if chunk.text else ""
            delta: dict[str, Any] = {"content": text} if text else {}
            if getattr(chunk, "tool_call_chunks", None):
                deltas = _openai_tool_deltas(chunk.tool_call_chunks)
                for call in deltas:
                    if isinstance(call.get("function", {}).get("arguments"), str):
                        call["function"]["arguments"] = self.redact.mask_values(call["function"]["arguments"])
                delta["tool_calls"] = deltas
                called = True
            return delta

        try:
            delta = absorb(head[0])
            yield event({"role": "assistant", "content": delta.pop("content", ""), **delta}, torouter=routed)
            for chunk in head[1:]:
                if delta := absorb(chunk):
                    yield event(delta)
            while True:
                timeout, limit = self.time_left(plan, expert)
                try:
                    if timeout <= 0:
                        raise _Overdue
                    chunk = await attempt.next(timeout)
                except _Overdue:
                    if asyncio.get_running_loop().time() >= plan.deadline - 1e-3:
                        error = _APIError(504, f"The request deadline of {self.timeouts.request_s:g} s passed while "
                                               f"expert {expert!r} was streaming.", type="timeout_error",
                                          code="deadline_exceeded")
                    else:
                        error = _APIError(504, f"Expert {expert!r} sent nothing for {limit:g} s while streaming.",
                                          type="timeout_error", code="expert_timeout")
                    logger.warning("%s: %s", plan.request_id, error.message)
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                if chunk is _END:
                    break
                if delta := absorb(chunk):
                    yield event(delta)
            if tail := masker.flush():
                yield event({"content": tail})
            yield event({}, "tool_calls" if called else finish or "stop")
            if include_usage:
                data = {"id": plan.request_id, "object": "chat.completion.chunk", "created": created,
                        "model": expert, "system_fingerprint": None, "choices": [], "usage": _usage(usage)}
                yield f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
        except _ClientGone:
            logger.info("%s: the client went away mid-stream; expert %s was stopped", plan.request_id, expert)
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            logger.warning("%s: expert %s failed mid-stream: %s", plan.request_id, expert,
                           self.redact(f"{type(exc).__name__}: {exc}"))
            error = _APIError(502, f"Expert {expert!r} failed while streaming.", type="upstream_error",
                              code="expert_failed")
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:
            attempt.stop()
            watch.close()


def create_app(config_or_chat_model: Any, *, token: str | None = None, limits: Limits | None = None,
               name: str | None = None, timeouts: Timeouts | None = None, threaded: Iterable[str] = ()) -> FastAPI:
    """The FastAPI app serving a router as an OpenAI-compatible endpoint.

    ``config_or_chat_model`` is a config file path, a ``ServeConfig`` or a ready
    ``ChatTORouter``. ``token`` (bearer auth), ``limits``, ``name`` and ``timeouts``
    override the config's; ``threaded`` names experts to call through their sync API on
    their own threads (added to those the config marks ``threaded: true``); with a
    ``ChatTORouter`` these are the only settings. Raises ``ConfigError`` when the config
    cannot be built, before anything listens.

    The app makes the event loop's default executor send blocking work submitted
    during an expert call to that expert's own threads (see ``Limits.expert_threads``);
    work submitted outside expert calls runs on an ordinary pool, as before. Serve it
    with ``run_server`` (or ``server_config``) to get the connection deadlines too.
    """
    from langchain_torouter import ChatTORouter

    redactor = Redactor()
    if isinstance(config_or_chat_model, (str, os.PathLike)):
        config_or_chat_model = load_config(config_or_chat_model)
    if isinstance(config_or_chat_model, ServeConfig):
        config = config_or_chat_model
        chat_model = _build(config, redactor)
        if token is None and config.auth is not None:
            token = _auth_token(config.auth)
        limits = limits or config.limits
        name = name or config.name
        timeouts = timeouts or config.timeouts
        threaded = {*threaded, *(n for n, spec in config.experts.items() if spec.threaded)}
    elif isinstance(config_or_chat_model, ChatTORouter):
        chat_model = config_or_chat_model
    else:
        raise TypeError(f"create_app takes a config path, a ServeConfig or a ChatTORouter, "
                        f"not a {type(config_or_chat_model).__name__}")
    if token is not None and not token.strip():
        raise ConfigError("token: an empty bearer token would let anyone in; pass None to turn auth off")
    name = name or DEFAULT_NAME
    if name in chat_model.experts or DEFAULT_NAME in chat_model.experts:
        raise ConfigError(f"name: {name!r} (or {DEFAULT_NAME!r}) is also an expert's name")
    service = _Service(chat_model, name, limits or Limits(), timeouts or Timeouts(), token, redactor, threaded)

    app = FastAPI(title="torouter", summary="OpenAI-compatible endpoint for a TO-Router",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.torouter = service

    @app.exception_handler(_APIError)
    async def api_error(request: Request, exc: _APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(service, exc)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Any:
        service.check_auth(request)
        return service.models()

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request) -> Any:
        service.check_auth(request)
        if model_id not in (service.name, *service.experts):
            raise _APIError(404, f"The model {model_id!r} does not exist.", code="model_not_found", param="model")
        return service.model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            return await service.chat(request)
        except _APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered as a generic 500, detail only in the log
            return _internal_error(service, exc)

    return app


def _internal_error(service: _Service, exc: BaseException) -> JSONResponse:
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    logger.error("internal error while serving a request:\n%s", service.redact(detail))
    return _APIError(500, "The server had an internal error while processing the request.",
                     type="server_error", code="internal_error").response()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _head_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request head in ``seconds``.

    uvicorn bounds idle keep-alive connections, but not a connection that never finishes
    its request head (or drips it): without this, a few hundred such sockets stay open
    for as long as their client likes. There is no request to answer yet, so the
    connection is simply closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._expect_head(None)

        def on_response_complete(self) -> None:
            finished = self.cycle
            super().on_response_complete()
            if self.cycle is finished:  # no pipelined request started: the next head must come in time
                self._expect_head(finished)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _expect_head(self, cycle: Any) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(seconds, self._head_overdue, cycle)

        def _head_overdue(self, cycle: Any) -> None:
            self._head_timer = None
            if self.cycle is cycle and not self.transport.is_closing():  # still no new request
                self.transport.close()

    return HeadDeadlineH11Protocol


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> Any:
    """The ``uvicorn.Config`` that serves ``app`` with its connection limits and deadlines.

    From the app's ``Limits`` and ``Timeouts``: at most ``max_connections`` connections
    (503 beyond), a request head within ``read_s`` (the connection is closed otherwise;
    the body's deadline is enforced by the app), idle keep-alive connections closed after
    ``keep_alive_s``. Other keyword arguments go to ``uvicorn.Config``.
    """
    import uvicorn

    service: _Service = app.state.torouter
    options: dict[str, Any] = {
        "server_header": False, "http": _head_deadline_protocol(service.timeouts.read_s),
        "timeout_keep_alive": service.timeouts.keep_alive_s, "limit_concurrency": service.limits.max_connections}
    return uvicorn.Config(app, host=host, port=port, **{**options, **kwargs})


def run_server(app_or_config: Any, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
               timeout_graceful_shutdown: float = 30.0) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests then get up to ``timeout_graceful_shutdown`` s to finish."""
    import uvicorn

    app = app_or_config if isinstance(app_or_config, FastAPI) else create_app(app_or_config)
    service: _Service = app.state.torouter
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if service._token_digest is None and not _is_loopback(host):
        logger.warning("serving on %s without auth: anyone who can reach it can spend your experts' budget; "
                       "set auth: {token_env: ...} in the config", host)
    logger.info("router %r over experts %s", service.name, service.experts)
    try:  # load the encoder now, so the first client does not wait for it
        service.chat_model.route("warm-up")
    except Exception as exc:  # noqa: BLE001 - the first request will report the problem
        logger.warning("router warm-up failed: %s", service.redact(f"{type(exc).__name__}: {exc}"))
    config = server_config(app, host, port, log_level=log_level, timeout_graceful_shutdown=timeout_graceful_shutdown)
    uvicorn.Server(config).run()


__all__ = ["AuthConfig", "ConfigError", "EmptyAnswer", "ExpertConfig", "ExpertTimeout", "Limits", "ServeConfig",
           "Timeouts", "build_chat_model", "create_app", "load_config", "run_server", "server_config"]
