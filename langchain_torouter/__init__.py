"""LangChain integration for torouter: put a trained router wherever a chat model goes.

``ChatTORouter`` is a LangChain chat model that sends each request to the expert chat
model a trained TO-Router picks; ``TORouterRunnable`` routes among arbitrary runnables
(whole sub-chains per domain). ``ChatRuleBased`` is a deterministic offline chat model
for tests, examples and benchmarks. ``ChatManifestExpert`` serves the experts of a
``torouter prepare`` manifest (local Hugging Face models included) as chat models.
"""

from .chat_models import ChatTORouter
from .manifest import ChatManifestExpert
from .rule_based import ChatRuleBased
from .runnables import TORouterRunnable

__all__ = ["ChatManifestExpert", "ChatRuleBased", "ChatTORouter", "TORouterRunnable"]
from .middleware import TORouterContext, TORouterDecisionModel, TORouterMiddleware  # noqa: E402

__all__ += ["TORouterContext", "TORouterDecisionModel", "TORouterMiddleware"]
