"""The controller: which text is routed on, the cost-aware ranking, and fallbacks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from torouter.controller import (
    AllExpertsFailed,
    Controller,
    acall_with_fallbacks,
    astream_with_fallbacks,
    call_with_fallbacks,
    stream_with_fallbacks,
)
from torouter.data import Record, RoutingDataset
from torouter.errors import IneligibleRequest, RoutingError
from torouter.routers import NotFittedError, make_router
from torouter.routers.base import Router

EXPERTS = ["cheap", "coder", "big"]
COSTS = {"cheap": 1.0, "coder": 2.0, "big": 4.0}


class KeywordRouter(Router):
    """Quality [cheap .5, coder .3, big .8]; coder jumps to .95 when the text mentions code."""

    method = "keyword"

    def __init__(self):
        pass

    def _fit(self, dataset):
        self.seen_ = []
        self.calls_ = 0

    def _predict(self, texts):
        self.seen_.extend(texts)
        self.calls_ += 1
        rows = []
        for text in texts:
            rows.append([0.5, 0.95 if "code" in text.lower() else 0.3, 0.8])
        return np.array(rows)


@pytest.fixture
def router():
    records = [Record(f"r{i}", f"prompt {i}", {e: {"score": 0.5, "cost": c} for e, c in COSTS.items()})
               for i in range(3)]
    return KeywordRouter().fit(RoutingDataset(records))


CONVERSATION = [
    {"role": "system", "content": "You review Python code."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! Paste your code."},
    {"role": "user", "content": "What's the weather like today?"},
]


# --- decide ---------------------------------------------------------------------------------

def test_decide_at_cost_weight_zero(router):
    d = Controller(router).decide("hello")
    assert d.expert == "big"
    assert d.ranking == ["big", "cheap", "coder"]
    assert d.scores == {"cheap": 0.5, "coder": 0.3, "big": 0.8}
    assert d.costs == COSTS
    assert d.cost_weight == 0.0 and d.max_cost is None
    assert d.routed_text == "hello"


def test_decide_honours_cost_weight(router):
    # utilities at w=.1: cheap .4, coder .1, big .4 -> tie between cheap and big goes to cheap
    controller = Controller(router, cost_weight=0.1)
    d = controller.decide("hello")
    assert d.ranking == ["cheap", "big", "coder"]
    assert d.cost_weight == 0.1
    # a per-call cost weight overrides the controller's
    assert controller.decide("hello", cost_weight=0.0).expert == "big"
    # at w=.05: cheap .45, coder .2, big .6
    assert controller.decide("hello", cost_weight=0.05).ranking == ["big", "cheap", "coder"]


def test_decide_honours_max_cost(router):
    d = Controller(router, max_cost=2.0).decide("please write code")
    assert d.ranking == ["coder", "cheap"]  # big is over budget and out of the fallback order
    assert d.max_cost == 2.0
    assert Controller(router).decide("hello", max_cost=2.0).ranking == ["cheap", "coder"]
    # nothing fits: the cheapest expert answers
    assert Controller(router).decide("hello", max_cost=0.1).ranking == ["cheap"]


def test_decide_honours_allowed(router):
    controller = Controller(router)
    assert controller.decide("hello", allowed=["coder", "cheap"]).ranking == ["cheap", "coder"]
    assert controller.decide("hello", allowed={"coder"}).ranking == ["coder"]
    # allowed and max_cost together: no allowed expert fits, so the cheapest allowed one
    assert controller.decide("hello", allowed=["big", "coder"], max_cost=0.5).ranking == ["coder"]
    with pytest.raises(ValueError, match=r"unknown experts \['gpt-5'\]"):
        controller.decide("hello", allowed=["gpt-5"])
    with pytest.raises(ValueError, match="no expert is allowed"):
        controller.decide("hello", allowed=[])


def test_eligible_decides_who_may_answer(router):
    controller = Controller(router)
    assert controller.eligible() is None  # everyone
    assert controller.eligible(allowed=["big", "cheap"]) == ["cheap", "big"]  # in the router's order
    assert controller.eligible("coder") == ["coder"]
    assert controller.eligible(unable={"big": "cannot call tools"}) == ["cheap", "coder"]
    assert controller.eligible(allowed=["coder", "big"], unable={"big": "no tools"}) == ["coder"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"expert": "gpt-5"}, "unknown expert 'gpt-5': expert='gpt-5' is not one of the experts"),
    ({"expert": "big", "allowed": ["cheap"]}, r"expert 'big' is not allowed for this request \(allowed: \['cheap'\]\)"),
    ({"expert": "big", "unable": {"big": "its profile rules out tools"}},
     "expert 'big' cannot take this request: its profile rules out tools"),
    ({"unable": {e: "no tools" for e in EXPERTS}}, "no expert can take this request: .*'cheap': 'no tools'"),
    ({"allowed": ["cheap"], "unable": {"cheap": "no tools"}}, "no expert can take this request"),
    ({"allowed": []}, "no expert is allowed for this request"),
    ({"allowed": ["gpt-5"]}, r"unknown experts \['gpt-5'\] in allowed"),
    ({"unable": {"gpt-5": "x"}}, r"unknown experts \['gpt-5'\] marked unable"),
    ({"expert": 3}, "expert must be an expert name, got int"),
])
def test_ineligible_requests_say_why(router, kwargs, message):
    controller = Controller(router)
    with pytest.raises(IneligibleRequest, match=message) as caught:
        controller.eligible(**kwargs)
    assert isinstance(caught.value, RoutingError) and isinstance(caught.value, ValueError)
    with pytest.raises(IneligibleRequest, match=message):  # decide applies the same rules
        controller.decide("hello", **kwargs)
    assert controller.router_calls == 0  # refused before any router inference


def test_decide_forces_and_filters_through_eligible(router):
    controller = Controller(router)
    assert controller.decide("write code", expert="cheap").ranking == ["cheap"]
    assert controller.decide("write code", unable={"coder": "busy"}).ranking == ["big", "cheap"]
    decisions = controller.decide_many(["a", "write code"], allowed=["coder", "cheap"])
    assert [d.expert for d in decisions] == ["cheap", "coder"]
    assert asyncio.run(controller.adecide("x", expert="big")).ranking == ["big"]


def test_routing_errors_are_one_family():
    failed = AllExpertsFailed({"big": TimeoutError("slow")})
    assert isinstance(failed, RoutingError) and isinstance(failed, RuntimeError)
    assert issubclass(IneligibleRequest, RoutingError)


def test_prices_override_training_costs(router):
    controller = Controller(router, cost_weight=0.1, prices={"big": 0.5})
    assert controller.costs.tolist() == [1.0, 2.0, 0.5]
    # big: .8 - .05 = .75 beats cheap .4
    assert controller.decide("hello").expert == "big"


def test_route_on_last_user_vs_conversation(router):
    last = Controller(router, route_on="last_user").decide(CONVERSATION)
    assert last.routed_text == "What's the weather like today?"
    assert last.expert == "big"
    whole = Controller(router, route_on="conversation").decide(CONVERSATION)
    assert whole.routed_text == "You review Python code.\nHi there\nWhat's the weather like today?"
    assert whole.expert == "coder"  # the system message mentions code
    # the router read exactly the routed text
    assert router.seen_[-1] == whole.routed_text


def test_route_on_default_is_last_user(router):
    assert Controller(router).route_on == "last_user"


def test_conversation_routing_reads_what_the_router_was_trained_on(router):
    messages = [{"role": "system", "content": "You review Python code."},
                {"role": "user", "content": "What's the weather like today?"}]
    trained_text = RoutingDataset([Record("m", messages, {"cheap": {"score": 1.0, "cost": 1.0}})]).texts()[0]
    assert Controller(router, route_on="conversation").decide(messages).routed_text == trained_text
    # The default reads the user's question alone, not the shared system prompt.
    assert Controller(router).decide(messages).routed_text == "What's the weather like today?"
    single = [{"role": "user", "content": "What's the weather like today?"}]
    single_trained = RoutingDataset([Record("s", single, {"cheap": {"score": 1.0, "cost": 1.0}})]).texts()[0]
    assert Controller(router).decide(single).routed_text == single_trained


@pytest.mark.parametrize("prompt", [
    [{"role": "assistant", "content": "Only the assistant spoke."}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
    [{"role": "user", "content": "   "}],
    "   ",
])
def test_nothing_to_route_on_still_answers_default_expert_first(router, prompt):
    # The router ranks the experts for the empty text; a configured default expert goes first.
    decision = Controller(router, route_on="conversation").decide(prompt)
    assert decision.routed_text.strip() == ""
    assert decision.expert == "big" and sorted(decision.ranking) == sorted(EXPERTS)
    decision = Controller(router, default_expert="cheap").decide(prompt)
    assert decision.expert == "cheap" and decision.ranking == ["cheap", "big", "coder"]
    # With a routable prompt the default expert has no say.
    assert Controller(router, default_expert="cheap").decide("write code").expert == "coder"


def test_system_only_prompt_routes_on_the_system_text(router):
    decision = Controller(router, route_on="last_user").decide([{"role": "system", "content": "Review my code."}])
    assert decision.routed_text == "Review my code." and decision.expert == "coder"


def test_default_expert_must_be_known(router):
    with pytest.raises(ValueError, match="default_expert='gpt-9' is not one of the router's experts"):
        Controller(router, default_expert="gpt-9")


def test_repeated_text_is_predicted_once(router):
    controller = Controller(router)
    agent_steps = [CONVERSATION, CONVERSATION + [{"role": "assistant", "content": "calling a tool"},
                                                 {"role": "tool", "content": "84"}],
                   CONVERSATION + [{"role": "user", "content": "Observation: 84"}]]
    before = router.calls_
    decisions = [controller.decide(p) for p in agent_steps]
    assert router.calls_ == before + 1 and controller.router_calls == 1 and controller.cache_hits == 2
    assert len({d.routed_text for d in decisions}) == 1
    # Per-call settings still apply to a cached prediction.
    assert controller.decide(CONVERSATION, cost_weight=1.0).expert == "cheap"
    assert router.calls_ == before + 1
    uncached = Controller(router, cache_size=0)
    uncached.decide(CONVERSATION)
    uncached.decide(CONVERSATION)
    assert router.calls_ == before + 3 and uncached.cache_hits == 0


def test_cache_is_bounded_lru(router):
    controller = Controller(router, cache_size=2)
    for text in ["a", "b", "a", "c"]:  # "b" is least recently used when "c" arrives
        controller.decide(text)
    calls = router.calls_
    controller.decide("a")
    assert router.calls_ == calls
    controller.decide("b")
    assert router.calls_ == calls + 1


def test_decide_many_predicts_each_distinct_text_once(router):
    controller = Controller(router)
    before = len(router.seen_)
    decisions = controller.decide_many(["write code", "hello", "write code"])
    assert router.seen_[before:] == ["write code", "hello"]
    assert decisions[0] == decisions[2]


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), -0.5])
def test_bad_cost_weight_per_call_is_refused(router, weight):
    with pytest.raises(ValueError, match="cost_weight must be a finite number >= 0"):
        Controller(router).decide("hello", cost_weight=weight)


def test_adecide_matches_decide(router):
    controller = Controller(router, cost_weight=0.1)
    d = asyncio.run(controller.adecide(CONVERSATION, allowed=["coder", "big"]))
    assert d == controller.decide(CONVERSATION, allowed=["coder", "big"])


def test_decide_many_matches_decide_with_one_router_call(router):
    controller = Controller(router, cost_weight=0.05)
    prompts = ["hello", "write code please", CONVERSATION]
    before = router.calls_
    many = controller.decide_many(prompts, allowed=["cheap", "coder"])
    assert router.calls_ == before + 1
    assert many == [controller.decide(p, allowed=["cheap", "coder"]) for p in prompts]
    assert [d.expert for d in many] == ["cheap", "coder", "cheap"]
    assert controller.decide_many([]) == []
    assert asyncio.run(controller.adecide_many(prompts)) == [controller.decide(p) for p in prompts]


def test_constructor_checks(router):
    with pytest.raises(ValueError, match="route_on"):
        Controller(router, route_on="everything")
    with pytest.raises(ValueError, match="cost_weight must be a finite number >= 0"):
        Controller(router, cost_weight=-1)
    with pytest.raises(NotFittedError):
        Controller(make_router("best-single"))


def test_controller_from_saved_router(tmp_path):
    records = [Record("a", "p", {"x": {"score": 0.9, "cost": 1.0}, "y": {"score": 0.2, "cost": 0.1}})]
    path = make_router("best-single").fit(RoutingDataset(records)).save(tmp_path / "router")
    controller = Controller(path)
    assert controller.experts == ["x", "y"]
    assert controller.decide("anything").ranking == ["x", "y"]
    assert Controller(str(path), cost_weight=10).decide("anything").expert == "y"


def test_check_experts(router):
    controller = Controller(router)
    controller.check_experts(["big", "cheap", "coder"])  # order does not matter
    with pytest.raises(ValueError) as info:
        controller.check_experts(["cheap", "coder", "gpt-5"])
    message = str(info.value)
    assert "unknown to the router: ['gpt-5']" in message
    assert "missing for the router's experts: ['big']" in message
    with pytest.raises(ValueError, match=r"missing for the router's experts: \['big', 'coder'\]"):
        controller.check_experts(["cheap"])


# --- fallbacks ------------------------------------------------------------------------------

class Flaky:
    """Calls that fail for the named experts, recording who was tried."""

    def __init__(self, failing):
        self.failing = dict(failing)
        self.tried = []

    def __call__(self, name):
        self.tried.append(name)
        if name in self.failing:
            raise self.failing[name]
        return f"answer from {name}"


def test_call_with_fallbacks_moves_down_the_ranking():
    boom = ConnectionError("timed out")
    call = Flaky({"a": boom})
    name, result, failures = call_with_fallbacks(["a", "b", "c"], call)
    assert (name, result) == ("b", "answer from b")
    assert failures == {"a": boom}
    assert call.tried == ["a", "b"]


def test_call_with_fallbacks_first_succeeds():
    call = Flaky({})
    assert call_with_fallbacks(["a", "b"], call) == ("a", "answer from a", {})
    assert call.tried == ["a"]


def test_all_experts_failed_names_every_failure():
    call = Flaky({"a": RuntimeError("rate limited"), "b": ValueError("bad request")})
    with pytest.raises(AllExpertsFailed) as info:
        call_with_fallbacks(["a", "b"], call)
    message = str(info.value)
    assert message == "all 2 experts failed: a: RuntimeError: rate limited; b: ValueError: bad request"
    assert set(info.value.failures) == {"a", "b"}
    assert isinstance(info.value.failures["b"], ValueError)


def test_no_fallbacks_reraises_the_original_error():
    boom = ConnectionError("down")
    call = Flaky({"a": boom})
    with pytest.raises(ConnectionError) as info:
        call_with_fallbacks(["a", "b"], call, fallbacks=False)
    assert info.value is boom
    assert call.tried == ["a"]


def test_base_exceptions_are_not_swallowed():
    call = Flaky({"a": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        call_with_fallbacks(["a", "b"], call)
    assert call.tried == ["a"]


def test_acall_with_fallbacks():
    tried = []

    async def call(name):
        tried.append(name)
        await asyncio.sleep(0)
        if name == "a":
            raise TimeoutError("slow")
        return name.upper()

    name, result, failures = asyncio.run(acall_with_fallbacks(["a", "b", "c"], call))
    assert (name, result) == ("b", "B")
    assert list(failures) == ["a"] and isinstance(failures["a"], TimeoutError)
    assert tried == ["a", "b"]
    with pytest.raises(TimeoutError):
        asyncio.run(acall_with_fallbacks(["a", "b"], call, fallbacks=False))
    with pytest.raises(AllExpertsFailed, match="a: TimeoutError: slow"):
        asyncio.run(acall_with_fallbacks(["a"], call))


def test_acall_does_not_swallow_cancellation():
    async def call(name):
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(acall_with_fallbacks(["a", "b"], call))


def _stream(chunks, fail_at=None, error=None):
    """A generator of chunks that raises ``error`` before chunk number ``fail_at``."""
    for i, chunk in enumerate(chunks):
        if i == fail_at:
            raise error
        yield chunk


def test_stream_falls_back_when_first_expert_fails_before_first_chunk():
    started = []
    boom = ConnectionError("refused")

    def start(name):
        started.append(name)
        if name == "a":
            return _stream(["x"], fail_at=0, error=boom)
        return _stream([f"{name}1", f"{name}2"])

    out = list(stream_with_fallbacks(["a", "b", "c"], start))
    assert [(n, c) for n, c, _ in out] == [("b", "b1"), ("b", "b2")]
    assert out[0][2] == {"a": boom}
    assert started == ["a", "b"]


def test_stream_falls_back_when_start_itself_raises():
    def start(name):
        if name == "a":
            raise RuntimeError("no connection")
        return iter(["ok"])

    out = list(stream_with_fallbacks(["a", "b"], start))
    assert [(n, c) for n, c, _ in out] == [("b", "ok")]


def test_stream_error_after_first_chunk_propagates():
    started = []

    def start(name):
        started.append(name)
        return _stream(["a1", "a2", "a3"], fail_at=2, error=IOError("dropped"))

    gen = stream_with_fallbacks(["a", "b"], start)
    assert next(gen)[1] == "a1"
    assert next(gen)[1] == "a2"
    with pytest.raises(IOError, match="dropped"):
        next(gen)
    assert started == ["a"]  # no fallback once output has started


def test_stream_all_fail_and_no_fallbacks():
    boom = {"a": RuntimeError("A down"), "b": RuntimeError("B down")}

    def start(name):
        return _stream(["x"], fail_at=0, error=boom[name])

    expected = "all 2 experts failed: a: RuntimeError: A down; b: RuntimeError: B down"
    with pytest.raises(AllExpertsFailed, match=expected):
        list(stream_with_fallbacks(["a", "b"], start))
    with pytest.raises(RuntimeError) as info:
        list(stream_with_fallbacks(["a", "b"], start, fallbacks=False))
    assert info.value is boom["a"]


def test_astream_with_fallbacks():
    async def chunks(name):
        if name == "a":
            raise ConnectionError("refused")
        yield f"{name}1"
        await asyncio.sleep(0)
        yield f"{name}2"

    async def collect(**kwargs):
        return [(n, c, dict(f)) async for n, c, f in astream_with_fallbacks(["a", "b"], chunks, **kwargs)]

    out = asyncio.run(collect())
    assert [(n, c) for n, c, _ in out] == [("b", "b1"), ("b", "b2")]
    assert list(out[0][2]) == ["a"]
    with pytest.raises(ConnectionError, match="refused"):
        asyncio.run(collect(fallbacks=False))


def test_cached_decisions_follow_the_settings_and_are_private_copies(router):
    controller = Controller(router)
    first = controller.decide("hello", cost_weight=0.0)
    assert first.expert == "big"
    calls = router.calls_
    assert controller.decide("hello", cost_weight=0.2).expert == "cheap"  # other settings: not the cached one
    assert controller.decide("hello", allowed=["coder", "cheap"]).ranking == ["cheap", "coder"]
    assert router.calls_ == calls  # ... though the prediction itself came from the cache
    first.ranking.append("mutated")
    first.scores["big"] = -1.0
    again = controller.decide("hello", cost_weight=0.0)
    assert again.ranking == ["big", "cheap", "coder"] and again.scores["big"] == 0.8
    assert controller.cache_hits >= 3
