"""LlamaIndex integration for torouter: ``TORouterLLM`` routes each request to the best expert LLM."""

from .base import (
    METADATA_KEY,
    ExpertFallbackEvent,
    RoutedCallbackManager,
    RoutingDecisionEvent,
    TORouterLLM,
    supports_tools,
)
from .local_experts import ExpertUnavailableError, ExtractiveLLM, ExtractiveToolLLM

__all__ = [
    "METADATA_KEY", "ExpertFallbackEvent", "ExpertUnavailableError", "ExtractiveLLM", "ExtractiveToolLLM",
    "RoutedCallbackManager", "RoutingDecisionEvent", "TORouterLLM", "supports_tools",
]
