"""LlamaIndex integration for torouter: ``TORouterLLM`` routes each request to the best expert LLM.

``RuleBasedMockLLM`` and ``RuleBasedMockFunctionCallingLLM`` are deterministic offline
experts for tests and examples (``ExtractiveLLM`` and ``ExtractiveToolLLM`` are their
deprecated aliases).
"""

from torouter.policy import METADATA_KEY

from .base import TORouterLLM
from .callbacks import RoutedCallbackManager
from .events import ExpertFallbackEvent, RoutingDecisionEvent
from .local_experts import ExtractiveLLM, ExtractiveToolLLM
from .mock_llms import ExpertUnavailableError, RuleBasedMockFunctionCallingLLM, RuleBasedMockLLM
from .utils import supports_tools

__all__ = [
    "METADATA_KEY", "ExpertFallbackEvent", "ExpertUnavailableError", "ExtractiveLLM", "ExtractiveToolLLM",
    "RoutedCallbackManager", "RoutingDecisionEvent", "RuleBasedMockFunctionCallingLLM", "RuleBasedMockLLM",
    "TORouterLLM", "supports_tools",
]
