"""The LlamaIndex examples run offline and do what they say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_index.core")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rag():
    return load_example("llamaindex_rag")


@pytest.fixture(scope="module")
def agent():
    return load_example("llamaindex_agent")


@pytest.fixture
def keep_settings():
    from llama_index.core import Settings

    saved = (Settings._llm, Settings._embed_model)
    yield
    Settings._llm, Settings._embed_model = saved


def test_rag_example_routes_each_question_on_itself_over_default_templates(rag, keep_settings, capsys):
    answers = rag.main([])
    assert [a.question for a in answers] == rag.QUESTIONS
    facts = ["hepatic glucose production", "Nairobi", "text[::-1]", "60 km per hour"]
    for answer, fact in zip(answers, facts, strict=True):
        assert answer.routed_text == answer.question  # the question, not LlamaIndex's filled QA template
        assert answer.answer.startswith(f"[{answer.expert}] ") and fact in answer.answer, answer
    # Priced routing sends each domain to its specialist.
    assert [a.expert for a in answers] == ["med-7b", "edge-small", "code-7b", "cloud-large"]
    out = capsys.readouterr().out
    assert "-> med-7b (1 LLM call, routed on 'What is the mechanism of action of metformin?')" in out


def test_rag_example_uses_llamaindex_default_templates(rag):
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.prompts.default_prompt_selectors import DEFAULT_TEXT_QA_PROMPT_SEL

    engine = rag.build_query_engine(rag.TORouterLLM(rag.local_experts(), rag.train_router()),
                                    rag.load_documents(), MockEmbedding(embed_dim=8))
    qa = engine.get_prompts()["response_synthesizer:text_qa_template"]
    assert qa.get_template() == DEFAULT_TEXT_QA_PROMPT_SEL.get_template()


def test_rag_example_accepts_a_saved_router_and_documents(rag, keep_settings, tmp_path, capsys):
    rag.train_router().save(tmp_path / "router")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "kenya.txt").write_text("Nairobi is the capital of Kenya. Mombasa is a port city.")
    answers = rag.main(["--router", str(tmp_path / "router"), "--docs", str(docs), "--cost-weight", "0",
                        "What is the capital of Kenya?"])
    # Without a price on quality, the strongest (and dearest) expert answers.
    assert [(a.expert, a.answer) for a in answers] == [
        ("cloud-large", "[cloud-large] Nairobi is the capital of Kenya.")]


def test_agent_example_routes_every_step_of_a_run_alike(agent, capsys):
    runs = agent.main([])
    assert [r.question for r in runs] == agent.QUESTIONS
    warfarin, times, code = runs
    assert [s.tool_calls for s in warfarin.steps] == [["drug_interactions"], []]
    assert warfarin.tool_results == [("drug_interactions", "warfarin: " + agent._INTERACTIONS["warfarin"])]
    assert warfarin.answer.endswith("aspirin, ibuprofen and amoxicillin raise the bleeding risk")
    assert times.tool_results == [("multiply", "84.0")] and times.answer.endswith("84.0")
    assert code.tool_results == [("multiply", "54.0")]
    for run in runs:
        assert len({s.expert for s in run.steps}) == 1  # one decision for the whole run
        assert all(set(s.ranking) == {"code-7b", "cloud-large"} for s in run.steps)  # tool-capable only
    assert {warfarin.steps[0].expert, code.steps[0].expert} == {"cloud-large", "code-7b"}
    out = capsys.readouterr().out
    assert out.count("2 steps, 1 router inference run") == 3
