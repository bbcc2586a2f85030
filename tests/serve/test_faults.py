"""``torouter serve`` under faults: bad input, hung or slow experts, clients that go away, slow sockets.

Every server here runs on 127.0.0.1 (a free port) in a thread; every expert that blocks
waits on an event the test sets at teardown, and every client call has a timeout, so a
regression fails a test instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult  # noqa: E402
from helpers.langchain_experts import trained_router  # noqa: E402

from langchain_torouter import ChatRuleBased, ChatTORouter  # noqa: E402
from torouter_apps.serve import ConfigError, Limits, ServeConfig, Timeouts, create_app, server_config  # noqa: E402
from torouter.synthetic import EXPERTS  # noqa: E402

EXPERT_NAMES = list(EXPERTS)
TOKEN = "tok-" + "0b9d3c1e7f2a4b6c8d0e1f2a3b4c5d6e"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = "What is 12 times 7?"
ANSWER = "The answer is 84."
FAST = Timeouts(expert_s=0.6, request_s=3.0, read_s=0.8, keep_alive_s=5.0)

RELEASE = threading.Event()  # set at teardown: every blocked expert thread then returns
CALLS: dict[str, dict[str, int]] = {}  # expert name -> {"started", "cancelled", "finished"}


@pytest.fixture(autouse=True)
def _release_blocked_threads() -> Iterator[None]:
    RELEASE.clear()
    CALLS.clear()
    yield
    RELEASE.set()


def count(name: str, what: str) -> None:
    CALLS.setdefault(name, {"started": 0, "cancelled": 0, "finished": 0})[what] += 1


# --------------------------------------------------------------------------- experts with faults


class Hanging(ChatRuleBased):
    """An async expert that never answers (until cancelled), plain or streamed."""

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        count(self.model_name, "started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            count(self.model_name, "cancelled")
            raise

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        await self._agenerate(messages)
        yield ChatGenerationChunk(message=AIMessageChunk(content="never"))


class SlowAsync(ChatRuleBased):
    """An async expert that answers after ``delay`` seconds; counts calls cancelled on the way."""

    delay: float = 5.0

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        count(self.model_name, "started")
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            count(self.model_name, "cancelled")
            raise
        count(self.model_name, "finished")
        return self._generate(messages, stop=stop, **kwargs)

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        count(self.model_name, "started")
        try:
            yield ChatGenerationChunk(message=AIMessageChunk(content="thinking "))
            await asyncio.sleep(self.delay)
        except (asyncio.CancelledError, GeneratorExit):
            count(self.model_name, "cancelled")
            raise
        count(self.model_name, "finished")
        yield ChatGenerationChunk(message=AIMessageChunk(content="done"))


class StallsAfterFirstToken(ChatRuleBased):
    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        yield ChatGenerationChunk(message=AIMessageChunk(content="first "))
        await asyncio.Event().wait()


class SyncOnly(BaseChatModel):
    """A blocking (sync-only) expert: each call holds a thread for ``delay`` seconds, or until released."""

    label: str = "sync"
    delay: float = 30.0

    @property
    def _llm_type(self) -> str:
        return "sync-only"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        count(self.label, "started")
        RELEASE.wait(self.delay)
        count(self.label, "finished")
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=f"{self.label} answered"))])


class BlocksTheLoop(ChatRuleBased):
    """An expert whose ``async def`` runs its blocking code inline: it never yields to the event loop."""

    block: float = 2.0

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        count(self.model_name, "started")
        time.sleep(self.block)
        return super()._generate(messages, stop=stop, **kwargs)

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        return self._generate(messages, stop=stop, **kwargs)

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        result = await self._agenerate(messages, stop=stop, **kwargs)
        yield ChatGenerationChunk(message=AIMessageChunk(content=result.generations[0].message.content))


class CannotStream(ChatRuleBased):
    """An expert without a streaming API: LangChain's ``astream`` yields its whole ``AIMessage``."""

    _stream = BaseChatModel._stream
    _astream = BaseChatModel._astream


class Empty(ChatRuleBased):
    """An expert that answers with nothing, plain or streamed."""

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        count(self.model_name, "started")
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=""))])

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        count(self.model_name, "started")
        yield ChatGenerationChunk(message=AIMessageChunk(content=""))


# --------------------------------------------------------------------------- helpers


def ranking(question: str = QUESTION, cost_weight: float = 50.0) -> list[str]:
    chat = ChatTORouter(experts={n: ChatRuleBased(model=n) for n in EXPERT_NAMES}, router=trained_router(),
                        cost_weight=cost_weight)
    return chat.route(question).ranking


def router_with(cost_weight: float = 50.0, **replaced: BaseChatModel) -> ChatTORouter:
    experts: dict[str, BaseChatModel] = {n: ChatRuleBased(model=n) for n in EXPERT_NAMES}
    experts.update(replaced)
    return ChatTORouter(experts=experts, router=trained_router(), cost_weight=cost_weight)


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """``app`` on 127.0.0.1 with the server settings ``torouter serve`` uses; stopped on exit."""
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=0, log_level="warning",
                                          timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        RELEASE.set()
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the test server did not stop"


def ask(text: str = QUESTION) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def post(base: str, body: dict | bytes, timeout: float = 20) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base}/v1/chat/completions", content=content, timeout=timeout,
                      headers={**HEADERS, "Content-Type": "application/json"})


def stream_events(base: str, body: dict, timeout: float = 20) -> tuple[int, list[Any]]:
    """Status and the decoded ``data:`` events of a streamed request (``[DONE]`` kept as a string)."""
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, headers=HEADERS,
                      timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, [response.json()]
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return 200, [e if e == "[DONE]" else json.loads(e) for e in events]


def text_of(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --------------------------------------------------------------------------- bad input is a 400


@pytest.fixture(scope="module")
def healthy() -> Iterator[str]:
    with serving(create_app(router_with(), token=TOKEN)) as base:
        yield base


@pytest.mark.parametrize("raw, where", [
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
     "messages.0.content"),
    (b'{"model": "torouter", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages.0.content.0.text"),
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], "user": "\\udc00"}', "user"),
])
def test_lone_surrogates_are_400_naming_the_field(healthy, raw, where):
    response = post(healthy, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == where
    assert "surrogate" in error["message"] and where in error["message"]


def test_a_valid_surrogate_pair_is_accepted(healthy):
    response = post(healthy, b'{"model": "torouter", "messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}]}')
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("raw, message", [
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
     "5000 digits"),
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], "seed": -' + b"1" * 400 + b"}",
     "400 digits"),
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], "torouter": {"cost_weight": Infinity}}',
     "Infinity"),
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], "torouter": {"cost_weight": NaN}}',
     "NaN"),
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], "torouter": {"max_cost": -Infinity}}',
     "-Infinity"),
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], "torouter": {"cost_weight": 1e999}}',
     "1e999"),
    (b'{"model": "torouter", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', "1e400"),
])
def test_numbers_json_cannot_carry_are_400(healthy, raw, message):
    response = post(healthy, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and message in error["message"]


def test_a_lone_surrogate_among_concurrent_requests_fails_alone(healthy):
    async def run() -> tuple[list[int], int]:
        async with httpx.AsyncClient(base_url=healthy, headers=HEADERS, timeout=60) as client:
            valid = [client.post("/v1/chat/completions",
                                 json={"model": "torouter", "messages": ask(f"What is {i} plus 2?")})
                     for i in range(30)]
            bad = client.post("/v1/chat/completions", headers={"Content-Type": "application/json"},
                              content=b'{"model": "torouter", "messages": [{"role": "user", "content": "\\ud800"}]}')
            *answers, poisoned = await asyncio.gather(*valid, bad)
        return [a.status_code for a in answers], poisoned.status_code

    statuses, poisoned = asyncio.run(run())
    assert statuses == [200] * 30 and poisoned == 400


def test_a_prompt_that_breaks_the_router_fails_alone_not_its_batch():
    """A router that raises on one prompt of a batch (input no validation foresaw) fails only that request."""
    chat = router_with()
    decide, entered, release = chat.controller.decide_many, threading.Event(), threading.Event()
    batch_sizes: list[int] = []

    def choking(prompts, *args, **kwargs):
        batch_sizes.append(len(prompts))
        if len(batch_sizes) == 1:  # hold the first call, so everything else queues into one batch
            entered.set()
            assert release.wait(20)
        if any("POISON" in str(p) for p in prompts):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return decide(prompts, *args, **kwargs)

    chat.controller.decide_many = choking
    app = create_app(chat, token=TOKEN)

    async def run(base: str) -> tuple[list[int], int]:
        async with httpx.AsyncClient(base_url=base, headers=HEADERS, timeout=60) as client:
            first = asyncio.create_task(client.post("/v1/chat/completions",
                                                    json={"model": "torouter", "messages": ask("hi")}))
            await asyncio.to_thread(entered.wait, 20)
            rest = [asyncio.create_task(client.post("/v1/chat/completions", json={
                "model": "torouter", "messages": ask(f"What is {i} times 3?")})) for i in range(20)]
            poison = asyncio.create_task(client.post("/v1/chat/completions", json={
                "model": "torouter", "messages": ask("POISON")}))
            router = app.state.torouter.router
            for _ in range(400):
                if len(router._pending) == 21:
                    break
                await asyncio.sleep(0.02)
            release.set()
            answers = await asyncio.gather(first, *rest)
            return [a.status_code for a in answers], (await poison).status_code

    with serving(app) as base:
        statuses, poisoned = asyncio.run(run(base))
    assert batch_sizes[:2] == [1, 21]  # the poisoned prompt really shared a batch with 20 others
    assert statuses == [200] * 21 and poisoned == 500


# --------------------------------------------------------------------------- deadlines and fallbacks


@pytest.mark.parametrize("stream", [False, True])
def test_a_hung_expert_ranked_first_times_out_and_the_next_answers(stream):
    order = ranking()
    chat = router_with(**{order[0]: Hanging(model=order[0])})
    with serving(create_app(chat, token=TOKEN, timeouts=FAST)) as base:
        start = time.monotonic()
        if stream:
            status, events = stream_events(base, {"model": "torouter", "messages": ask()})
            assert status == 200 and events[-1] == "[DONE]"
            routed, model = events[0]["torouter"], events[0]["model"]
            assert text_of(events) == ANSWER
        else:
            response = post(base, {"model": "torouter", "messages": ask()})
            assert response.status_code == 200, response.text
            routed, model = response.json()["torouter"], response.json()["model"]
        elapsed = time.monotonic() - start
    assert model == order[1] and routed["chosen"] == order[0] and routed["fallback"] is True
    assert "ExpertTimeout" in routed["failures"][order[0]] and "0.6 s" in routed["failures"][order[0]]
    assert 0.5 < elapsed < 2.5
    assert wait_for(lambda: CALLS[order[0]]["cancelled"] == 1)  # the hung call was cancelled, not left behind


def test_a_hung_sync_expert_times_out_and_the_next_answers():
    order = ranking()
    chat = router_with(**{order[0]: SyncOnly(label=order[0])})
    with serving(create_app(chat, token=TOKEN, timeouts=FAST)) as base:
        start = time.monotonic()
        response = post(base, {"model": "torouter", "messages": ask()})
        elapsed = time.monotonic() - start
    assert response.status_code == 200 and response.json()["model"] == order[1]
    assert 0.5 < elapsed < 2.5


class OwnTimeout(ChatRuleBased):
    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        raise TimeoutError("the provider timed out")


def test_an_experts_own_timeout_error_is_reported_as_it_is():
    order = ranking()
    chat = router_with(**{order[0]: OwnTimeout(model=order[0])})
    with serving(create_app(chat, token=TOKEN, timeouts=FAST)) as base:
        start = time.monotonic()
        response = post(base, {"model": "torouter", "messages": ask()})
        elapsed = time.monotonic() - start
    routed = response.json()["torouter"]
    assert response.status_code == 200 and response.json()["model"] == order[1]
    assert routed["failures"][order[0]] == "TimeoutError: the provider timed out" and elapsed < 0.5


def test_per_expert_deadlines_override_the_default():
    order = ranking()
    chat = router_with(**{order[0]: SlowAsync(model=order[0], delay=1.0)})
    timeouts = FAST.model_copy(update={"experts": {order[0]: 2.0}})
    with serving(create_app(chat, token=TOKEN, timeouts=timeouts)) as base:
        response = post(base, {"model": "torouter", "messages": ask()})
    assert response.status_code == 200 and response.json()["model"] == order[0]  # 1 s > 0.6 s, < its own 2 s


@pytest.mark.parametrize("stream", [False, True])
def test_the_request_deadline_is_a_504_when_no_expert_answers(stream):
    chat = router_with(**{n: Hanging(model=n) for n in EXPERT_NAMES})
    timeouts = Timeouts(expert_s=0.7, request_s=1.5)
    with serving(create_app(chat, token=TOKEN, timeouts=timeouts)) as base:
        start = time.monotonic()
        if stream:
            status, events = stream_events(base, {"model": "torouter", "messages": ask()})
            error = events[0]["error"]
        else:
            response = post(base, {"model": "torouter", "messages": ask()})
            status, error = response.status_code, response.json()["error"]
        elapsed = time.monotonic() - start
    assert status == 504 and error["code"] == "deadline_exceeded"
    assert "1.5 s" in error["message"] and "ExpertTimeout" in error["message"]
    assert 1.3 < elapsed < 3.0
    assert wait_for(lambda: sum(c["cancelled"] for c in CALLS.values()) == sum(c["started"] for c in CALLS.values()))


def test_a_stream_that_stalls_after_its_first_token_ends_with_an_error_event():
    chat = router_with(**{"med-7b": StallsAfterFirstToken(model="med-7b")})
    with serving(create_app(chat, token=TOKEN, timeouts=FAST)) as base:
        start = time.monotonic()
        status, events = stream_events(base, {"model": "med-7b", "messages": ask()})
        elapsed = time.monotonic() - start
    assert status == 200 and text_of(events) == "first "
    error = events[-1]["error"]
    assert error["code"] == "expert_timeout" and "med-7b" in error["message"] and "0.6 s" in error["message"]
    assert 0.5 < elapsed < 2.5


def test_timeouts_in_the_config_file_are_validated():
    base = {"router": "r", "experts": {"a": {"class": "x:Y"}}}
    config = ServeConfig.model_validate({**base, "timeouts": {"request_s": 30, "expert_s": 5,
                                                              "experts": {"a": 10}}})
    assert (config.timeouts.request_s, config.timeouts.expert_s, config.timeouts.experts) == (30, 5, {"a": 10})
    assert ServeConfig.model_validate(base).timeouts == Timeouts()
    for bad in ({"expert_s": 0}, {"request_s": -1}, {"read_s": float("inf")}, {"expert_s": "fast"},
                {"request_s": 10, "expert_s": 20}, {"experts": {"a": 0}}, {"deadline": 3}):
        with pytest.raises(ValueError, match="timeouts"):
            ServeConfig.model_validate({**base, "timeouts": bad})
    with pytest.raises(ValueError, match="cost_weight"):
        ServeConfig.model_validate({**base, "cost_weight": float("inf")})


def test_deadlines_for_unknown_experts_are_a_config_error():
    with pytest.raises(ConfigError, match="timeouts.experts: .*'gpt-9'"):
        create_app(router_with(), timeouts=Timeouts(experts={"gpt-9": 5.0}))


# --------------------------------------------------------------------------- clients that go away


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_gives_up_cancels_the_expert_call(stream):
    chat = router_with(**{"med-7b": SlowAsync(model="med-7b", delay=20.0)})
    service_app = create_app(chat, token=TOKEN, timeouts=Timeouts(expert_s=30, request_s=60))
    with serving(service_app) as base:
        for _ in range(5):
            with pytest.raises(httpx.ReadTimeout):
                with httpx.stream("POST", f"{base}/v1/chat/completions", headers=HEADERS, timeout=0.5,
                                  json={"model": "med-7b", "messages": ask(), "stream": stream}) as response:
                    for _ in response.iter_lines():
                        pass
        assert wait_for(lambda: CALLS.get("med-7b", {}).get("cancelled") == 5, timeout=5), CALLS
        assert CALLS["med-7b"]["started"] == 5 and CALLS["med-7b"]["finished"] == 0
        live = service_app.state.torouter.live_calls
        assert wait_for(lambda: live() == 0, timeout=5)


# --------------------------------------------------------------------------- capacity per expert


def test_slow_sync_experts_do_not_starve_routing_or_other_experts():
    """Twelve calls holding a blocking expert's threads leave routing and an async expert untouched."""
    chat = router_with(**{"med-7b": SyncOnly(label="med-7b", delay=6.0)})
    with serving(create_app(chat, token=TOKEN, timeouts=Timeouts(expert_s=10, request_s=20))) as base:
        blocked = [threading.Thread(target=post, args=(base, {"model": "med-7b", "messages": ask()}), daemon=True)
                   for _ in range(12)]
        for thread in blocked:
            thread.start()
        assert wait_for(lambda: CALLS.get("med-7b", {}).get("started", 0) >= 6, timeout=10)
        start = time.monotonic()
        response = post(base, {"model": "edge-small", "messages": ask("What is 2 plus 2?")})
        elapsed = time.monotonic() - start
        RELEASE.set()
        for thread in blocked:
            thread.join(20)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "The answer is 4."
    assert elapsed < 2.0, f"a request to a healthy expert waited {elapsed:.1f} s behind a blocking one"


def test_an_expert_that_blocks_the_event_loop_does_not_freeze_health():
    chat = router_with(**{"med-7b": BlocksTheLoop(model="med-7b", block=2.0)})
    with serving(create_app(chat, token=TOKEN, threaded=["med-7b"])) as base:
        caller = threading.Thread(target=post, args=(base, {"model": "med-7b", "messages": ask()}), daemon=True)
        caller.start()
        assert wait_for(lambda: CALLS.get("med-7b", {}).get("started") == 1)
        start = time.monotonic()
        health = httpx.get(f"{base}/health", timeout=5)
        elapsed = time.monotonic() - start
        caller.join(10)
    assert health.status_code == 200 and elapsed < 0.5


def test_an_async_expert_that_blocks_the_loop_is_moved_to_its_own_threads(caplog):
    chat = router_with(**{"med-7b": BlocksTheLoop(model="med-7b", block=1.5)})
    app = create_app(chat, token=TOKEN)
    with serving(app) as base, caplog.at_level("WARNING", logger="torouter.serve"):
        assert post(base, {"model": "med-7b", "messages": ask("What is 1 plus 1?")}).status_code == 200
        caller = threading.Thread(target=post, args=(base, {"model": "med-7b", "messages": ask()}), daemon=True)
        caller.start()
        assert wait_for(lambda: CALLS["med-7b"]["started"] == 2)
        start = time.monotonic()
        health = httpx.get(f"{base}/health", timeout=5)
        elapsed = time.monotonic() - start
        caller.join(10)
    assert health.status_code == 200 and elapsed < 0.4
    assert any("med-7b" in r.getMessage() and "blocked the event loop" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- streaming and empty answers


def test_streaming_from_an_expert_that_cannot_stream_sends_its_whole_answer():
    chat = router_with(**{"med-7b": CannotStream(model="med-7b")})
    with serving(create_app(chat, token=TOKEN)) as base:
        status, events = stream_events(base, {"model": "med-7b", "messages": ask("What is 12 times 7?")})
        plain = post(base, {"model": "med-7b", "messages": ask("What is 12 times 7?")}).json()
    assert status == 200 and events[-1] == "[DONE]"
    assert events[0]["model"] == "med-7b" and events[0]["torouter"]["expert"] == "med-7b"
    assert text_of(events) == plain["choices"][0]["message"]["content"] == "The answer is 84."
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_tool_calls_from_an_expert_that_cannot_stream_arrive_as_deltas():
    chat = router_with(**{n: CannotStream(model=n) for n in EXPERT_NAMES})
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "number"}, "b": {"type": "number"}}}}}
    with serving(create_app(chat, token=TOKEN)) as base:
        status, events = stream_events(base, {"model": "torouter", "messages": ask("add 1 and 2"), "tools": [tool],
                                              "tool_choice": "required"})
    deltas = [d for e in events if isinstance(e, dict) and e.get("choices")
              for d in e["choices"][0]["delta"].get("tool_calls") or []]
    assert status == 200 and deltas[0]["function"]["name"] == "add"
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"a": 1, "b": 2}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_answer_falls_back_plain_and_streamed(stream):
    order = ranking()
    chat = router_with(**{order[0]: Empty(model=order[0])})
    with serving(create_app(chat, token=TOKEN)) as base:
        if stream:
            status, events = stream_events(base, {"model": "torouter", "messages": ask()})
            model, routed, text = events[0]["model"], events[0]["torouter"], text_of(events)
        else:
            response = post(base, {"model": "torouter", "messages": ask()})
            status, body = response.status_code, response.json()
            model, routed, text = body["model"], body["torouter"], body["choices"][0]["message"]["content"]
    assert status == 200 and model == order[1] and text == ANSWER
    assert "EmptyAnswer" in routed["failures"][order[0]] and CALLS[order[0]]["started"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_answer_from_the_only_expert_is_a_502(stream):
    chat = router_with(**{"med-7b": Empty(model="med-7b")})
    with serving(create_app(chat, token=TOKEN)) as base:
        if stream:
            status, events = stream_events(base, {"model": "med-7b", "messages": ask()})
            error = events[0]["error"]
        else:
            response = post(base, {"model": "med-7b", "messages": ask()})
            status, error = response.status_code, response.json()["error"]
    assert status == 502 and error["code"] == "all_experts_failed" and "med-7b: EmptyAnswer" in error["message"]


# --------------------------------------------------------------------------- slow and silent connections


def open_socket(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when that happened."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {limit} s; got {data[:200]!r}")
    return data, time.monotonic() - start


def test_connections_that_never_finish_their_request_are_closed():
    with serving(create_app(router_with(), token=TOKEN, timeouts=FAST)) as base:
        silent, partial_head, no_body, unauthenticated = (open_socket(base) for _ in range(4))
        partial_head.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        no_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                        + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        unauthenticated.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        results = {name: read_until_closed(sock, 4.0) for name, sock in
                   [("silent", silent), ("partial_head", partial_head), ("no_body", no_body),
                    ("unauthenticated", unauthenticated)]}
        for sock in (silent, partial_head, no_body, unauthenticated):
            sock.close()
    assert results["silent"][0] == b"" and results["partial_head"][0] == b""
    assert results["no_body"][0].startswith(b"HTTP/1.1 408") and b"request_timeout" in results["no_body"][0]
    assert results["unauthenticated"][0].startswith(b"HTTP/1.1 401")
    assert results["unauthenticated"][1] < 0.5  # answered and closed at once, without waiting for the body
    assert all(elapsed < 2.5 for _, elapsed in results.values())


def test_a_body_sent_too_slowly_is_a_408():
    with serving(create_app(router_with(), token=TOKEN, timeouts=FAST)) as base:
        def dribble() -> Iterator[bytes]:
            yield b'{"model": "torouter", '
            time.sleep(1.5)
            yield b'"messages": [{"role": "user", "content": "hi"}]}'

        response = httpx.post(f"{base}/v1/chat/completions", content=dribble(), timeout=10,
                              headers={**HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 408 and response.json()["error"]["code"] == "request_timeout"


def test_connection_and_expert_limits_come_from_the_config():
    limits = Limits(max_connections=7, expert_concurrency=3, expert_threads=2)
    app = create_app(router_with(), token=TOKEN, limits=limits, timeouts=FAST)
    config = server_config(app, host="127.0.0.1", port=0)
    assert config.limit_concurrency == 7 and config.timeout_keep_alive == 5.0
    with serving(app) as base:
        assert post(base, {"model": "torouter", "messages": ask()}).status_code == 200
    service = app.state.torouter
    assert {lane.concurrency for lane in service.lanes.values()} == {3}
    assert {lane.threads.size for lane in service.lanes.values()} == {2}


# --------------------------------------------------------------------------- shutdown with a hung expert


HUNG_SERVER = '''
import os, signal, sys, threading, time
import httpx
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from helpers.langchain_experts import trained_router
from langchain_torouter import ChatRuleBased, ChatTORouter
from torouter_apps.serve import Timeouts, create_app, run_server

class Hung(BaseChatModel):
    @property
    def _llm_type(self):
        return "hung"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        threading.Event().wait()  # never returns

experts = {n: ChatRuleBased(model=n) for n in ["edge-small", "code-7b", "cloud-large"]}
experts["med-7b"] = Hung()
app = create_app(ChatTORouter(experts=experts, router=trained_router()), timeouts=Timeouts(expert_s=0.5, request_s=2))
port = int(sys.argv[1])

def client():
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(base + "/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    response = httpx.post(base + "/v1/chat/completions", timeout=10,
                          json={"model": "med-7b", "messages": [{"role": "user", "content": "hi"}]})
    print("answered", response.status_code, response.json()["error"]["message"], flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    print("sigterm sent", time.monotonic(), flush=True)

threading.Thread(target=client, daemon=True).start()
run_server(app, "127.0.0.1", port, log_level="error")
'''


@pytest.mark.slow
def test_a_hung_expert_thread_does_not_hold_up_shutdown(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "hung_server.py"
    script.write_text(HUNG_SERVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "tests"), str(repo / "shared"), str(repo),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(script), str(port)], env=env, capture_output=True, text=True,
                            timeout=120)
    stopped = time.monotonic()
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["answered"].startswith("502") and "med-7b: ExpertTimeout" in lines["answered"], result.stdout
    assert stopped - float(lines["sigterm"].split()[-1]) < 10, "the process waited on the hung expert's thread"
    assert result.returncode in (0, -signal.SIGTERM), result.stderr[-2000:]


# --- secrets echoed by an expert ----------------------------------------------------------------------------
class ChatEchoingToken(BaseChatModel):
    """An expert that repeats the server's bearer token, streamed a few characters at a time."""

    @property
    def _llm_type(self) -> str:
        return "echo-token"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=f"The key is {TOKEN}, keep it."))])

    def _stream(self, messages, stop=None, run_manager=None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        text = f"The key is {TOKEN}, keep it."
        for i in range(0, len(text), 3):
            yield ChatGenerationChunk(message=AIMessageChunk(content=text[i:i + 3]))


def test_a_secret_an_expert_echoes_is_masked_plain_and_streamed():
    experts = {name: ChatEchoingToken() for name in EXPERTS}
    app = create_app(ChatTORouter(experts=experts, router=trained_router()), token=TOKEN)
    with serving(app) as base:
        plain = post(base, {"model": "torouter", "messages": ask()})
        assert plain.status_code == 200 and TOKEN not in plain.text
        assert plain.json()["choices"][0]["message"]["content"] == "The key is ***, keep it."
        status, events = stream_events(base, {"model": "torouter", "messages": ask()})
        assert status == 200 and TOKEN not in json.dumps(events)
        assert text_of(events) == "The key is ***, keep it."


def test_stream_masker_masks_secrets_split_anywhere():
    from torouter.credentials import Redactor, StreamMasker

    secret = "tok-abcdefghijklmnop"
    text = f"a {secret} b {secret}{secret} c"
    for size in range(1, len(text) + 1):
        masker = StreamMasker(Redactor([secret]))
        out = "".join(masker.feed(text[i:i + size]) for i in range(0, len(text), size)) + masker.flush()
        assert out == "a *** b ****** c", size
