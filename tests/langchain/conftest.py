"""Fixtures for the LangChain adapter's tests."""

import pytest
from helpers.langchain_experts import trained_router


@pytest.fixture(scope="module")
def router():
    """The k-NN router the offline rule-based experts are routed with (see ``helpers.langchain_experts``)."""
    return trained_router()
