"""``ChatManifestExpert``: any expert of a ``torouter prepare`` manifest as a LangChain chat model.

The same ``experts.yaml`` that builds the routing data then serves the chain, so the
experts a router was trained on (local Hugging Face models included, GGUF too) are
exactly the ones ``ChatTORouter`` routes among.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, PrivateAttr

from ._routing import messages_to_prompt


class ChatManifestExpert(BaseChatModel):
    """A chat model over one manifest expert (``torouter.prepare.Expert``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    """The expert's name in the manifest (also reported as ``model_name``)."""

    timeout_s: float | None = None
    """Per-call timeout in seconds (default: the manifest's ``timeout_s``)."""

    _expert: Any = PrivateAttr()

    def __init__(self, expert: Any, **kwargs: Any):
        super().__init__(name=expert.name, **kwargs)
        self._expert = expert

    @classmethod
    def from_spec(cls, spec: Any, **kwargs: Any) -> ChatManifestExpert:
        """A chat model over one manifest entry (``torouter.prepare.ExpertSpec``), built by the
        backend the entry names, as ``torouter prepare`` builds it."""
        from torouter.prepare import build_expert

        return cls(build_expert(spec), **kwargs)

    @classmethod
    def from_manifest(cls, manifest: str | os.PathLike | Any) -> dict[str, ChatManifestExpert]:
        """Chat models for every expert of a manifest file (or a parsed ``Manifest``), by name."""
        from torouter.prepare import load_manifest

        if isinstance(manifest, (str, os.PathLike)):
            manifest = load_manifest(manifest)
        return {spec.name: cls.from_spec(spec) for spec in manifest.experts}

    @property
    def expert(self) -> Any:
        return self._expert

    @property
    def _llm_type(self) -> str:
        return "torouter-manifest-expert"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self._expert.kind, "settings_hash": self._expert.settings_hash}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_provider="torouter", ls_model_name=self.name, ls_model_type="chat",
                               ls_stop=stop)

    def _timeout(self) -> float:
        return self.timeout_s if self.timeout_s is not None else self._expert.timeout_s

    def _result(self, answer: Any, stop: list[str] | None) -> ChatResult:
        text = answer.text
        for s in stop or []:
            if s and s in text:
                text = text[: text.index(s)].rstrip()  # answers carry no edge whitespace, cut or not
        usage = None
        if answer.input_tokens is not None and answer.output_tokens is not None:
            usage = UsageMetadata(input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                                  total_tokens=answer.input_tokens + answer.output_tokens)
        meta = {"model_name": self.name, "latency_s": answer.latency_s}
        message = AIMessage(content=text, usage_metadata=usage, response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        prompt = messages_to_prompt(messages)
        generate = getattr(self._expert, "generate", None)
        if generate is not None:  # local models answer in this thread
            answer = generate(prompt, None, self._timeout())
        else:
            answer = asyncio.run(self._acall(prompt))
        return self._result(answer, stop)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._result(await self._acall(messages_to_prompt(messages)), stop)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        """Token by token for local models (``Expert.stream``); one chunk for experts that cannot stream."""
        stream = getattr(self._expert, "stream", None)
        if stream is None:
            result = self._generate(messages, stop, run_manager, **kwargs)
            message = result.generations[0].message
            yield ChatGenerationChunk(message=AIMessageChunk(
                content=message.content, usage_metadata=message.usage_metadata,
                response_metadata=message.response_metadata))
            return
        prompt = messages_to_prompt(messages)
        stops = [s for s in stop or [] if s]
        text, sent, started = "", 0, False
        hold = max((len(s) for s in stops), default=1) - 1
        for piece in stream(prompt, self._timeout()):
            text += piece
            if not started:  # answers start at their first non-space character, as in invoke
                text = text.lstrip()
                started = bool(text)
            cut = next((text.index(s) for s in stops if s in text), None)
            if cut is not None:
                text = text[:cut]
                break
            ready = len(text.rstrip()) - hold  # trailing space waits: the answer may end there
            if ready > sent:
                yield self._chunk(text[sent:ready], run_manager)
                sent = ready
        tail = text.rstrip()
        if len(tail) > sent:
            yield self._chunk(tail[sent:], run_manager)
        expert = self._expert
        input_tokens = len(expert.encode_prompt(prompt))
        output_tokens = len(expert.tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else 0
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", response_metadata={"model_name": self.name},
            usage_metadata=UsageMetadata(input_tokens=input_tokens, output_tokens=output_tokens,
                                         total_tokens=input_tokens + output_tokens)))

    @staticmethod
    def _chunk(text: str, run_manager: CallbackManagerForLLMRun | None) -> ChatGenerationChunk:
        chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
        if run_manager is not None:
            run_manager.on_llm_new_token(text, chunk=chunk)
        return chunk

    async def _acall(self, prompt: Sequence[dict[str, Any]] | str) -> Any:
        await self._expert.start()
        return await self._expert.agenerate(prompt, None, self._timeout())
