"""LangChain messages in the core's words, and streamed items as message chunks.

The core routes on prompts of ``[{"role", "content"}]`` dicts; these functions turn
LangChain inputs into that form, and turn what an expert streams into
``AIMessageChunk`` s (an expert that cannot stream yields its whole message). They are
public so that programs built on the adapter (the ``torouter serve`` endpoint) route
and stream exactly as ``ChatTORouter`` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}


def messages_to_prompt(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the core's ``[{"role", "content"}]`` prompt (content blocks kept as they are)."""
    prompt = []
    for message in messages:
        if isinstance(message, ChatMessage):
            role = "system" if message.role == "developer" else message.role
        else:
            role = _ROLES.get(message.type, message.type)
        prompt.append({"role": role, "content": message.content})
    return prompt


def to_prompt(value: Any) -> str | list[dict[str, Any]]:
    """A LangChain model input (string, prompt value, message or message list) as a core prompt."""
    if isinstance(value, str):
        return value
    if isinstance(value, PromptValue):
        messages = value.to_messages()
    elif isinstance(value, BaseMessage):
        messages = [value]
    elif isinstance(value, Mapping):
        raise ValueError("cannot route on a dict input; set input_key to the key that holds the text")
    elif isinstance(value, Sequence):
        messages = convert_to_messages(value)
    else:
        raise TypeError(f"cannot route on a {type(value).__name__}; expected a string, prompt value or messages")
    if not messages:
        raise ValueError("got an empty message list: there is nothing to route on")
    return messages_to_prompt(messages)


def as_chunk(item: Any) -> AIMessageChunk:
    """A streamed item as a message chunk: a chat model that cannot stream yields its whole ``AIMessage``."""
    if isinstance(item, AIMessageChunk):
        return item
    if isinstance(item, AIMessage):
        calls = [{"name": c["name"], "args": json.dumps(c.get("args") or {}), "id": c.get("id"), "index": i,
                  "type": "tool_call_chunk"} for i, c in enumerate(item.tool_calls)]
        return AIMessageChunk(content=item.content, additional_kwargs=item.additional_kwargs,
                              response_metadata=item.response_metadata, usage_metadata=item.usage_metadata,
                              id=item.id, tool_call_chunks=calls)
    raise TypeError(f"the expert's stream yielded a {type(item).__name__}, not a message chunk")


__all__ = ["as_chunk", "messages_to_prompt", "to_prompt"]
