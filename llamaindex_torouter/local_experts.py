"""Deprecated module: the offline experts are now in :mod:`llamaindex_torouter.mock_llms`.

``ExtractiveLLM`` is :class:`~llamaindex_torouter.mock_llms.RuleBasedMockLLM` and
``ExtractiveToolLLM`` :class:`~llamaindex_torouter.mock_llms.RuleBasedMockFunctionCallingLLM`;
the names stay importable from here and from ``llamaindex_torouter``. (Real local
models, served from a ``torouter prepare`` manifest, are another matter:
:mod:`torouter.prepare.local`.)
"""

from __future__ import annotations

from .mock_llms import ExpertUnavailableError, RuleBasedMockFunctionCallingLLM, RuleBasedMockLLM

ExtractiveLLM = RuleBasedMockLLM
"""Deprecated alias of :class:`~llamaindex_torouter.mock_llms.RuleBasedMockLLM`."""

ExtractiveToolLLM = RuleBasedMockFunctionCallingLLM
"""Deprecated alias of :class:`~llamaindex_torouter.mock_llms.RuleBasedMockFunctionCallingLLM`."""

__all__ = ["ExpertUnavailableError", "ExtractiveLLM", "ExtractiveToolLLM"]
