"""The demo's building blocks: manifest experts as LangChain chat models, router reuse, the routed chain."""

from __future__ import annotations

import textwrap

import pytest
from rich.console import Console

from langchain_torouter import ChatManifestExpert, ChatTORouter
from torouter.data import Record, RoutingDataset
from torouter_apps.demo import _router, answer_with_chain
from torouter.prepare.manifest import parse_manifest

EXPERTS_MODULE = textwrap.dedent('''
    def terse(prompt):
        return {"text": "terse: 4", "input_tokens": 7, "output_tokens": 2}

    def verbose(prompt, prefix="verbose"):
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        return f"{prefix}: you asked {text!r}. STOP and more"
''')


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    (tmp_path / "demo_test_experts.py").write_text(EXPERTS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return parse_manifest({"experts": [
        {"name": "terse", "tier": "edge", "python": {"callable": "demo_test_experts:terse"},
         "price": {"per_call": 0.001}},
        {"name": "verbose", "tier": "cloud", "python": {"callable": "demo_test_experts:verbose",
                                                        "kwargs": {"prefix": "long"}},
         "price": {"per_call": 0.01}},
    ]})


@pytest.fixture(scope="module")
def routing_data():
    # "terse" is right on arithmetic, "verbose" on everything else.
    records = []
    for i, (q, best) in enumerate([("What is 2 + 2?", "terse"), ("What is 3 + 5?", "terse"),
                                   ("What is 7 + 1?", "terse"), ("Explain photosynthesis.", "verbose"),
                                   ("Explain how vaccines work.", "verbose"),
                                   ("Explain the water cycle.", "verbose")]):
        records.append(Record(f"r{i}", q, {e: {"score": 1.0 if e == best else 0.2, "cost": c}
                                           for e, c in (("terse", 0.001), ("verbose", 0.01))}))
    return RoutingDataset(records)


def test_manifest_expert_is_a_chat_model_with_usage_and_stops(manifest):
    experts = ChatManifestExpert.from_manifest(manifest)
    assert set(experts) == {"terse", "verbose"}
    reply = experts["terse"].invoke("What is 2 + 2?")
    assert reply.content == "terse: 4"
    assert reply.usage_metadata["input_tokens"] == 7 and reply.usage_metadata["output_tokens"] == 2
    assert reply.response_metadata["model_name"] == "terse"
    cut = experts["verbose"].invoke("hello", stop=["STOP"])
    assert cut.content == "long: you asked 'hello'."
    assert experts["verbose"]._llm_type == "torouter-manifest-expert"


@pytest.mark.asyncio
async def test_manifest_expert_async(manifest):
    experts = ChatManifestExpert.from_manifest(manifest)
    reply = await experts["verbose"].ainvoke([("system", "be brief"), ("user", "why?")])
    assert reply.content.startswith("long: you asked 'why?'")


def test_router_is_reused_only_for_the_same_data_and_settings(routing_data, tmp_path):
    console = Console(file=open(tmp_path / "log.txt", "w"))
    first = _router("knn", routing_data, "hash-a", tmp_path / "knn", console, k=1)
    assert first.fit_info_["demo_key"]
    again = _router("knn", routing_data, "hash-a", tmp_path / "knn", console, k=1)
    assert again.fit_info_["demo_key"] == first.fit_info_["demo_key"]
    changed = _router("knn", routing_data, "hash-b", tmp_path / "knn", console, k=1)
    assert changed.fit_info_["demo_key"] != first.fit_info_["demo_key"]
    console.file.close()
    log = (tmp_path / "log.txt").read_text()
    assert log.count("trained") == 2 and log.count("reusing") == 1


def test_chain_routes_new_questions_and_says_why(manifest, routing_data, tmp_path):
    from torouter.routers import make_router

    router = make_router("knn", k=1).fit(routing_data)
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)
    answers = answer_with_chain(router, manifest, ["What is 4 + 4?", "Explain how rainbows form."], console)
    console.file.close()
    assert [a["expert"] for a in answers] == ["terse", "verbose"]
    assert answers[0]["answer"] == "terse: 4"
    assert set(answers[1]["scores"]) == {"terse", "verbose"}
    log = (tmp_path / "log.txt").read_text()
    assert "terse answered" in log and "predicted" in log


def test_chat_router_over_manifest_experts(manifest, routing_data):
    from torouter.routers import make_router

    llm = ChatTORouter(experts=ChatManifestExpert.from_manifest(manifest),
                       router=make_router("knn", k=1).fit(routing_data))
    reply = llm.invoke("Explain how magnets work.")
    assert reply.response_metadata["torouter"]["expert"] == "verbose"
    assert reply.response_metadata["model_name"] == "verbose"


def test_phase_timer_counts_model_loading_as_its_own_phase(monkeypatch):
    from torouter.prepare import local
    from torouter_apps.demo import PhaseTimer

    monkeypatch.setattr(local, "LOADS", [local.ModelLoad("/m/old.gguf", 9.0, True)])
    timer = PhaseTimer()  # the load before it is not the demo's
    local.LOADS.append(local.ModelLoad("/m/gemma.gguf", 30.0, True))
    timer.add("score", 50.0)  # the load happened during this phase
    timer.seconds["answer"] += 100.0
    local.LOADS.append(local.ModelLoad("/cache/converted/x", 2.0, False))
    timer.add("chain", 5.0)
    assert timer.seconds == {"convert": 32.0, "answer": 100.0, "score": 20.0, "train": 0.0, "evaluate": 0.0,
                             "chain": 3.0}
    assert timer.first_use == ["gemma.gguf dequantized in 30.0s"]
    console = Console(record=True, width=80)
    console.print(timer.table(155.0))
    text = console.export_text()
    assert "convert" in text and "32.0" in text and "total" in text and "155.0" in text
