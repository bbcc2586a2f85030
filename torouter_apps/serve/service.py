"""Request handling: one chat completion from the request's bytes to the expert's last token.

``_Service`` checks the bearer token, reads the body within its deadline and limits,
parses and validates it, routes it (batched with concurrent requests), then tries the
ranked experts in turn, each within its own deadline and all within the request's,
until one answers; streamed answers start only once an expert's first token has come.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from langchain_core.messages import AIMessage
from pydantic import ValidationError

from langchain_torouter import messages_to_prompt
from torouter.credentials import Redactor, StreamMasker

from .attempts import EmptyAnswer, ExpertTimeout, _Attempt, _ClientGone, _ClientWatch, _END, _has_output, _Overdue
from .batching import _RoutingBatcher
from .config import DEFAULT_NAME, ConfigError, Limits, Timeouts, _describe, _location
from .lanes import _Lane, _LoopExecutor, _LoopWatch, _Threads
from .protocol import (
    _SSE_DONE,
    _SURROGATE_ESCAPE,
    _APIError,
    _ChatRequest,
    _chunk_event,
    _finish_reason,
    _json_constant,
    _json_float,
    _json_int,
    _jsonable,
    _lone_surrogate,
    _NumberError,
    _openai_tool_calls,
    _openai_tool_deltas,
    _RoutingOptions,
    _to_langchain,
    _unsupported,
    _usage,
    _usage_event,
)

logger = logging.getLogger("torouter.serve")

_FAILURE_CHARS = 300


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
            capture = self.chat_model.capture
            if capture is not None and (body.stream or not capture.include_answers):
                capture.record(messages_to_prompt(messages), decision)  # the answer is recorded in reply
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
        attempt = _Attempt(self.lanes[name], plan.owner.expert_runnable(name), plan.messages, plan.config(name),
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
        capture = self.chat_model.capture
        if capture is not None and capture.include_answers:
            capture.record(messages_to_prompt(plan.messages), plan.decision, expert=name, answer=text)
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
            return _chunk_event(plan.request_id, created, expert, delta, finish, include_usage=include_usage, **extra)

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
                    if tail := masker.flush():  # what the expert did send reaches the client, masked
                        yield event({"content": tail})
                    yield error.event()
                    return
                if chunk is _END:
                    break
                if delta := absorb(chunk):
                    yield event(delta)
            if tail := masker.flush():
                yield event({"content": tail})
            yield event({}, "tool_calls" if called else finish or "stop")
            if include_usage:
                yield _usage_event(plan.request_id, created, expert, usage)
            yield _SSE_DONE
        except _ClientGone:
            logger.info("%s: the client went away mid-stream; expert %s was stopped", plan.request_id, expert)
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            logger.warning("%s: expert %s failed mid-stream: %s", plan.request_id, expert,
                           self.redact(f"{type(exc).__name__}: {exc}"))
            error = _APIError(502, f"Expert {expert!r} failed while streaming.", type="upstream_error",
                              code="expert_failed")
            if tail := masker.flush():
                yield event({"content": tail})
            yield error.event()
        finally:
            attempt.stop()
            watch.close()
