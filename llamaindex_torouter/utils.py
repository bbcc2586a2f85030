"""Message conversion between LlamaIndex and the torouter core.

LlamaIndex chat messages become the core's ``[{"role", "content"}]`` prompt (text
blocks only; LlamaIndex's own wrapper prompts reduced to the user's words), the
routing decision a response carries is taken back out before messages reach an
expert, and a filled template is reduced to its query for the router to read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole, TextBlock
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM

from torouter.policy import METADATA_KEY

from .templates import question_in_template


def supports_tools(llm: LLM) -> bool:
    """Whether an expert can take part in function calling."""
    return isinstance(llm, FunctionCallingLLM) and bool(llm.metadata.is_function_calling_model)


def message_text(message: ChatMessage) -> str:
    return "\n".join(b.text for b in message.blocks if isinstance(b, TextBlock) and b.text)


def messages_to_prompt(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as the core's ``[{"role", "content"}]`` prompt; only text blocks are kept.

    A user turn that is one of LlamaIndex's own wrappers around the user's words (an
    agent's state prompt, a chat engine's condense prompt) is reduced to those words.
    """
    prompt = []
    for message in messages:
        if not isinstance(message, ChatMessage):
            raise TypeError(f"expected llama_index ChatMessage objects, got {type(message).__name__}")
        role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
        if role == MessageRole.DEVELOPER.value:
            role = "system"
        text = message_text(message)
        if role == MessageRole.USER.value:
            text = question_in_template(text)
        prompt.append({"role": role, "content": text})
    return prompt


def without_metadata(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The messages with this router's decision taken out of ``additional_kwargs``.

    Responses carry the decision on their message, and agents and chat memories send
    those messages back; experts must not receive it (OpenAI-style clients copy
    ``additional_kwargs`` into the request, and completion prompts print it).
    """
    cleaned = []
    for message in messages:
        if isinstance(message, ChatMessage) and METADATA_KEY in message.additional_kwargs:
            kwargs = {k: v for k, v in message.additional_kwargs.items() if k != METADATA_KEY}
            message = message.model_copy(update={"additional_kwargs": kwargs})
        cleaned.append(message)
    return cleaned


def query_prompt(messages: Sequence[ChatMessage], query: str) -> list[ChatMessage]:
    """What the router reads for a filled template whose query is known.

    The template's system text (instructions, retrieved context) is left out, the user
    message holding the query becomes the query alone, and earlier user and assistant
    turns (a chat engine's history) are kept for ``recent_user`` and ``conversation``.
    """
    holder = None
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == MessageRole.USER and query in message_text(messages[i]):
            holder = i
            break
    earlier = messages if holder is None else messages[:holder]
    kept = [m for m in earlier if m.role not in (MessageRole.SYSTEM, MessageRole.DEVELOPER)]
    return [*kept, ChatMessage(role=MessageRole.USER, content=query)]
