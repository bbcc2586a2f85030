"""Helpers shared by the LangChain tests: a trained router, local experts, failing experts, a run recorder."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from langchain_torouter import ChatRuleBased
from torouter import RoutingDataset, make_router
from torouter.synthetic import EXPERTS, make_synthetic

EXPERT_NAMES = list(EXPERTS)


@functools.cache
def trained_router():
    """A k-NN router fitted on the synthetic four-expert data (trained once per process)."""
    return make_router("knn", k=5).fit(RoutingDataset(make_synthetic(120)))


def rule_experts(**params: Any) -> dict[str, ChatRuleBased]:
    """One rule-based expert per synthetic expert, each reporting its name as its model name."""
    return {name: ChatRuleBased(model=name, **params) for name in EXPERT_NAMES}


class OutageError(ConnectionError):
    """A simulated provider outage."""


class ChatDown(BaseChatModel):
    """An expert that is down: every call fails before any output (optionally after ``good_chunks``)."""

    label: str = "down"
    good_chunks: int = 0
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "down"

    def _generate(self, messages: list[BaseMessage], stop=None, run_manager=None, **kwargs: Any) -> ChatResult:
        self.calls += 1
        raise OutageError(f"{self.label} is unreachable")

    def _stream(self, messages, stop=None, run_manager=None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        self.calls += 1
        for i in range(self.good_chunks):
            yield ChatGenerationChunk(message=AIMessageChunk(content=f"part{i} "))
        raise OutageError(f"{self.label} dropped the stream")

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._stream(messages, stop, **kwargs):
            yield chunk


class RunRecorder(BaseCallbackHandler):
    """Records chat-model and chain runs: id, parent, name, metadata and tags."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.tokens: list[tuple[UUID, str]] = []

    def _record(self, kind: str, serialized: Any, run_id: UUID, parent_run_id: UUID | None, **kwargs: Any) -> None:
        self.runs.append({"kind": kind, "run_id": run_id, "parent_run_id": parent_run_id,
                          "name": kwargs.get("name") or (serialized or {}).get("name"),
                          "metadata": kwargs.get("metadata") or {}, "tags": kwargs.get("tags") or [],
                          "options": kwargs.get("options")})

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, **kwargs):
        self._record("chat_model", serialized, run_id, parent_run_id, **kwargs)

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, **kwargs):
        self._record("chain", serialized, run_id, parent_run_id, **kwargs)

    def on_llm_new_token(self, token, *, run_id, **kwargs):
        self.tokens.append((run_id, token))

    def chat_runs(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["kind"] == "chat_model"]
