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

Router inference runs in worker threads and experts are called through their async
APIs, so a slow expert or a router forward pass never stalls other requests. Keys read
through ``${VAR}`` and the bearer token never appear in reprs, logs or responses.

FastAPI is imported here only; ``torouter`` itself never imports this module, so the
core works without the ``serve`` extra.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .credentials import MissingEnvironmentVariable, Redactor, hide_secrets, import_object, reveal

logger = logging.getLogger("torouter.serve")

DEFAULT_NAME = "torouter"
"""Model id that lets the router decide (a configured ``name`` is accepted as well)."""

_FINISH_REASONS = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "eos": "stop", "STOP": "stop",
    "length": "length", "max_tokens": "length", "MAX_TOKENS": "length",
    "tool_calls": "tool_calls", "tool_use": "tool_calls", "content_filter": "content_filter",
}
_FAILURE_CHARS = 300


class ConfigError(ValueError):
    """A server config that cannot be loaded or built; the message names the bad field."""


# --------------------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ExpertConfig(_Strict):
    """How to build one expert: an ``init_chat_model`` string or an import path, plus kwargs."""

    model: str | None = None
    """``"provider:model"`` for ``langchain.chat_models.init_chat_model`` (needs ``pip install langchain``)."""

    class_: str | None = Field(None, alias="class")
    """Import path of a LangChain chat model class, ``"module:Class"`` or ``"module.Class"``."""

    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Constructor arguments; ``${VAR}`` in a string is read from the environment at startup."""

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
    """Per-request limits, so one client cannot tie up the server or run up an expert's bill."""

    max_request_bytes: int = Field(1_048_576, ge=1)
    """Largest request body; bigger ones get 413."""

    max_tokens: int = Field(4096, ge=1)
    """Largest ``max_tokens`` a request may ask for (400 above); requests without one get this cap."""

    max_messages: int = Field(256, ge=1)
    """Most messages in one conversation (400 above)."""


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
    model_config = ConfigDict(strict=True, extra="ignore")


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


class _RoutingBatcher:
    """Routes concurrent requests together: one router call (one encoder pass) per batch.

    Requests that arrive while a batch is in the router wait for the next one, so an
    idle server adds no delay and a busy one spreads each forward pass over many
    prompts instead of queueing one pass per request. Inference runs in a worker
    thread (``Controller.adecide_many``), never on the event loop.
    """

    def __init__(self, controller: Any, max_batch: int = 64):
        self.controller = controller
        self.max_batch = max_batch
        self._pending: list[tuple[Any, tuple, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

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
                if not item[2].done():  # skip requests whose client went away
                    groups.setdefault(item[1], []).append(item)
            for (allowed, cost_weight, max_cost), items in groups.items():
                try:
                    decisions = await self.controller.adecide_many([p for p, _, _ in items], allowed=allowed,
                                                                   cost_weight=cost_weight, max_cost=max_cost)
                except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
                    decisions = [exc] * len(items)
                for (_, _, future), decision in zip(items, decisions):
                    if future.done():
                        continue
                    if isinstance(decision, BaseException):
                        future.set_exception(decision)
                    else:
                        future.set_result(decision)


class _Service:
    """Request handling for one ``ChatTORouter``; ``create_app`` wires it to routes."""

    def __init__(self, chat_model: Any, name: str, limits: Limits, token: str | None, redactor: Redactor):
        self.chat_model = chat_model
        self.router = _RoutingBatcher(chat_model.controller)
        self.name = name
        self.limits = limits
        self.experts = list(chat_model.experts)
        self.created = int(time.time())
        self.redact = redactor
        # Only a digest is kept: compared in constant time, and never the token itself.
        self._token_digest = None if token is None else hashlib.sha256(token.encode()).digest()
        if token is not None:
            redactor.add(token)

    def __repr__(self) -> str:
        return f"_Service(name={self.name!r}, experts={self.experts}, auth={self._token_digest is not None})"

    # --- checks ---------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self._token_digest is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).digest()
        if not (hmac.compare_digest(digest, self._token_digest) and scheme.lower() == "bearer"):
            raise _APIError(401, "Invalid or missing bearer token: send 'Authorization: Bearer <token>'.",
                            type="authentication_error", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.max_request_bytes
        too_big = _APIError(413, f"Request body is larger than the server's limit of {limit} bytes.",
                            code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise _APIError(400, "Invalid Content-Length header.", code="invalid_request")
            if int(declared) > limit:
                raise too_big
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_big
            parts.append(part)
        return b"".join(parts)

    def parse(self, body: bytes) -> _ChatRequest:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _APIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise _APIError(400, "Request body is nested too deeply.", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise _APIError(400, "Request body must be a JSON object.", code="invalid_request")
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
        return f"All {len(failures)} experts tried failed: " + "; ".join(parts)

    def expert_failure(self, exc: BaseException, decision: Any, request_id: str) -> _APIError:
        from torouter.controller import AllExpertsFailed

        failures = exc.failures if isinstance(exc, AllExpertsFailed) else {decision.expert: exc}
        message = self.failures_message(failures)
        logger.warning("%s: %s", request_id, message)
        return _APIError(502, message, type="upstream_error", code="all_experts_failed")

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

    def with_tools(self, body: _ChatRequest, forced: str | None) -> tuple[Any, Any, list[str] | None]:
        """What answers the request (the chat model, or it with the request's tools bound), the
        object that takes the routing decision, and the experts the router may pick."""
        if not body.tools or body.tool_choice == "none":
            return self.chat_model, self.chat_model, None if forced is None else [forced]
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
        return runnable, owner, allowed

    async def chat(self, request: Request) -> Any:
        from langchain_torouter._routing import messages_to_prompt, predecided

        self.check_auth(request)
        body = self.parse(await self.read_body(request))
        forced = self.forced_expert(body.model)
        messages = _to_langchain(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or self.limits.max_tokens
        kwargs: dict[str, Any] = {"max_tokens": max_tokens, "stop": body.stop}
        if body.temperature is not None:
            kwargs["temperature"] = body.temperature
        if forced is not None:
            kwargs["expert"] = forced
        runnable, owner, allowed = self.with_tools(body, forced)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            options = body.torouter or _RoutingOptions()
            decision = await self.router.decide(messages_to_prompt(messages), allowed,
                                                options.cost_weight, options.max_cost)
        except ValueError as exc:  # e.g. no user text to route on
            raise _APIError(400, f"Cannot route this request: {exc}", code="unroutable", param="messages") from None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self.stream(runnable, owner, messages, kwargs, decision, forced, request_id, include_usage)
        try:
            # The decision is already made: the chat model uses it instead of routing again.
            with predecided(owner, decision):
                message = await runnable.ainvoke(messages, **kwargs)
        except Exception as exc:  # noqa: BLE001 - an expert's failure, reported as 502
            raise self.expert_failure(exc, decision, request_id) from None
        routed = self.routing(message.response_metadata.get("torouter") or {})
        expert = routed.get("expert", decision.expert)
        logger.info("%s -> %s (chosen %s, fallback=%s, forced=%s)", request_id, expert, decision.expert,
                    routed.get("fallback"), forced is not None)
        reply: dict[str, Any] = {"role": "assistant", "content": message.text, "refusal": None}
        finish = _finish_reason(message.response_metadata) or "stop"
        if message.tool_calls:
            reply.update(content=message.text or None, tool_calls=_openai_tool_calls(message.tool_calls))
            finish = "tool_calls"
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": expert,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(message.usage_metadata),
            "torouter": routed,
        })

    async def stream(self, runnable: Any, owner: Any, messages: list[Any], kwargs: dict[str, Any], decision: Any,
                     forced: str | None, request_id: str, include_usage: bool) -> StreamingResponse:
        from langchain_torouter._routing import predecided

        chunks = runnable.astream(messages, **kwargs)
        # Pull the first chunk before answering, so a request every expert fails gets a
        # proper 502 rather than a stream that breaks off.
        try:
            with predecided(owner, decision):
                first = await anext(chunks, None)
        except Exception as exc:  # noqa: BLE001
            raise self.expert_failure(exc, decision, request_id) from None
        if first is not None and "torouter" in first.response_metadata:
            routed = self.routing(first.response_metadata["torouter"])
        else:
            routed = self.routing(decision.outcome(decision.expert, {}, forced is not None))
        expert = routed.get("expert", decision.expert)
        created = int(time.time())
        logger.info("%s -> %s (chosen %s, fallback=%s, forced=%s, stream)", request_id, expert, decision.expert,
                    routed.get("fallback"), forced is not None)

        def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": expert,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            if include_usage:
                data.setdefault("usage", None)
            return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

        async def events() -> AsyncIterator[str]:
            usage: dict[str, int] = {}
            finish = None
            called = False

            def absorb(chunk: Any) -> dict[str, Any]:
                nonlocal finish, called
                for key, value in (chunk.usage_metadata or {}).items():
                    if isinstance(value, int):
                        usage[key] = usage.get(key, 0) + value
                finish = _finish_reason(chunk.response_metadata) or finish
                delta: dict[str, Any] = {"content": chunk.text} if chunk.text else {}
                if getattr(chunk, "tool_call_chunks", None):
                    delta["tool_calls"] = _openai_tool_deltas(chunk.tool_call_chunks)
                    called = True
                return delta

            try:
                delta = absorb(first) if first is not None else {}
                yield event({"role": "assistant", "content": delta.pop("content", ""), **delta}, torouter=routed)
                async for chunk in chunks:
                    delta = absorb(chunk)
                    if delta:
                        yield event(delta)
                yield event({}, "tool_calls" if called else finish or "stop")
                if include_usage:
                    data = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                            "model": expert, "system_fingerprint": None, "choices": [], "usage": _usage(usage)}
                    yield f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
                logger.warning("%s: expert %s failed mid-stream: %s", request_id, expert,
                               self.redact(f"{type(exc).__name__}: {exc}"))
                error = _APIError(502, f"Expert {expert!r} failed while streaming.", type="upstream_error",
                                  code="expert_failed")
                yield f"data: {json.dumps(error.body())}\n\n"
            finally:
                await chunks.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(config_or_chat_model: Any, *, token: str | None = None, limits: Limits | None = None,
               name: str | None = None) -> FastAPI:
    """The FastAPI app serving a router as an OpenAI-compatible endpoint.

    ``config_or_chat_model`` is a config file path, a ``ServeConfig`` or a ready
    ``ChatTORouter``. ``token`` (bearer auth), ``limits`` and ``name`` override the
    config's; with a ``ChatTORouter`` they are the only settings. Raises
    ``ConfigError`` when the config cannot be built, before anything listens.
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
    service = _Service(chat_model, name, limits or Limits(), token, redactor)

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
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False,
                            timeout_graceful_shutdown=timeout_graceful_shutdown)
    uvicorn.Server(config).run()


__all__ = ["AuthConfig", "ConfigError", "ExpertConfig", "Limits", "ServeConfig", "build_chat_model",
           "create_app", "load_config", "run_server"]
