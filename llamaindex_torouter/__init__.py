"""LlamaIndex integration for torouter: ``TORouterLLM`` routes each request to the best expert LLM."""

from torouter.policy import METADATA_KEY

from .base import TORouterLLM
from .callbacks import RoutedCallbackManager
from .events import ExpertFallbackEvent, RoutingDecisionEvent
from .utils import supports_tools
from .local_experts import ExpertUnavailableError, ExtractiveLLM, ExtractiveToolLLM

__all__ = [
    "METADATA_KEY", "ExpertFallbackEvent", "ExpertUnavailableError", "ExtractiveLLM", "ExtractiveToolLLM",
    "RoutedCallbackManager", "RoutingDecisionEvent", "TORouterLLM", "supports_tools",
]
