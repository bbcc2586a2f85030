"""The OpenAI chat completions protocol as this server speaks it.

Request shapes (strict: a wrong type is a client bug worth a 400, not a guess), the
JSON reading rules that keep bad numbers and lone UTF-16 surrogates out of the router,
errors in OpenAI's ``{"error": {...}}`` shape, conversion of OpenAI messages and tool
calls to LangChain's and back, and the server-sent events of a streamed answer.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_FINISH_REASONS = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "eos": "stop", "STOP": "stop",
    "length": "length", "max_tokens": "length", "MAX_TOKENS": "length",
    "tool_calls": "tool_calls", "tool_use": "tool_calls", "content_filter": "content_filter",
}
_MAX_INT_DIGITS = 64  # longer JSON integers are refused before Python converts them (quadratic in length)


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

    def event(self) -> str:
        """The error as a server-sent event, for a stream that has already started."""
        return f"data: {json.dumps(self.body())}\n\n"


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


def _to_langchain(messages: list[_Message]) -> list[Any]:
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


# --------------------------------------------------------------------------- streamed answers

_SSE_DONE = "data: [DONE]\n\n"
"""The event that ends a stream."""


def _sse(data: Mapping[str, Any]) -> str:
    """One server-sent event carrying ``data`` as compact JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chunk_event(request_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None, *,
                 include_usage: bool = False, **extra: Any) -> str:
    """A ``chat.completion.chunk`` event carrying one delta (with ``usage: null`` when the client asked for usage)."""
    data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
    if include_usage:
        data.setdefault("usage", None)
    return _sse(data)


def _usage_event(request_id: str, created: int, model: str, usage: Mapping[str, Any]) -> str:
    """The last chunk of a stream whose client asked for usage: no choices, the answer's token counts."""
    return _sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                 "system_fingerprint": None, "choices": [], "usage": _usage(usage)})
