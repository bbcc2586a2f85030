"""TORouterLLM inside LlamaIndex: Settings.llm, query and chat engines, agents."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, PromptTemplate, Settings, VectorStoreIndex  # noqa: E402
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent  # noqa: E402
from llama_index.core.embeddings import MockEmbedding  # noqa: E402
from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata  # noqa: E402
from llama_index.core.llms.callbacks import llm_completion_callback  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from llamaindex_torouter import ExtractiveLLM, ExtractiveToolLLM, TORouterLLM  # noqa: E402

TAG = re.compile(r"^\[(edge-small|code-7b|med-7b|cloud-large)\] ")
DOCS = [Document(text="Nairobi is the capital of Kenya. Oslo is the capital of Norway."),
        Document(text="Metformin lowers blood glucose by reducing hepatic glucose production.")]


def experts() -> dict[str, Any]:
    return {
        "edge-small": ExtractiveLLM(name="edge-small", context_window=2048),
        "code-7b": ExtractiveToolLLM(name="code-7b", context_window=8192),
        "med-7b": ExtractiveLLM(name="med-7b", context_window=8192),
        "cloud-large": ExtractiveToolLLM(name="cloud-large", context_window=32768),
    }


@pytest.fixture
def llm(router):
    return TORouterLLM(experts(), router, cost_weight=40.0)


@pytest.fixture
def offline_settings():
    """Point Settings at offline models for the test and put the previous ones back afterwards."""
    saved = (Settings._llm, Settings._embed_model)
    Settings.embed_model = MockEmbedding(embed_dim=8)
    yield Settings
    Settings._llm, Settings._embed_model = saved


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_as_settings_llm_in_a_default_query_engine(llm, offline_settings, decisions):
    offline_settings.llm = llm
    assert offline_settings.llm is llm
    engine = VectorStoreIndex.from_documents(DOCS).as_query_engine(similarity_top_k=2)
    answer = str(engine.query("What is the capital of Kenya?"))
    assert TAG.match(answer), answer
    assert decisions and answer.startswith(f"[{decisions[-1].expert}]")
    assert "Nairobi" in answer
    assert offline_settings.llm.predict(PromptTemplate("Which continent is {c} on?"), c="Kenya").startswith("[")


def test_as_the_llm_of_a_streaming_query_engine(llm, offline_settings):
    engine = VectorStoreIndex.from_documents(DOCS).as_query_engine(llm=llm, streaming=True, similarity_top_k=2)
    text = "".join(engine.query("What is the capital of Norway?").response_gen)
    assert TAG.match(text) and "Oslo" in text


def test_as_the_llm_of_a_chat_engine(llm, offline_settings, decisions):
    engine = VectorStoreIndex.from_documents(DOCS).as_chat_engine(llm=llm)
    first = str(engine.chat("What is the capital of Kenya?"))
    assert TAG.match(first) and "Nairobi" in first
    second = str(engine.chat("What lowers blood glucose?"))
    assert TAG.match(second)
    streamed = "".join(engine.stream_chat("What is the capital of Norway?").response_gen)
    assert TAG.match(streamed)
    asynced = str(asyncio.run(engine.achat("What is the capital of Norway?")))
    assert TAG.match(asynced)
    assert len(decisions) >= 4


@pytest.mark.asyncio
@pytest.mark.parametrize("streaming", [True, False])
async def test_inside_a_function_agent(llm, streaming):
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(multiply)], llm=llm, streaming=streaming)
    result = await agent.run("What is 6 multiplied by 7?")
    assert [(c.tool_name, c.tool_kwargs) for c in result.tool_calls] == [("multiply", {"a": 6, "b": 7})]
    assert result.tool_calls[0].tool_output.content == "42"
    answer = str(result)
    assert TAG.match(answer) and answer.endswith("42")
    assert answer.split("]")[0][1:] in {"code-7b", "cloud-large"}


class ScriptedReActLLM(CustomLLM):
    """Follows the ReAct format: asks for the multiply tool, then answers with its observation."""

    name: str

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name=self.name)

    def _text(self, prompt: str) -> str:
        observations = re.findall(r"Observation: (\d+)", prompt)  # the format help has no digits
        if observations:
            observation = observations[-1]
            return f"Thought: I can answer without using any more tools.\nAnswer: [{self.name}] {observation}"
        a, b = re.findall(r"(\d+) multiplied by (\d+)", prompt)[-1]
        return ("Thought: I need the multiply tool.\nAction: multiply\n"
                f"Action Input: {json.dumps({'a': int(a), 'b': int(b)})}")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._text(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        text = self._text(prompt)

        def gen():
            yield CompletionResponse(text=text, delta=text)

        return gen()


@pytest.mark.asyncio
async def test_inside_a_react_agent(router, decisions):
    llm = TORouterLLM({n: ScriptedReActLLM(name=n) for n in experts()}, router, cost_weight=40.0)
    agent = ReActAgent(tools=[FunctionTool.from_defaults(multiply)], llm=llm)
    result = await agent.run("What is 6 multiplied by 7?")
    assert TAG.match(str(result)) and str(result).endswith(" 42")
    assert [(c.tool_name, c.tool_kwargs) for c in result.tool_calls] == [("multiply", {"a": 6, "b": 7})]
    assert len(decisions) == 2  # one routing decision per reasoning step
