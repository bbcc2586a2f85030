"""Deprecated module: ``ChatRuleBased`` is now :class:`langchain_torouter.fakes.RuleBasedFakeChatModel`.

Kept so that ``from langchain_torouter.rule_based import ChatRuleBased`` and endpoint
configs naming ``langchain_torouter:ChatRuleBased`` keep working; the answering rules
live in the core, :mod:`torouter.offline`.
"""

from __future__ import annotations

from .fakes import RuleBasedFakeChatModel

ChatRuleBased = RuleBasedFakeChatModel
"""Deprecated alias of :class:`~langchain_torouter.fakes.RuleBasedFakeChatModel`."""

__all__ = ["ChatRuleBased"]
