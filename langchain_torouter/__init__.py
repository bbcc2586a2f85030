"""LangChain integration for torouter: put a trained router wherever a chat model goes.

``ChatTORouter`` is a LangChain chat model that sends each request to the expert chat
model a trained TO-Router picks; ``TORouterRunnable`` routes among arbitrary runnables
(whole sub-chains per domain). ``ChatRuleBased`` is a deterministic offline chat model
for tests, examples and benchmarks.
"""

from .chat_models import ChatTORouter
from .rule_based import ChatRuleBased
from .runnables import TORouterRunnable

__all__ = ["ChatRuleBased", "ChatTORouter", "TORouterRunnable"]
