"""What the router reads: the user's question, never retrieved context, tool output or a summary.

A router is trained on prompts and predicts from the text it is given, so giving it the
right text matters as much as the router itself. Inside applications the request an
expert sees is rarely the bare question:

- RAG templates wrap the question in retrieved context (LlamaIndex's default QA template
  puts hundreds of words of context before ``Query: ...``; LangChain's RAG prompts put
  ``Context: ...`` around ``Question: ...``). Routing on that text routes on the context.
- Agents add tool results (``tool`` messages, or ReAct ``Observation:`` turns written as
  user messages) and conversation summaries (LangChain's ``SummarizationMiddleware``).
- A shared system prompt (a persona, RAG instructions) is the same for every request.

:func:`routing_text` picks the text once, for every adapter and the endpoint, by one of
the :data:`ROUTE_ON` modes or a callable, keeping the newest text when it must cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union, get_args

from .data import Prompt, content_text

RouteOnMode = Literal["last_user", "recent_user", "conversation"]
"""Built-in choices of the text to route on; see :func:`routing_text`."""

ROUTE_ON: tuple[str, ...] = get_args(RouteOnMode)

RouteOn = Union[RouteOnMode, Callable[[Prompt], str]]
"""A :data:`ROUTE_ON` mode, or a callable that takes the prompt and returns the text to route on."""

MAX_CHARS = 2000
"""How much text joined from several messages the router reads (MiniLM reads ~256 tokens)."""

RECENT_TURNS = 3
"""How many user turns ``recent_user`` reads."""

_USER_ROLES = ("user", "human")

# A ReAct tool result written as a user turn (LlamaIndex ``ReActAgent``, classic LangChain agents).
_OBSERVATION = re.compile(r"^\s*observation\s*:", re.IGNORECASE)
# Conversation summaries that replace older turns.
_SUMMARY = re.compile(
    r"^\s*(here is a summary of the conversation to date|summary of the (earlier |previous )?conversation|"
    r"previous conversation summary|conversation summary)\s*:?",
    re.IGNORECASE)
# Retrieved context inside a filled template.
_CONTEXT = re.compile(
    r"context information is below|(^|\n)\s*(new context|context|retrieved context|documents?|sources?|passages?)\s*:|"
    r"<context>|following (pieces of )?(retrieved )?context|-{5,}", re.IGNORECASE)
# Where the question starts in a filled template, and where a section after it starts.
_QUESTION = re.compile(
    r"(^|\n)[ \t]*(the original query is as follows|user question|user query|question|query|q)[ \t]*:[ \t]*",
    re.IGNORECASE)
_AFTER_QUESTION = re.compile(
    r"\n[ \t]*(context( information)?|new context|answer|helpful answer|original answer|new answer|a|sources?|documents?"
    r"|we have provided an existing answer|existing answer)[ \t]*:|\n[ \t]*-{5,}|\n[ \t]*<context>|\n[ \t]*context information is below",
    re.IGNORECASE)


def is_observation(text: str) -> bool:
    """Whether a user-role message is a ReAct tool observation rather than the user's words."""
    return bool(_OBSERVATION.match(text))


def is_summary(text: str) -> bool:
    """Whether a message is a conversation summary written by a memory or middleware."""
    return bool(_SUMMARY.match(text))


def question_of(text: str) -> str:
    """The question inside a filled RAG template, or ``text`` itself when it holds no retrieved context.

    A template is recognised by a context marker (``Context information is below``,
    ``Context:``, ``<context>``, a ``-----`` separator, ...) together with a question
    marker at the start of a line (``Query:``, ``Question:``, ``The original query is as
    follows:``). The question is the text after the last question marker, up to the next
    section (``Answer:``, ``Context:``, a separator). Prompts without context, such as
    few-shot ``Question: ... Answer: ...`` blocks, are returned unchanged so routing reads
    them as the router was trained.
    """
    if not _CONTEXT.search(text):
        return text
    markers = list(_QUESTION.finditer(text))
    for marker in reversed(markers):
        rest = text[marker.end():]
        end = _AFTER_QUESTION.search("\n" + rest)
        question = (rest if end is None else rest[:max(end.start() - 1, 0)]).strip()
        if question:
            return question
    return text


def user_turns(prompt: Sequence[dict[str, Any]]) -> list[str]:
    """The user's own turns, oldest first: no tool results, observations or summaries; questions out of RAG templates."""
    turns = []
    for message in prompt:
        if message.get("role", "user") not in _USER_ROLES:
            continue
        text = content_text(message.get("content", "")).strip()
        if text and not is_observation(text) and not is_summary(text):
            turns.append(question_of(text))
    return turns


def system_text(prompt: Sequence[dict[str, Any]]) -> list[str]:
    """Text of the system (and developer) messages, oldest first."""
    texts = []
    for message in prompt:
        if message.get("role") in ("system", "developer"):
            text = content_text(message.get("content", "")).strip()
            if text and not is_summary(text):
                texts.append(text)
    return texts


def newest_within(parts: Sequence[str], max_chars: int) -> list[str]:
    """The newest parts whose joined length fits ``max_chars`` (always the newest one), oldest first."""
    kept: list[str] = []
    size = 0
    for part in reversed(parts):
        if kept and size + len(part) + 1 > max_chars:
            break
        kept.append(part)
        size += len(part) + 1
    return kept[::-1]


def routing_text(prompt: Prompt, route_on: RouteOn = "last_user", *, max_chars: int = MAX_CHARS,
                 recent_turns: int = RECENT_TURNS) -> str:
    """The text the router reads for ``prompt`` (a string or ``[{"role", "content"}]`` messages).

    ``route_on`` is one of:

    - ``"last_user"``: the latest user turn.
    - ``"recent_user"``: the latest ``recent_turns`` user turns, so a follow-up such as
      "Now make it faster." is routed with the request it follows.
    - ``"conversation"``: the system prompt and every user turn; when the whole is longer
      than ``max_chars`` the system prompt goes first, then the oldest turns.
    - a callable: ``route_on(prompt)`` returns the text.

    In every mode tool results, assistant turns, ReAct ``Observation:`` turns and
    conversation summaries are skipped, and the question is taken out of a filled RAG
    template (:func:`question_of`); a plain string prompt is read through
    :func:`question_of` too. When no user turn is left, the system text is read. An empty
    result means there is nothing to route on.
    """
    if callable(route_on):
        text = route_on(prompt)
        if not isinstance(text, str):
            raise TypeError(f"route_on callable must return a string, got {type(text).__name__}")
        return text
    if route_on not in ROUTE_ON:
        raise ValueError(f"route_on must be one of {ROUTE_ON} or a callable, not {route_on!r}")
    if isinstance(prompt, str):
        return question_of(prompt)
    turns = user_turns(prompt)
    system = system_text(prompt)
    if not turns:
        return "\n".join(newest_within(system, max_chars))
    if route_on == "last_user":
        return turns[-1]
    if route_on == "recent_user":
        return "\n".join(newest_within(turns[-max(recent_turns, 1):], max_chars))
    kept = newest_within(turns, max_chars)
    joined = "\n".join(kept)
    if system and len(kept) == len(turns):
        head = "\n".join(system)
        if len(head) + 1 + len(joined) <= max_chars:
            return head + "\n" + joined
    return joined
