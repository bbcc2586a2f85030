"""LangChain integration tests: the ``langchain-tests`` standard suites and shared helpers."""
