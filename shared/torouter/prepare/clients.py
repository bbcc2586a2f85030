"""Experts reached through a client library or user code: LangChain chat models, LlamaIndex
LLMs and Python callables (the ``langchain``, ``llamaindex`` and ``python`` backends).

``build_chat_model`` is the one way torouter builds a LangChain chat model from
configuration, whether for ``prepare`` (a manifest's ``langchain`` entry) or for the
endpoint (``torouter serve``'s ``experts:``), so both accept the same settings, read
``${VAR}`` the same way and fail with the same messages. LangChain and LlamaIndex are
imported only when such an expert is built.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from pydantic import Secret

from ..credentials import Redactor
from ..data import Prompt, content_text
from .base import Answer, Expert, build_with, check_generation_fields, import_for, reveal_kwargs, to_messages
from .manifest import ExpertBuildError, Generation, LangChainSpec, LlamaIndexSpec, PythonSpec

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

# Manifest generation settings -> LangChain (and LlamaIndex) constructor arguments.
_GENERATION_KWARGS = {"temperature": "temperature", "max_new_tokens": "max_tokens", "top_p": "top_p"}


def generation_kwargs(generation: Generation | None, names: Mapping[str, str] = _GENERATION_KWARGS) -> dict[str, Any]:
    """The generation settings that are set, under the names a client's constructor takes."""
    if generation is None:
        return {}
    values = {"temperature": generation.temperature, "max_new_tokens": generation.max_new_tokens,
              "top_p": generation.top_p}
    return {names[k]: v for k, v in values.items() if v is not None and k in names}


def build_chat_model(name: str, spec: LangChainSpec, redactor: Redactor | None = None,
                     generation: Generation | None = None) -> BaseChatModel:
    """The LangChain chat model an expert's settings describe.

    ``spec`` gives either ``model``, a ``"provider:model"`` string for LangChain's
    ``init_chat_model``, or ``class_``, an import path (``"module:Class"`` or
    ``"module.Class"``), plus constructor ``kwargs``; any object with those three
    attributes will do (the endpoint's expert config has them). ``${VAR}`` in the kwargs is
    read from the environment now, and every value read that way or held as ``SecretStr``
    goes to ``redactor`` (and so to every Redactor of the process) before the model is
    built. ``generation``, when given, adds its temperature, max_new_tokens (as
    ``max_tokens``) and top_p, which explicit kwargs override.

    Every failure is an ``ExpertBuildError`` naming the expert ``name``, with secrets
    masked and ``field`` set to the setting at fault: an unset variable
    (``kwargs.<key>``), ``init_chat_model`` without ``pip install langchain`` (``model``),
    an import path that does not import (``class``), a generation setting the class lacks
    (``generation``), a constructor that raises, or a result that is not a LangChain
    ``BaseChatModel`` (the expert as a whole).
    """
    redactor = redactor if redactor is not None else Redactor()
    try:
        from langchain_core.language_models import BaseChatModel
    except ImportError:
        raise ExpertBuildError(name, "LangChain experts need `pip install langchain-core`") from None
    model_string, class_path = spec.model, spec.class_
    if (model_string is None) == (class_path is None):
        raise ExpertBuildError(name, "give exactly one of model: 'provider:model' or class: 'module:Class'")
    kwargs = reveal_kwargs(name, spec.kwargs, redactor, "kwargs")
    gen = generation_kwargs(generation)
    factory: Any
    if model_string is not None:
        try:
            from langchain.chat_models import init_chat_model
        except ImportError:
            raise ExpertBuildError(
                name, f"{model_string!r} is built with LangChain's init_chat_model, which needs "
                "`pip install langchain` plus the provider package (e.g. langchain-openai); "
                "or give class: 'module:Class' with kwargs instead", "model") from None
        factory = partial(init_chat_model, model_string)
        what = f"model {model_string!r}"
    else:
        assert class_path is not None  # one of the two is set, checked above
        factory = import_for(name, class_path, "class")
        check_generation_fields(name, factory, gen)
        what = class_path
    model = build_with(name, factory, {**gen, **kwargs}, what, redactor)
    if not isinstance(model, BaseChatModel):
        raise ExpertBuildError(name, f"{what} built a {type(model).__name__}, not a LangChain chat model")
    return model


class LangChainExpert(Expert):
    """A LangChain chat model: ``init_chat_model("provider:model")`` or a class by import path."""

    kind = "langchain"
    spec_class = LangChainSpec

    @property
    def options(self) -> LangChainSpec:
        return cast(LangChainSpec, self.spec.backend)

    async def start(self) -> None:
        self._llm = build_chat_model(self.name, self.options, self._redactor, self.spec.generation)
        self._blocking = _langchain_blocks(self._llm)

    async def agenerate(self, prompt: Prompt, reference: str | None, timeout_s: float) -> Answer:
        messages = to_messages(prompt, self.spec.generation.system_prompt)
        stop = self.spec.generation.stop or None
        start = time.perf_counter()
        if self._blocking:  # its ainvoke would borrow the event loop's small shared pool
            message = await self.threads.run(self._llm.invoke, messages, stop=stop)
        else:
            message = await self._llm.ainvoke(messages, stop=stop)
        latency = time.perf_counter() - start
        usage = getattr(message, "usage_metadata", None) or {}
        return self._answer(content_text(message.content), prompt, usage.get("input_tokens"),
                            usage.get("output_tokens"), latency)


def _langchain_blocks(llm: Any) -> bool:
    """Whether a LangChain chat model has no async implementation of its own (it would run
    its sync code in the event loop's default thread pool)."""
    try:
        from langchain_core.language_models.chat_models import BaseChatModel, SimpleChatModel
    except ImportError:
        return False
    agenerate = getattr(type(llm), "_agenerate", None)
    return agenerate is BaseChatModel._agenerate or agenerate is SimpleChatModel._agenerate


def _llamaindex_blocks(llm: Any) -> bool:
    """Whether a LlamaIndex LLM's ``achat`` is its sync ``chat`` (it would block the event loop)."""
    try:
        from llama_index.core.llms.custom import CustomLLM
    except ImportError:
        return False
    return getattr(type(llm), "achat", None) is CustomLLM.achat


def _usage_from(obj: Any) -> tuple[int | None, int | None]:
    """Token counts from a provider's raw response (OpenAI and Anthropic shapes)."""
    if obj is None:
        return None, None
    usage = obj.get("usage") if isinstance(obj, Mapping) else getattr(obj, "usage", None)
    for source in (usage, obj):
        if source is None:
            continue
        get = source.get if isinstance(source, Mapping) else (lambda k, s=source: getattr(s, k, None))
        for in_key, out_key in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
            a, b = get(in_key), get(out_key)
            if isinstance(a, int) and isinstance(b, int):
                return a, b
    return None, None


class LlamaIndexExpert(Expert):
    """A LlamaIndex LLM by import path and constructor kwargs, queried with ``achat``."""

    kind = "llamaindex"
    spec_class = LlamaIndexSpec

    @property
    def options(self) -> LlamaIndexSpec:
        return cast(LlamaIndexSpec, self.spec.backend)

    async def start(self) -> None:
        spec = self.options
        cls = self._import(spec.class_, "class")
        gen = generation_kwargs(self.spec.generation)
        self._check_fields(cls, gen)
        self._llm = self._build(cls, {**gen, **self._reveal(spec.kwargs)}, spec.class_)
        self._blocking = _llamaindex_blocks(self._llm)

    async def agenerate(self, prompt: Prompt, reference: str | None, timeout_s: float) -> Answer:
        from llama_index.core.llms import ChatMessage

        messages = [ChatMessage(role=m["role"], content=m["content"])
                    for m in to_messages(prompt, self.spec.generation.system_prompt)]
        start = time.perf_counter()
        if self._blocking:
            response = await self.threads.run(self._llm.chat, messages)
        else:
            response = await self._llm.achat(messages)
        latency = time.perf_counter() - start
        input_tokens, output_tokens = _usage_from(response.raw)
        if input_tokens is None:
            input_tokens, output_tokens = _usage_from(response.additional_kwargs)
        return self._answer(response.message.content or "", prompt, input_tokens, output_tokens, latency)


class PythonExpert(Expert):
    """A user callable ``fn(prompt, **kwargs)`` returning text, an ``Answer`` or a dict of its fields."""

    kind = "python"
    spec_class = PythonSpec

    @property
    def options(self) -> PythonSpec:
        return cast(PythonSpec, self.spec.backend)

    async def start(self) -> None:
        self._fn = self._import(self.options.callable, "callable")
        if not callable(self._fn):
            raise ExpertBuildError(self.name, f"{self.options.callable!r} is not callable", "callable")
        # Held wrapped between calls, unwrapped only to pass to the callable.
        self._kwargs = Secret(self._reveal(self.options.kwargs))

    async def agenerate(self, prompt: Prompt, reference: str | None, timeout_s: float) -> Answer:
        start = time.perf_counter()
        kwargs = self._kwargs.get_secret_value()
        if inspect.iscoroutinefunction(self._fn):
            result = await self._fn(prompt, **kwargs)
        else:
            result = await self.threads.run(self._fn, prompt, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        latency = time.perf_counter() - start
        if isinstance(result, Answer):
            if result.latency_s is None:
                result.latency_s = latency
            return result
        if isinstance(result, str):
            return self._answer(result, prompt, None, None, latency)
        if isinstance(result, Mapping) and isinstance(result.get("text"), str):
            answer = self._answer(result["text"], prompt, result.get("input_tokens"),
                                  result.get("output_tokens"), result.get("latency_s", latency))
            answer.nll = result.get("nll")
            return answer
        raise TypeError(f"{self.options.callable} returned {type(result).__name__}; "
                        "expected a string, an Answer or a dict with 'text'")


