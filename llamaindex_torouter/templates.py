"""Finding the user's words inside the prompts LlamaIndex builds around them.

The router was trained on questions, so it must read the question rather than the
template around it. Two cases reach ``TORouterLLM``:

- A prompt template with its arguments (``predict``/``stream``/structured output, as
  query engines, response synthesizers and condense-question chat engines call them):
  the query is an argument (``query_str``, or ``question`` in condense prompts), given
  with the call or bound earlier with ``partial_format``. :func:`query_of` finds it.
- A prompt LlamaIndex has already filled and sends as plain text or as a user turn:
  ``CondensePlusContextChatEngine`` condenses the conversation with ``complete()`` on a
  filled prompt, and workflow agents wrap the user's message in a state prompt when
  they have state. :func:`question_in_template` recognises LlamaIndex's own templates
  for these and returns the user's words. Other filled templates are read by the
  core's ``torouter.routing_text``, which takes questions out of RAG templates.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from llama_index.core.prompts import BasePromptTemplate, SelectorPromptTemplate

QUERY_ARGUMENTS = ("query_str", "question")
"""Template arguments that hold the user's query, in the order they are looked for."""


def query_of(prompt: BasePromptTemplate, prompt_args: Mapping[str, Any], llm: Any = None) -> str | None:
    """The user's query among a template's arguments (call arguments over ``partial_format`` ones), or None."""
    values: dict[str, Any] = {}
    templates = [prompt]
    if isinstance(prompt, SelectorPromptTemplate):
        templates.append(prompt.select(llm=llm))
    for template in templates:
        values.update(getattr(template, "kwargs", None) or {})
    values.update(prompt_args)
    for name in QUERY_ARGUMENTS:
        value = values.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _pattern(template: str, wanted: str) -> re.Pattern[str]:
    """A regex matching ``template`` filled in: the ``wanted`` field is group ``q``, ``chat_history`` group ``h``."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template.strip()):
        parts.append(re.escape(literal))
        if field == wanted:
            parts.append("(?P<q>.*?)")
        elif field == "chat_history":
            parts.append("(?P<h>.*?)")
        elif field is not None:
            parts.append(".*?")
    return re.compile("".join(parts), re.DOTALL)


@lru_cache(maxsize=1)
def _known_templates() -> tuple[re.Pattern[str], ...]:
    """LlamaIndex's templates that wrap the user's words, read from the installed LlamaIndex."""
    found: list[tuple[str, str]] = []
    try:
        from llama_index.core.chat_engine.condense_plus_context import DEFAULT_CONDENSE_PROMPT_TEMPLATE

        found.append((DEFAULT_CONDENSE_PROMPT_TEMPLATE, "question"))
    except ImportError:  # pragma: no cover - older LlamaIndex
        pass
    try:
        from llama_index.core.chat_engine.condense_question import DEFAULT_TEMPLATE

        found.append((DEFAULT_TEMPLATE, "question"))
    except ImportError:  # pragma: no cover
        pass
    try:
        from llama_index.core.agent.workflow.prompts import DEFAULT_STATE_PROMPT

        found.append((DEFAULT_STATE_PROMPT, "msg"))
    except ImportError:  # pragma: no cover
        pass
    return tuple(_pattern(template, field) for template, field in found)


# How LlamaIndex writes a conversation into a condense prompt (generic_utils.messages_to_history_str).
_HISTORY_TURN = re.compile(r"^(user|assistant|system|developer|tool|function|chatbot|model): ", re.MULTILINE)


def _history_turns(history: str) -> list[dict[str, str]]:
    """The ``role: content`` turns of a conversation written into a prompt, oldest first."""
    marks = list(_HISTORY_TURN.finditer(history))
    return [{"role": mark.group(1), "content": history[mark.end():end].strip()}
            for mark, end in zip(marks, [m.start() for m in marks[1:]] + [len(history)], strict=True)]


def _match(text: str) -> re.Match[str] | None:
    stripped = text.strip()
    for pattern in _known_templates():
        match = pattern.fullmatch(stripped)
        if match and match.group("q").strip():
            return match
    return None


def question_in_template(text: str) -> str:
    """The user's words if ``text`` is one of LlamaIndex's filled wrapper templates, else ``text``."""
    match = _match(text)
    return match.group("q").strip() if match else text


def template_prompt(text: str) -> list[dict[str, str]] | None:
    """A filled wrapper template sent as a whole prompt, as the conversation it stands for.

    A condense prompt holds the conversation so far and the follow-up; read as turns,
    ``recent_user`` and ``conversation`` routing reads it as it reads the chat turns
    the engine sends next, so condensing and answering share one decision. None when
    ``text`` is not such a template.
    """
    match = _match(text)
    if match is None:
        return None
    history = match.groupdict().get("h")
    turns = _history_turns(history) if history else []
    return [*turns, {"role": "user", "content": match.group("q").strip()}]
