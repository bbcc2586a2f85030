"""LangChain integration for torouter: put a trained router wherever a chat model goes.

``ChatTORouter`` is a LangChain chat model that sends each request to the expert chat
model a trained TO-Router picks; ``TORouterMiddleware`` routes the model calls of a
LangChain v1 agent (``create_agent``) and ``TORouterDecisionModel`` drives LangChain's
``ModelRouterMiddleware``; ``route_on_input`` makes a chain route on one key of its
input; ``TORouterRunnable`` routes among arbitrary runnables
(whole sub-chains per domain). ``RuleBasedFakeChatModel`` is a deterministic offline chat
model for tests, examples and benchmarks (``ChatRuleBased`` is its deprecated alias).
``ChatManifestExpert`` serves the experts of a ``torouter prepare`` manifest (local Hugging Face models included) as chat models.
``messages_to_prompt`` and ``as_chunk`` convert LangChain messages and streamed items
the way ``ChatTORouter`` does, for programs built on this adapter.
"""

from ._routing import route_on_input
from .chat_models import ChatTORouter
from .fakes import RuleBasedFakeChatModel
from .manifest import ChatManifestExpert
from .decision_model import TORouterDecisionModel
from .messages import as_chunk, messages_to_prompt
from .middleware import TORouterContext, TORouterMiddleware
from .rule_based import ChatRuleBased
from .runnables import TORouterRunnable

__all__ = ["ChatManifestExpert", "ChatRuleBased", "ChatTORouter", "RuleBasedFakeChatModel", "TORouterContext",
           "TORouterDecisionModel", "TORouterMiddleware", "TORouterRunnable", "as_chunk", "messages_to_prompt",
           "route_on_input"]
