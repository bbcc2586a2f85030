"""Deprecated module: ``ChatRuleBased`` is now :class:`langchain_torouter.fakes.RuleBasedFakeChatModel`.

Kept so that ``from langchain_torouter.rule_based import ChatRuleBased`` and endpoint
configs naming ``langchain_torouter:ChatRuleBased`` keep working; the answering rules
live in the core, :mod:`torouter.offline`.
"""

from __future__ import annotations

from .fakes import RuleBasedFakeChatModel



class ChatRuleBased(RuleBasedFakeChatModel):
    """Deprecated name of :class:`~langchain_torouter.fakes.RuleBasedFakeChatModel`.

    A subclass rather than a bare alias so that code written against the old name keeps
    seeing it where LangChain shows a model's class: run names in callbacks and traces.
    """

__all__ = ["ChatRuleBased"]
