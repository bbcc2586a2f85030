"""Instrumentation events ``TORouterLLM`` emits, for LlamaIndex's dispatcher and its handlers."""

from __future__ import annotations

from llama_index.core.instrumentation.events import BaseEvent


class RoutingDecisionEvent(BaseEvent):
    """One routing decision: the router's pick, the fallback order, the numbers behind it and what was read."""

    expert: str
    ranking: list[str]
    scores: dict[str, float]
    costs: dict[str, float]
    cost_weight: float
    max_cost: float | None = None
    forced: bool = False
    tools: bool = False
    routed_text: str = ""

    @classmethod
    def class_name(cls) -> str:
        return "TORouterRoutingDecisionEvent"


class ExpertFallbackEvent(BaseEvent):
    """Experts earlier in the ranking failed before producing output and ``expert`` answered."""

    expert: str
    chosen: str
    failures: dict[str, str]

    @classmethod
    def class_name(cls) -> str:
        return "TORouterExpertFallbackEvent"
