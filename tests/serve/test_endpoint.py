"""``torouter serve``: the OpenAI-compatible endpoint, driven by the real ``openai`` client.

Servers run on 127.0.0.1 on a free port, in a background thread (or, for the CLI, a
subprocess) started by each fixture, and every request loop here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import yaml  # noqa: E402
from langchain_core.messages import AIMessageChunk  # noqa: E402
from langchain_core.outputs import ChatGenerationChunk  # noqa: E402
from helpers.langchain_experts import trained_router  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from langchain_torouter import ChatRuleBased, ChatTORouter  # noqa: E402
from torouter.cli import app as cli_app  # noqa: E402
from torouter_apps.serve import ConfigError, Limits, ServeConfig, build_chat_model, create_app, load_config  # noqa: E402
from torouter.synthetic import EXPERTS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXPERT_NAMES = list(EXPERTS)
ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}
TOKEN = "tok-" + "5f1c9a7e2b4d4e0f8a6b3c2d1e0f9a8b"
LEAKY_KEY = "sk-live-0123456789abcdefXYZ"
LIMITS = Limits(max_request_bytes=4096, max_tokens=256, max_messages=8)


# --------------------------------------------------------------------------- helpers


class FlakyRuleBased(ChatRuleBased):
    """A rule-based expert that fails: at once (``fail``) or after two streamed tokens (``break``)."""

    mode: str = "fail"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        raise RuntimeError(f"upstream refused the request (key {LEAKY_KEY})")

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        if self.mode == "fail":
            raise RuntimeError(f"upstream refused the request (key {LEAKY_KEY})")
        for word in ("partial ", "answer "):
            yield ChatGenerationChunk(message=AIMessageChunk(content=word))
        raise ConnectionError("connection to the expert dropped")


STARTED = threading.Event()


class SlowRuleBased(ChatRuleBased):
    """A rule-based expert that takes ``delay`` seconds to answer and says when it started."""

    delay: float = 1.0

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        STARTED.set()
        await asyncio.sleep(self.delay)
        return self._generate(messages, stop=stop, **kwargs)


@contextlib.contextmanager
def live_server(app) -> Iterator[tuple[Any, str]]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; stop it gracefully on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the test server did not stop"


class Caller(threading.Thread):
    """Makes one chat completion in a thread; ``reply`` or ``error`` holds the outcome."""

    def __init__(self, base: str, model: str, question: str):
        super().__init__(daemon=True)
        self.base, self.model, self.question = base, model, question
        self.reply: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.reply = client_for(self.base).chat.completions.create(model=self.model, messages=ask(self.question))
        except Exception as exc:  # noqa: BLE001 - checked by the test
            self.error = exc

    def result(self, timeout: float = 20) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the request did not finish"
        assert self.error is None, repr(self.error)
        return self.reply


def client_for(base: str, key: str = TOKEN) -> Any:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def post(base: str, body: bytes | dict, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base}/v1/chat/completions", content=content, headers=headers, timeout=30)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chat() -> ChatTORouter:
    return ChatTORouter(experts={n: ChatRuleBased(model=n) for n in EXPERT_NAMES}, router=trained_router(),
                        cost_weight=50.0)


@pytest.fixture(scope="module")
def server(chat) -> Iterator[str]:
    with live_server(create_app(chat, token=TOKEN, limits=LIMITS)) as (_, base):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


@pytest.fixture(scope="module")
def flaky_server() -> Iterator[str]:
    """Only cloud-large works; med-7b fails at once, code-7b breaks off mid-stream."""
    experts = {"edge-small": FlakyRuleBased(model="edge-small"),
               "code-7b": FlakyRuleBased(model="code-7b", mode="break"),
               "med-7b": FlakyRuleBased(model="med-7b"),
               "cloud-large": ChatRuleBased(model="cloud-large")}
    chat = ChatTORouter(experts=experts, router=trained_router(), cost_weight=50.0)
    with live_server(create_app(chat, token=TOKEN)) as (_, base):
        yield base


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "router"
    trained_router().save(path)
    return path


# --------------------------------------------------------------------------- chat completions


def test_plain_completion_is_routed_like_the_chat_model(client, chat):
    questions = ["What is 12 times 7?", "What is the capital of Peru?",
                 "What is the mechanism of action of metformin?", "Write a Python function that reverses a string."]
    answered_by = set()
    for question in questions:
        reply = client.chat.completions.create(model="torouter", messages=ask(question))
        routed = reply.model_extra["torouter"]
        expected = chat.route(question).expert
        assert reply.model == routed["expert"] == routed["chosen"] == expected
        assert routed["ranking"][0] == expected and set(routed["ranking"]) == set(EXPERT_NAMES)
        assert set(routed["scores"]) == set(EXPERT_NAMES) and routed["cost_weight"] == 50.0
        assert routed["fallback"] is False and routed["failures"] == {} and routed["forced"] is False
        assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
        assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
        answered_by.add(reply.model)
    assert len(answered_by) >= 2  # the router really chooses, per question

    reply = client.chat.completions.create(model="torouter", messages=ask("What is 12 times 7?"))
    assert reply.choices[0].message.content == "The answer is 84."
    # ChatRuleBased counts one token per word: 5 in the question, 4 in the answer.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (5, 4, 9)


def test_router_name_and_forced_expert(client):
    reply = client.chat.completions.create(model="med-7b", messages=ask("What is 12 times 7?"))
    routed = reply.model_extra["torouter"]
    assert reply.model == "med-7b" and routed["forced"] is True and routed["ranking"] == ["med-7b"]
    assert reply.choices[0].message.content == "The answer is 84."


def test_request_overrides_cost_weight_and_max_cost(client, chat):
    controller = chat.controller
    questions = ["What is 12 times 7?", "What is the capital of Peru?",
                 "What is the mechanism of action of metformin?", "Write a Python function that reverses a string."]
    changed = 0
    for question in questions:
        reply = client.chat.completions.create(model="torouter", messages=ask(question),
                                               extra_body={"torouter": {"cost_weight": 0}})
        routed = reply.model_extra["torouter"]
        expected = controller.decide(question, cost_weight=0.0).expert
        assert routed["cost_weight"] == 0.0 and reply.model == routed["chosen"] == expected
        changed += expected != controller.decide(question).expert  # the server's own cost_weight is 50
    assert changed >= 1  # the override really changed where some question went

    costs = controller.router.expert_costs_
    cheapest = min(costs, key=costs.get)
    question = "What is the mechanism of action of metformin?"
    reply = client.chat.completions.create(model="torouter", messages=ask(question),
                                           extra_body={"torouter": {"cost_weight": 0, "max_cost": costs[cheapest]}})
    routed = reply.model_extra["torouter"]
    assert reply.model == cheapest and routed["max_cost"] == costs[cheapest] and routed["ranking"] == [cheapest]


def test_tool_calls_round_trip(client):
    question = ask("Use the add tool: what is 3 + 4?")
    reply = client.chat.completions.create(model="torouter", messages=question, tools=[ADD_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id
    assert json.loads(call.function.arguments) == {"a": 3, "b": 4}

    history = [*question, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "7"}]
    final = client.chat.completions.create(model="torouter", messages=history, tools=[ADD_TOOL])
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert final.choices[0].message.content == "The add tool returned: 7"

    forced = client.chat.completions.create(model="torouter", messages=ask("Hello"), tools=[ADD_TOOL],
                                            tool_choice={"type": "function", "function": {"name": "add"}})
    assert forced.choices[0].message.tool_calls[0].function.name == "add"
    plain = client.chat.completions.create(model="torouter", messages=question, tools=[ADD_TOOL], tool_choice="none")
    assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls


def test_tool_calls_stream_as_openai_deltas(client):
    chunks = list(client.chat.completions.create(model="torouter", messages=ask("add 1 and 2"), tools=[ADD_TOOL],
                                                 tool_choice="required", stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].id and deltas[0].function.name == "add"
    assert all(d.index == 0 for d in deltas)
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"a": 1, "b": 2}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "torouter" in chunks[0].model_extra


def test_tools_route_only_among_experts_that_take_them():
    experts = {n: ChatRuleBased(model=n, tool_calling=n == "cloud-large") for n in EXPERT_NAMES}
    chat = ChatTORouter(experts=experts, router=trained_router(), cost_weight=50.0)
    with live_server(create_app(chat, token=TOKEN)) as (_, base):
        client = client_for(base)
        reply = client.chat.completions.create(model="torouter", messages=ask("Use the add tool: 3 + 4?"),
                                               tools=[ADD_TOOL])
        assert reply.model == "cloud-large" and reply.model_extra["torouter"]["ranking"] == ["cloud-large"]
        assert reply.choices[0].message.tool_calls[0].function.name == "add"
        response = post(base, {"model": "edge-small", "messages": ask("3 + 4?"), "tools": [ADD_TOOL]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
        assert "edge-small" in response.json()["error"]["message"]
    no_tools = ChatTORouter(experts={n: ChatRuleBased(model=n, tool_calling=False) for n in EXPERT_NAMES},
                            router=trained_router())
    with live_server(create_app(no_tools, token=TOKEN)) as (_, base):
        response = post(base, {"model": "torouter", "messages": ask("3 + 4?"), "tools": [ADD_TOOL]})
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "unsupported_parameter" and error["param"] == "tools"
        assert "does not support tool calling" in error["message"]


def test_streaming_is_token_by_token_with_the_decision_first(client, chat):
    question = "What is the mechanism of action of metformin?"
    messages = [{"role": "system", "content": "Metformin lowers blood glucose mainly by reducing hepatic "
                                              "glucose production. It is cheap."},
                {"role": "user", "content": question}]
    plain = client.chat.completions.create(model="torouter", messages=messages)
    chunks = list(client.chat.completions.create(model="torouter", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    first, usage = chunks[0], chunks[-1]
    assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
    routed = first.model_extra["torouter"]
    assert routed["expert"] == plain.model == chat.route(messages).expert
    assert all(c.model == plain.model for c in chunks) and len({c.id for c in chunks}) == 1
    assert all("torouter" not in (c.model_extra or {}) for c in chunks[1:])
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 5  # one event per word, not one blob
    assert "".join(content) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.total_tokens == plain.usage.total_tokens


def test_stream_wire_format_ends_with_done(server):
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": "edge-small", "messages": ask("hello"), "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert payloads[0]["torouter"]["expert"] == "edge-small" and payloads[0]["torouter"]["forced"] is True
    assert {p["model"] for p in payloads} == {"edge-small"}
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads) == \
        "Hello! I am edge-small. How can I help you today?"


def test_conversation_content_parts_and_generation_options(client):
    messages = [
        {"role": "developer", "content": "Answer from the context."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": [
            {"type": "text", "text": "Context: Lima is the capital of Peru. Spanish is spoken in Peru."},
            {"type": "text", "text": "What is the capital of Peru?"}]},
    ]
    reply = client.chat.completions.create(model="torouter", messages=messages, temperature=0.2)
    assert reply.choices[0].message.content == "Context: Lima is the capital of Peru."
    short = client.chat.completions.create(model="torouter", messages=ask("What is 12 times 7?"), max_tokens=2)
    assert short.choices[0].message.content == "The answer " and short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 2
    newer = client.chat.completions.create(model="torouter", messages=ask("What is 12 times 7?"),
                                           max_completion_tokens=3)
    assert newer.usage.completion_tokens == 3
    stopped = client.chat.completions.create(model="torouter", messages=ask("What is 12 times 7?"), stop=["84"])
    assert stopped.choices[0].message.content == "The answer is "


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["torouter", *EXPERT_NAMES]
    assert models.data[0].owned_by == "torouter" and {m.owned_by for m in models.data[1:]} == {"torouter-expert"}
    assert client.models.retrieve("med-7b").id == "med-7b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_health_needs_no_token(server):
    response = httpx.get(f"{server}/health", timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# --------------------------------------------------------------------------- auth, bad requests, limits


def test_wrong_or_missing_token_is_401(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(server, key="not-the-token").chat.completions.create(model="torouter", messages=ask("hi"))
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client_for(server, key="not-the-token").models.list()
    for token in (None, TOKEN[:-1], TOKEN + "x"):
        response = post(server, {"model": "torouter", "messages": ask("hi")}, token=token)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"
        assert TOKEN not in response.text
    basic = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Basic {TOKEN}"}, timeout=10)
    assert basic.status_code == 401


@pytest.mark.parametrize("body, status, code, param", [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_request", None),
    (b"[" * 1500 + b"]" * 1500, 400, "invalid_json", None),
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_json", None),
    ({"model": "torouter"}, 400, "invalid_request", "messages"),
    ({"model": "torouter", "messages": []}, 400, "invalid_request", "messages"),
    ({"model": "torouter", "messages": "hi"}, 400, "invalid_request", "messages"),
    ({"model": "torouter", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_request",
     "messages.0.content"),
    ({"model": "torouter", "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request",
     "messages.0.role"),
    ({"model": "torouter", "messages": [{"content": "hi"}]}, 400, "invalid_request", "messages.0.role"),
    ({"model": "torouter", "messages": [{"role": "function", "content": "4", "name": "f"}]}, 400,
     "invalid_request", "messages.0.role"),
    ({"model": "torouter", "messages": [{"role": "tool", "content": "4"}]}, 400, "invalid_request", "messages.0"),
    ({"model": "torouter", "messages": [*ask("hi"), {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, 400,
     "invalid_request", "messages.1.tool_calls.0.function.arguments"),
    ({"model": "torouter", "messages": ask("hi"), "tools": [{"type": "function", "function": {"name": "a b"}}]},
     400, "invalid_request", "tools.0.function.name"),
    ({"model": "torouter", "messages": ask("hi"), "tools": [ADD_TOOL], "tool_choice": {
        "type": "function", "function": {"name": "mul"}}}, 400, "invalid_request", None),
    ({"model": "torouter", "messages": ask("hi"), "tool_choice": "required"}, 400, "invalid_request", None),
    ({"model": "torouter", "messages": ask("hi"), "stream": "yes"}, 400, "invalid_request", "stream"),
    ({"model": "torouter", "messages": ask("hi"), "temperature": 9}, 400, "invalid_request", "temperature"),
    ({"model": "torouter", "messages": ask("hi"), "max_tokens": "10"}, 400, "invalid_request", "max_tokens"),
    ({"model": "torouter", "messages": ask("hi"), "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request",
     "stop"),
    ({"messages": ask("hi")}, 400, "invalid_request", "model"),
    ({"model": "torouter", "messages": ask("hi"), "functions": [{"name": "f"}]}, 400, "unsupported_parameter",
     "functions"),
    ({"model": "torouter", "messages": ask("hi"), "n": 2}, 400, "unsupported_parameter", "n"),
    ({"model": "torouter", "messages": ask("hi"), "torouter": {"cost_weight": -1}}, 400, "invalid_request",
     "torouter.cost_weight"),
    ({"model": "torouter", "messages": ask("hi"), "torouter": {"cost_weight": "5"}}, 400, "invalid_request",
     "torouter.cost_weight"),
    ({"model": "torouter", "messages": ask("hi"), "torouter": {"costweight": 5}}, 400, "invalid_request",
     "torouter.costweight"),
    ({"model": "torouter", "messages": ask("hi"), "torouter": "cheap"}, 400, "invalid_request", "torouter"),
    ({"model": "gpt-4o", "messages": ask("hi")}, 404, "model_not_found", "model"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, code, param):
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in response.text


def test_unknown_model_through_the_client(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=ask("hi"))
    assert "torouter" in str(caught.value) and "med-7b" in str(caught.value)


def test_unknown_route_and_method_are_json(server):
    missing = httpx.get(f"{server}/v1/completions", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{server}/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_request_size_limit_is_413(client, server):
    big = "word " * 1000  # 5000 bytes > the 4096-byte limit
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="torouter", messages=ask(big))
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"
    # A chunked body (no Content-Length) is cut off at the limit as well.
    chunks = iter([b'{"model": "torouter", "messages": [{"role": "user", "content": "', b"x" * 5000, b'"}]}'])
    response = httpx.post(f"{server}/v1/chat/completions", content=chunks, timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 413


def test_max_tokens_and_message_limits_are_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="torouter", messages=ask("hi"), max_tokens=257)
    assert caught.value.code == "max_tokens_exceeded" and "256" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="torouter", messages=ask("hi"), max_completion_tokens=10_000)
    assert caught.value.code == "max_tokens_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="torouter", messages=ask("hi") * 9)
    assert caught.value.code == "too_many_messages"
    assert client.chat.completions.create(model="torouter", messages=ask("hi"), max_tokens=256).choices


# --------------------------------------------------------------------------- expert failures


def test_failed_expert_falls_back_to_the_next_in_the_ranking(flaky_server, chat):
    question = "What is the capital of Peru?"
    assert chat.route(question).expert == "edge-small"  # the cheap expert is the router's pick ...
    reply = client_for(flaky_server).chat.completions.create(model="torouter", messages=ask(question))
    routed = reply.model_extra["torouter"]
    assert reply.model == routed["expert"] == "cloud-large"  # ... but only cloud-large works
    assert routed["chosen"] == "edge-small" and routed["fallback"] is True
    assert set(routed["failures"]) == set(routed["ranking"][:routed["ranking"].index("cloud-large")])
    assert "upstream refused" in routed["failures"]["edge-small"]
    assert LEAKY_KEY not in json.dumps(routed)  # key-like strings are masked


@pytest.mark.parametrize("stream", [False, True])
def test_every_expert_failing_is_502_naming_each_failure(flaky_server, stream):
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(flaky_server).chat.completions.create(model="med-7b", messages=ask("hi"), stream=stream)
    error = caught.value
    assert error.status_code == 502 and error.code == "all_experts_failed"
    assert "med-7b: RuntimeError: upstream refused the request" in error.message
    assert LEAKY_KEY not in error.response.text and "Traceback" not in error.response.text


def test_expert_breaking_mid_stream_ends_the_stream_with_an_error(flaky_server):
    stream = client_for(flaky_server).chat.completions.create(model="code-7b", messages=ask("hi"), stream=True)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    # All the text sent before the break arrives (chunk boundaries may shift: the secret masker
    # holds back a tail as long as the longest secret the process knows, then releases it).
    assert "".join(text or "" for text in received) == "partial answer "
    assert "code-7b" in str(caught.value) and "dropped" not in str(caught.value)


def fresh_chat() -> ChatTORouter:
    """A chat model of its own, so a test may replace its controller's ``decide``."""
    return ChatTORouter(experts={n: ChatRuleBased(model=n) for n in EXPERT_NAMES}, router=trained_router())


def test_internal_errors_are_a_generic_500_with_the_detail_only_in_the_log(caplog):
    chat = fresh_chat()

    def broken(*args, **kwargs):
        raise RuntimeError(f"router state corrupted near {TOKEN}")

    chat.controller.decide_many = broken
    with live_server(create_app(chat, token=TOKEN)) as (_, base):
        with caplog.at_level("ERROR", logger="torouter.serve"):
            with pytest.raises(openai.InternalServerError) as caught:
                client_for(base).chat.completions.create(model="torouter", messages=ask("hi"))
    body = caught.value.response.json()
    assert body == {"error": {"message": "The server had an internal error while processing the request.",
                              "type": "server_error", "param": None, "code": "internal_error"}}
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "torouter.serve")
    assert "RuntimeError: router state corrupted" in logged and "Traceback" in logged
    assert TOKEN not in logged


def test_router_inference_does_not_block_the_event_loop():
    chat = fresh_chat()
    decide, entered, release = chat.controller.decide_many, threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(20)
        return decide(*args, **kwargs)

    chat.controller.decide_many = held  # router inference that takes as long as the test wants
    with live_server(create_app(chat, token=TOKEN)) as (_, base):
        caller = Caller(base, "torouter", "What is 3 plus 4?")
        caller.start()
        try:
            assert entered.wait(20)
            # While routing is stuck, the server still answers other requests.
            assert httpx.get(f"{base}/health", timeout=5).status_code == 200
            models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
            assert models.status_code == 200
        finally:
            release.set()
        assert caller.result().choices[0].message.content == "The answer is 7."


def test_concurrent_requests_share_one_router_call():
    routed = fresh_chat()
    decide, entered, release = routed.controller.decide_many, threading.Event(), threading.Event()
    batch_sizes: list[int] = []

    def counted(prompts, *args, **kwargs):
        batch_sizes.append(len(prompts))
        entered.set()
        assert release.wait(20)
        return decide(prompts, *args, **kwargs)

    routed.controller.decide_many = counted
    app = create_app(routed, token=TOKEN)
    questions = ["What is 3 plus 4?", "What is the capital of Peru?", "What is the mechanism of action of aspirin?",
                 "Write a Python function that reverses a string.", "Which continent is Kenya on?", "What is 9 x 9?"]
    with live_server(app) as (_, base):
        callers = [Caller(base, "torouter", question) for question in questions]
        callers[0].start()
        try:
            assert entered.wait(20)  # the first request is in the router ...
            for caller in callers[1:]:
                caller.start()
            for _ in range(400):  # ... while the others queue up behind it
                if len(app.state.torouter.router._pending) == len(questions) - 1:
                    break
                time.sleep(0.05)
        finally:
            release.set()
        replies = [caller.result() for caller in callers]
    assert batch_sizes == [1, len(questions) - 1]
    for i, question in enumerate(questions):
        assert replies[i].model == routed.route(question).expert
    assert replies[0].choices[0].message.content == "The answer is 7."
    assert replies[5].choices[0].message.content == "The answer is 81."


# --------------------------------------------------------------------------- shutdown


def test_graceful_shutdown_finishes_the_request_in_flight():
    experts = {n: ChatRuleBased(model=n) for n in EXPERT_NAMES}
    experts["med-7b"] = SlowRuleBased(model="med-7b", delay=1.0)
    app = create_app(ChatTORouter(experts=experts, router=trained_router()), token=TOKEN)
    STARTED.clear()
    with live_server(app) as (server, base):
        caller = Caller(base, "med-7b", "What is 2 plus 2?")
        caller.start()
        assert STARTED.wait(20), "the request never reached the expert"
        server.should_exit = True  # what SIGTERM/SIGINT do
        reply = caller.result()
    assert reply.choices[0].message.content == "The answer is 4." and reply.model == "med-7b"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=5)


# --------------------------------------------------------------------------- config files


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def rule_experts_config(**overrides: Any) -> dict[str, Any]:
    experts = {n: {"class": "langchain_torouter:ChatRuleBased", "kwargs": {"model": n}} for n in EXPERT_NAMES}
    experts.update(overrides)
    return experts


def test_example_config_builds_a_working_server(router_dir, monkeypatch):
    raw = yaml.safe_load((REPO / "examples" / "router.yaml").read_text())
    config = ServeConfig.model_validate({**raw, "router": str(router_dir)})
    assert config.auth.token_env == "TOROUTER_TOKEN" and config.limits.max_tokens == 4096
    monkeypatch.setenv("TOROUTER_TOKEN", TOKEN)
    with live_server(create_app(config)) as (_, base):
        reply = client_for(base).chat.completions.create(model="torouter", messages=ask("What is 12 times 7?"))
        assert reply.choices[0].message.content == "The answer is 84." and reply.model in EXPERT_NAMES
        assert post(base, {"model": "torouter", "messages": ask("hi")}, token="wrong").status_code == 401


def test_config_paths_env_vars_and_secrets(router_dir, tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    os.symlink(router_dir, tmp_path / "conf" / "trained")
    monkeypatch.setenv("MED_MODEL_NAME", "med-7b-v2")
    path = write_config(tmp_path / "conf" / "router.yaml", {
        "router": "trained",  # relative to the config file, not the working directory
        "experts": rule_experts_config(**{"med-7b": {"class": "langchain_torouter.ChatRuleBased",
                                                     "kwargs": {"model": "${MED_MODEL_NAME}"}}}),
        "cost_weight": 10, "route_on": "conversation", "fallbacks": False,
    })
    config = load_config(path)
    assert config.router == (tmp_path / "conf" / "trained").resolve()
    chat = build_chat_model(config)
    assert chat.experts["med-7b"].model_name == "med-7b-v2"
    assert (chat.cost_weight, chat.route_on, chat.fallbacks) == (10.0, "conversation", False)

    # A key written in the file is hidden in the config's repr and masked in build errors.
    secret = "literal-key-do-not-print-42"
    leaky = ServeConfig.model_validate({"router": str(router_dir), "experts": rule_experts_config(
        **{"med-7b": {"class": "langchain_torouter:ChatRuleBased", "kwargs": {"model": "m", "api_key": secret}}})})
    assert secret not in repr(leaky)
    with pytest.raises(ConfigError) as caught:
        build_chat_model(leaky)
    assert "experts.med-7b: could not build" in str(caught.value) and secret not in str(caught.value)
    # The same for a key read from the environment.
    monkeypatch.setenv("MED_CREDENTIAL_VALUE", secret)
    from_env = ServeConfig.model_validate({"router": str(router_dir), "experts": rule_experts_config(**{"med-7b": {
        "class": "langchain_torouter:ChatRuleBased", "kwargs": {"model": "m", "api_key": "${MED_CREDENTIAL_VALUE}"}}})})
    with pytest.raises(ConfigError) as caught:
        build_chat_model(from_env)
    assert "api_key" in str(caught.value) and secret not in str(caught.value) and "***" in str(caught.value)


@pytest.mark.parametrize("change, message", [
    ({"cost_weight": -1}, "cost_weight: Input should be greater than or equal to 0"),
    ({"route_on": "everything"}, "route_on"),
    ({"expert": {}}, "expert: Extra inputs are not permitted"),
    ({"limits": {"max_tokens": 0}}, "limits.max_tokens"),
    ({"auth": {"token_env": "not a name"}}, "auth.token_env"),
    ({"experts": {}}, "experts"),
    ({"experts": rule_experts_config(**{"med-7b": {"model": "openai:gpt-4o-mini", "class": "x:Y"}})},
     "experts.med-7b: give exactly one of model"),
    ({"experts": rule_experts_config(**{"med-7b": {"class": "no_such_module:Chat"}})},
     "experts.med-7b.class: cannot import 'no_such_module:Chat'"),
    ({"experts": rule_experts_config(**{"med-7b": {"class": "collections:OrderedDict"}})},
     "experts.med-7b: collections:OrderedDict built a OrderedDict, not a LangChain chat model"),
    ({"experts": rule_experts_config(**{"med-7b": {"class": "langchain_torouter:ChatRuleBased",
                                                   "kwargs": {"model": "${TOROUTER_TEST_UNSET}"}}})},
     "experts.med-7b.kwargs.model: environment variable TOROUTER_TEST_UNSET is not set"),
    ({"experts": {n: {"class": "langchain_torouter:ChatRuleBased"} for n in EXPERT_NAMES[:3]}},
     "experts: expert names do not match"),
    ({"experts": rule_experts_config(torouter={"class": "langchain_torouter:ChatRuleBased"})},
     "is the router's own model id"),
    ({"router": "missing-router"}, "router: no saved router at"),
    ({"router": "."}, "missing torouter.json; is this a saved router?"),
    ({"auth": {"token_env": "TOROUTER_TEST_UNSET"}}, "auth.token_env: environment variable TOROUTER_TEST_UNSET"),
])
def test_bad_configs_name_the_field(router_dir, tmp_path, monkeypatch, change, message):
    monkeypatch.delenv("TOROUTER_TEST_UNSET", raising=False)
    path = write_config(tmp_path / "router.yaml",
                        {"router": str(router_dir), "experts": rule_experts_config(), **change})
    with pytest.raises(ConfigError) as caught:
        create_app(path)
    assert message in str(caught.value)


def test_model_strings_need_langchain(router_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "langchain", None)  # as if `langchain` were not installed
    monkeypatch.setitem(sys.modules, "langchain.chat_models", None)
    path = write_config(tmp_path / "router.yaml", {"router": str(router_dir), "experts": rule_experts_config(
        **{"cloud-large": {"model": "openai:gpt-4o-mini", "kwargs": {"api_key": "${OPENAI_API_KEY}"}}})})
    monkeypatch.setenv("OPENAI_API_KEY", LEAKY_KEY)
    with pytest.raises(ConfigError) as caught:
        build_chat_model(path)
    assert "experts.cloud-large.model" in str(caught.value) and "pip install langchain" in str(caught.value)


@pytest.mark.parametrize("text, message", [
    ("router: [unclosed", "invalid YAML"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_unreadable_configs(tmp_path, text, message):
    path = tmp_path / "router.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_create_app_refuses_an_empty_token_and_other_objects(chat):
    with pytest.raises(ConfigError, match="empty bearer token"):
        create_app(chat, token=" ")
    with pytest.raises(TypeError, match="ChatTORouter"):
        create_app(42)


def test_cli_reports_a_bad_config_without_starting(router_dir, tmp_path):
    path = write_config(tmp_path / "router.yaml",
                        {"router": str(router_dir), "experts": rule_experts_config(), "cost_weight": "high"})
    result = CliRunner().invoke(cli_app, ["serve", "--config", str(path)])
    assert result.exit_code == 2 and "cost_weight" in result.output


# --------------------------------------------------------------------------- the CLI server


SLOW_MODULE = '''
import asyncio, os
from langchain_torouter import ChatRuleBased

class SlowRuleBased(ChatRuleBased):
    delay: float = 1.5

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        open(os.environ["TOROUTER_TEST_MARKER"], "w").close()
        await asyncio.sleep(self.delay)
        return self._generate(messages, stop=stop, **kwargs)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cli_serves_and_drains_in_flight_requests_on_sigterm(router_dir, tmp_path):
    (tmp_path / "slow_experts.py").write_text(SLOW_MODULE)
    marker = tmp_path / "started"
    path = write_config(tmp_path / "router.yaml", {
        "router": str(router_dir), "auth": {"token_env": "TOROUTER_TEST_TOKEN"},
        "experts": rule_experts_config(**{"med-7b": {"class": "slow_experts:SlowRuleBased",
                                                     "kwargs": {"model": "med-7b"}}})})
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "shared"), str(REPO)]),
           "TOROUTER_TEST_TOKEN": TOKEN, "TOROUTER_TEST_MARKER": str(marker), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "torouter.cli", "serve", "--config", str(path), "--port",
                                str(port), "--log-level", "warning"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 60 s for imports and loading the router
            assert process.poll() is None, process.communicate()[0]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("torouter serve did not come up")
        caller = Caller(base, "med-7b", "What is 6 times 7?")
        caller.start()
        for _ in range(200):
            if marker.exists():
                break
            time.sleep(0.05)
        assert marker.exists(), "the request never reached the expert"
        process.send_signal(signal.SIGTERM)
        reply = caller.result(30)
        output = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert reply.choices[0].message.content == "The answer is 42." and reply.model == "med-7b"
    assert process.returncode in (0, -signal.SIGTERM), output
    assert TOKEN not in output and "Traceback" not in output


# --- experts from a prepare manifest ----------------------------------------------------------

def test_manifest_experts_are_served(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from torouter.data import Record, RoutingDataset
    from torouter.routers import make_router
    from torouter_apps.serve import create_app, load_config

    (tmp_path / "serve_manifest_experts.py").write_text(
        "def arithmetic(prompt):\n    return {'text': '8', 'input_tokens': 5, 'output_tokens': 1}\n"
        "def prose(prompt):\n    return 'a long explanation'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "experts.yaml").write_text(
        "experts:\n"
        "  - {name: arith, tier: edge, python: {callable: 'serve_manifest_experts:arithmetic'}, price: {per_call: 0.001}}\n"
        "  - {name: prose, tier: cloud, python: {callable: 'serve_manifest_experts:prose'}, price: {per_call: 0.01}}\n")
    records = [Record(f"r{i}", q, {"arith": {"score": float(a), "cost": 0.001}, "prose": {"score": float(not a), "cost": 0.01}})
               for i, (q, a) in enumerate([("What is 3 + 5?", True), ("What is 9 - 2?", True),
                                           ("Explain how tides form.", False), ("Explain inflation.", False)])]
    make_router("knn", k=1).fit(RoutingDataset(records)).save(tmp_path / "router")
    (tmp_path / "router.yaml").write_text("router: router\nmanifest: experts.yaml\n")
    client = TestClient(create_app(load_config(tmp_path / "router.yaml")))
    reply = client.post("/v1/chat/completions", json={"model": "torouter",
                                                      "messages": [{"role": "user", "content": "What is 4 + 4?"}]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "arith" and body["choices"][0]["message"]["content"] == "8"
    assert body["torouter"]["expert"] == "arith"
    assert body["usage"]["prompt_tokens"] == 5


def test_config_needs_experts_or_manifest(tmp_path):
    from torouter_apps.serve import ConfigError, load_config

    (tmp_path / "router.yaml").write_text("router: router\n")
    with pytest.raises(ConfigError, match="experts: .* or manifest:"):
        load_config(tmp_path / "router.yaml")


def test_requests_without_user_text_are_answered(server):
    # A system-only request routes on the system text instead of failing.
    response = post(server, {"model": "torouter", "messages": [{"role": "system", "content": "Be brief."}]})
    assert response.status_code == 200, response.text
    assert response.json()["torouter"]["expert"] in response.json()["torouter"]["ranking"]
