"""Capture the prompts an application routes, as training prompts for its own router.

Opt-in: a ``PromptCapture`` given to ``torouter serve`` (the ``capture:`` config key),
``ChatTORouter`` or ``TORouterLLM`` (their ``capture`` field) appends one JSON line per
routed request to a file that ``torouter prepare --prompts`` reads as is::

    {"id": "cap-...", "prompt": "..." | [{"role": "user", "content": "..."}],
     "task": "...", "captured_at": "2026-12-03T18:00:00Z", "source": "serve", "routed_to": "gpt-4o-mini"}

What is written is only what routing needs: the prompt's roles and text (images,
tool-call payloads and other message keys are dropped), the expert chosen, and the
answer only with ``include_answers=True``. Every text goes through the project's
``Redactor`` (credentials revealed in this process, credential-like environment values,
URL passwords, key-like strings), then through ``patterns`` (regular expressions, for
e-mail addresses, account numbers, ...); ``metadata`` keys named in ``redact`` are
masked, other metadata is kept under ``metadata`` only when ``keep_metadata`` is set.
Each line is written with one ``write`` on a file opened for appending, so concurrent
requests (and processes) never interleave lines.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .credentials import MASK, Redactor
from .data import Prompt, content_text

_ROLES = {"human": "user", "ai": "assistant"}


class PromptCapture:
    """Appends the prompts routed through an application to a JSONL prompts file."""

    def __init__(self, path: str | os.PathLike, *, include_answers: bool = False, redact: Iterable[str] = (),
                 patterns: Iterable[str] = (), task: str | None = None, keep_metadata: bool = False,
                 source: str | None = None):
        self.path = Path(path)
        self.include_answers = include_answers
        self.redact_fields = {str(f).lower() for f in redact}
        try:
            self.patterns = [re.compile(p) for p in patterns]
        except re.error as exc:
            raise ValueError(f"capture: bad redaction pattern {exc.pattern!r}: {exc}") from None
        self.task = task
        self.keep_metadata = keep_metadata
        self.source = source
        self._redactor = Redactor()
        self._lock = threading.Lock()
        self.captured = 0
        self.errors = 0
        self.last_error: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"capture: cannot create the folder of {self.path} ({exc.strerror or exc})") from None

    def __repr__(self) -> str:
        return f"PromptCapture({str(self.path)!r}, include_answers={self.include_answers})"

    # --- what is written ----------------------------------------------------------------
    def mask(self, text: str) -> str:
        """``text`` with secrets and the configured patterns masked."""
        text = self._redactor(text)
        for pattern in self.patterns:
            text = pattern.sub(MASK, text)
        return text

    def clean_prompt(self, prompt: Prompt) -> Prompt:
        """The prompt as routing data holds it, masked: text for a lone user turn, else
        ``{role, content}`` messages."""
        if isinstance(prompt, str):
            return self.mask(prompt)
        messages = []
        for message in prompt:
            if isinstance(message, Mapping):
                role = str(message.get("role", "user"))
                content = content_text(message.get("content", ""))
            else:  # a LangChain / LlamaIndex message object
                role = str(getattr(message, "type", None) or getattr(message, "role", "user"))
                content = content_text(getattr(message, "content", ""))
            role = _ROLES.get(role, role.split(".")[-1].lower())
            if content.strip():
                messages.append({"role": role, "content": self.mask(content)})
        if len(messages) == 1 and messages[0]["role"] == "user":
            return messages[0]["content"]  # a lone user turn is plain text, as the importers write it
        return messages

    def _metadata(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in metadata.items():
            if str(key).lower() in self.redact_fields:
                out[str(key)] = MASK
            elif isinstance(value, str):
                out[str(key)] = self.mask(value)
            elif isinstance(value, (int, float, bool)) or value is None:
                out[str(key)] = value
            elif isinstance(value, Mapping):
                out[str(key)] = self._metadata(value)
        return out

    def entry(self, prompt: Prompt, *, expert: str | None = None, answer: str | None = None,
              task: str | None = None, metadata: Mapping[str, Any] | None = None,
              source: str | None = None) -> dict[str, Any] | None:
        """The line one routed request becomes (None when the prompt has no text)."""
        cleaned = self.clean_prompt(prompt)
        if not cleaned or (isinstance(cleaned, str) and not cleaned.strip()):
            return None
        line: dict[str, Any] = {"id": f"cap-{uuid.uuid4().hex[:20]}", "prompt": cleaned}
        task = task if task is not None else (metadata or {}).get("task", self.task)
        if isinstance(task, str) and task:
            line["task"] = task
        line["captured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.source or source:
            line["source"] = self.source or source  # the capture's own label wins over the caller's
        if expert:
            line["routed_to"] = expert
        if self.include_answers and answer is not None:
            line["answer"] = self.mask(answer)
        if self.keep_metadata and metadata:
            line["metadata"] = self._metadata({k: v for k, v in metadata.items() if k != "task"})
        return line

    # --- writing ------------------------------------------------------------------------
    def record(self, prompt: Prompt, decision: Any = None, *, expert: str | None = None, answer: str | None = None,
               task: str | None = None, metadata: Mapping[str, Any] | None = None,
               source: str | None = None) -> dict[str, Any] | None:
        """Append one routed request; ``decision`` (a ``torouter.policy.Decision``) gives the expert.

        Returns the line written. A capture that cannot write (a full disk) never fails the
        request it records: the error is counted in ``errors`` and the line is dropped.
        """
        if expert is None and decision is not None:
            expert = getattr(decision, "expert", None)
        line = self.entry(prompt, expert=expert, answer=answer, task=task, metadata=metadata, source=source)
        if line is None:
            return None
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.errors += 1
                self.last_error = f"{self.path}: {exc.strerror or exc}"
                return None
            self.captured += 1
        return line


def as_capture(value: PromptCapture | str | os.PathLike | None, source: str | None = None) -> PromptCapture | None:
    """A ``PromptCapture`` from an adapter's ``capture`` setting: the object, or a path (defaults)."""
    if value is None or isinstance(value, PromptCapture):
        return value
    if isinstance(value, (str, os.PathLike)):
        return PromptCapture(value, source=source)
    raise TypeError(f"capture must be a PromptCapture or a file path, not {type(value).__name__}")
