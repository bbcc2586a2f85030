"""The ``langchain-tests`` standard suites for ``ChatTORouter`` (and the local expert it routes among).

The "integration" suites run fully offline: the experts are ``ChatRuleBased`` models,
which genuinely stream, report usage, honour stop sequences and call tools.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_torouter import ChatRuleBased, ChatTORouter

from helpers.langchain_experts import rule_experts, trained_router

# ChatTORouter makes no provider call of its own: it holds no API key and has no
# timeout or retry settings (those belong to each expert), so the unit suite's
# credentials and transport settings are left out; sampling settings stay.
ROUTER_STANDARD_PARAMS = {"temperature": 0, "max_tokens": 100, "stop": []}

# The suites' async tests are plain coroutines: run them on pytest-asyncio. The mark reaches
# the sync tests too, where it does nothing but warn, so that warning is silenced here.
pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio':pytest.PytestWarning"),
]


class TestChatTORouterUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatTORouter

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"experts": rule_experts(), "router": trained_router(), "cost_weight": 50.0}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return dict(ROUTER_STANDARD_PARAMS)

    @property
    def model_override_value(self) -> str:
        return "code-7b"


class TestChatTORouterIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatTORouter

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"experts": rule_experts(), "router": trained_router(), "cost_weight": 50.0}

    @property
    def model_override_value(self) -> str:
        return "code-7b"


class TestChatRuleBasedUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatRuleBased

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "rule-based-test"}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # A local deterministic model: no API key, timeout, retries or temperature.
        return {"max_tokens": 100, "stop": []}


class TestChatRuleBasedIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatRuleBased

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "rule-based-test"}

    @property
    def supports_model_override(self) -> bool:
        return False
