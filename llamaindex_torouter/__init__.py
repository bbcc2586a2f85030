"""LlamaIndex integration for torouter: ``TORouterLLM`` routes each request to the best expert LLM.

``RuleBasedMockLLM`` and ``RuleBasedMockFunctionCallingLLM`` are deterministic offline
experts for tests and examples (``ExtractiveLLM`` and ``ExtractiveToolLLM`` are their
deprecated aliases).
"""

from .base import (
    METADATA_KEY,
    ExpertFallbackEvent,
    RoutedCallbackManager,
    RoutingDecisionEvent,
    TORouterLLM,
    supports_tools,
)
from .local_experts import ExtractiveLLM, ExtractiveToolLLM
from .mock_llms import ExpertUnavailableError, RuleBasedMockFunctionCallingLLM, RuleBasedMockLLM

__all__ = [
    "METADATA_KEY", "ExpertFallbackEvent", "ExpertUnavailableError", "ExtractiveLLM", "ExtractiveToolLLM",
    "RoutedCallbackManager", "RoutingDecisionEvent", "RuleBasedMockFunctionCallingLLM", "RuleBasedMockLLM",
    "TORouterLLM", "supports_tools",
]
