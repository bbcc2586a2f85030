"""Prompts from an application's real traffic: importers, deduplication and a budgeted sample.

The people who want a router have prompts, not references. These functions turn what
they have into a prompts file for ``torouter prepare``:

``read_openai_chat``     OpenAI chat-format JSONL (``{"messages": [...]}`` per line, as used for
                         fine-tuning and by most request logs); a final assistant message is
                         the logged answer, dropped unless ``include_answers``.
``read_langsmith_runs``  a LangSmith run export (the JSON, or JSONL, of a project's runs): the
                         ``llm`` and ``chat_model`` runs, their ``inputs.messages`` (plain or
                         LangChain-serialised) or ``inputs.prompts``.
``dedup_prompts``        drops repeated prompts: the same text up to case, spacing and
                         punctuation, and optionally near-identical ones (word-shingle Jaccard).
``sample_prompts``       ``n`` prompts, stratified by task when the rows have one, so the
                         labelling budget is spread the way the traffic is.

Captured prompts (``torouter.capture``) are already a prompts file; dedup and sampling
apply to them the same way (``torouter prepare --dedup --max-prompts N``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .data import DataError, Prompt, content_text, iter_json_objects, prompt_text

_ROLES = {"human": "user", "ai": "assistant", "humanmessage": "user", "aimessage": "assistant",
          "systemmessage": "system", "toolmessage": "tool", "functionmessage": "function",
          "chatmessage": "user", "humanmessagechunk": "user", "aimessagechunk": "assistant"}
_PUNCT = str.maketrans("", "", string.punctuation)


# --------------------------------------------------------------------------- messages


def _message(obj: Any, where: str) -> dict[str, Any]:
    """``{role, content}`` from an OpenAI message, a LangChain-serialised one or ``[role, text]``."""
    if isinstance(obj, (list, tuple)) and len(obj) == 2 and all(isinstance(x, str) for x in obj):
        role, content = obj
    elif isinstance(obj, Mapping):
        if obj.get("lc") is not None and isinstance(obj.get("kwargs"), Mapping):  # {"lc": 1, "id": [..., "HumanMessage"]}
            kwargs = obj["kwargs"]
            name = (obj.get("id") or ["user"])[-1]
            role = kwargs.get("role") or kwargs.get("type") or name
            content = kwargs.get("content", "")
        elif isinstance(obj.get("data"), Mapping):  # {"type": "human", "data": {"content": ...}}
            role = obj.get("type") or obj["data"].get("type", "user")
            content = obj["data"].get("content", "")
        else:
            role = obj.get("role") or obj.get("type") or "user"
            content = obj.get("content", "")
    else:
        raise DataError(f"{where}: a message must be an object with role and content, got {type(obj).__name__}")
    role = str(role)
    role = _ROLES.get(role.lower(), role.lower())
    return {"role": role, "content": content_text(content)}


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one (optional sections of a log line)."""
    return value if isinstance(value, Mapping) else {}


def _split_answer(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The conversation up to the last answer, and that answer (None when it ends on a user turn)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def _prompt_of(messages: list[dict[str, Any]]) -> Prompt | None:
    """A single user turn as plain text, a conversation as messages; None without any user text."""
    messages = [m for m in messages if m["content"].strip()]
    if not any(m["role"] == "user" for m in messages):
        return None
    if len(messages) == 1:
        return messages[0]["content"]
    return messages


def _row(rid: str, prompt: Prompt, task: Any, answer: str | None, include_answers: bool,
         extra: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"id": rid, "prompt": prompt}
    if isinstance(task, str) and task:
        row["task"] = task
    if include_answers and answer:
        row["answer"] = answer
    row.update(extra)
    return row


# --------------------------------------------------------------------------- importers


def read_openai_chat(paths: Iterable[str | os.PathLike], include_answers: bool = False) -> list[dict[str, Any]]:
    """Prompt rows from OpenAI chat-format JSONL files (``{"messages": [...]}`` per line).

    A line's ``id`` and ``task`` (or ``metadata.task``) are kept; lines with no user text
    are skipped.
    """
    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        for obj, where in iter_json_objects(path):
            if not isinstance(obj, Mapping) or not isinstance(obj.get("messages"), list):
                raise DataError(f"{where}: expected an object with a 'messages' list (OpenAI chat format)")
            messages = [_message(m, f"{where}: messages[{i}]") for i, m in enumerate(obj["messages"])]
            messages, answer = _split_answer(messages)
            prompt = _prompt_of(messages)
            if prompt is None:
                continue
            metadata = _mapping(obj.get("metadata"))
            line = where.rsplit(":", 1)[-1]
            rid = str(obj["id"]) if obj.get("id") not in (None, "") else f"{path.stem}-{line}"
            rows.append(_row(rid, prompt, obj.get("task") or metadata.get("task"), answer, include_answers,
                             {"source": "openai"}))
    return _unique_ids(rows)


def _runs(path: Path) -> Iterator[tuple[Any, str]]:
    """The run objects of a LangSmith export: a JSON list, ``{"runs": [...]}``, or JSONL."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
        yield from ((run, f"{path}: run {i}") for i, run in enumerate(data))
    elif stripped.startswith("{") and "\n{" not in stripped.rstrip():
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
        runs = data.get("runs") if isinstance(data, Mapping) else None
        if not isinstance(runs, list):
            runs = [data]
        yield from ((run, f"{path}: run {i}") for i, run in enumerate(runs))
    else:
        yield from iter_json_objects(path)


def _run_conversations(inputs: Mapping[str, Any], where: str) -> list[list[dict[str, Any]]]:
    """The conversations a run's inputs hold (a batched chat model run holds several)."""
    messages = inputs.get("messages")
    if isinstance(messages, list) and messages:
        batches = messages if all(isinstance(m, list) and not _is_pair(m) for m in messages) else [messages]
        return [[_message(m, f"{where}: inputs.messages") for m in batch] for batch in batches]
    prompts = inputs.get("prompts") or ([inputs["prompt"]] if isinstance(inputs.get("prompt"), str) else None)
    if isinstance(prompts, list):
        return [[{"role": "user", "content": str(p)}] for p in prompts if isinstance(p, str)]
    return []


def _is_pair(value: list) -> bool:
    return len(value) == 2 and all(isinstance(x, str) for x in value)


def _run_answer(outputs: Any) -> str | None:
    """The text a run produced (``generations[0][0].text`` or its message's content)."""
    if not isinstance(outputs, Mapping):
        return None
    generations = outputs.get("generations")
    while isinstance(generations, list) and generations:
        generations = generations[0]
    if isinstance(generations, Mapping):
        if generations.get("text"):
            return str(generations["text"])
        message = generations.get("message")
        if isinstance(message, Mapping):
            return _message(message, "outputs")["content"] or None
    return None


def read_langsmith_runs(paths: Iterable[str | os.PathLike], include_answers: bool = False,
                        run_types: Sequence[str] = ("llm", "chat_model")) -> list[dict[str, Any]]:
    """Prompt rows from LangSmith run exports.

    Only runs whose ``run_type`` is in ``run_types`` are read (chains and tools are the
    same traffic seen from further out). The task is the run's ``extra.metadata.task`` when
    set; the run's ``id`` becomes the prompt id.
    """
    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        for run, where in _runs(path):
            if not isinstance(run, Mapping):
                raise DataError(f"{where}: a run must be a JSON object")
            if run.get("run_type") not in run_types:
                continue
            inputs = run.get("inputs")
            if not isinstance(inputs, Mapping):
                continue
            task = _mapping(_mapping(run.get("extra")).get("metadata")).get("task")
            answer = _run_answer(run.get("outputs"))
            conversations = _run_conversations(inputs, where)
            for i, messages in enumerate(conversations):
                messages, logged = _split_answer(messages)
                prompt = _prompt_of(messages)
                if prompt is None:
                    continue
                base = str(run.get("id") or where.rsplit(" ", 1)[-1])
                rid = base if len(conversations) == 1 else f"{base}#{i}"
                rows.append(_row(rid, prompt, task, logged or (answer if len(conversations) == 1 else None),
                                 include_answers, {"source": "langsmith", **({"run_name": run["name"]}
                                                                             if run.get("name") else {})}))
    return _unique_ids(rows)


def _unique_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, int] = {}
    for row in rows:
        base = row["id"]
        if base in seen:
            seen[base] += 1
            row["id"] = f"{base}#{seen[base]}"
        else:
            seen[base] = 1
    return rows


# --------------------------------------------------------------------------- dedup and sampling


def normalized_text(prompt: Prompt) -> str:
    """The prompt's routed text, lower case, without punctuation, spaces collapsed."""
    text = prompt_text(prompt) if not isinstance(prompt, str) else prompt
    return " ".join(text.lower().translate(_PUNCT).split())


def prompt_fingerprint(prompt: Prompt) -> str:
    return hashlib.sha256(normalized_text(prompt).encode("utf-8")).hexdigest()


def _shingles(text: str, size: int = 3) -> frozenset[str]:
    words = text.split()
    if len(words) <= size:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i:i + size]) for i in range(len(words) - size + 1))


def dedup_prompts(rows: Sequence[Any], similarity: float | None = None) -> tuple[list[Any], int]:
    """``rows`` (dicts or objects with ``prompt``) without repeats, first occurrence kept; returns
    the rows and how many were dropped.

    Two prompts are the same when their normalised text is (``normalized_text``); with
    ``similarity`` (0-1) also when the Jaccard overlap of their word 3-shingles reaches it.
    """
    if similarity is not None and not 0.0 < similarity <= 1.0:
        raise DataError(f"similarity must be in (0, 1], got {similarity}")
    kept: list[Any] = []
    seen: set[str] = set()
    kept_shingles: list[tuple[int, frozenset[str]]] = []
    for row in rows:
        text = normalized_text(row["prompt"] if isinstance(row, Mapping) else row.prompt)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in seen:
            continue
        if similarity is not None:
            shingles = _shingles(text)
            size = len(shingles)
            duplicate = False
            for other_size, other in kept_shingles:
                # |A & B| / |A | B| >= s needs min/max >= s: skip pairs of very different sizes
                if min(size, other_size) < similarity * max(size, other_size):
                    continue
                if len(shingles & other) >= similarity * len(shingles | other):
                    duplicate = True
                    break
            if duplicate:
                continue
            kept_shingles.append((size, shingles))
        seen.add(digest)
        kept.append(row)
    return kept, len(rows) - len(kept)


def sample_prompts(rows: Sequence[Any], n: int, seed: int = 0, task_of=None) -> list[Any]:
    """``n`` rows drawn without replacement, stratified by task (proportional allocation,
    largest remainders; every task gets at least one row when ``n`` allows). Rows keep
    their original order. ``task_of(row)`` defaults to ``row["task"]``."""
    if n < 1:
        raise DataError(f"the number of prompts to sample must be >= 1, got {n}")
    if n >= len(rows):
        return list(rows)
    task_of = task_of or (lambda row: row.get("task") if isinstance(row, Mapping) else getattr(row, "task", None))
    strata: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        strata.setdefault(task_of(row) or "", []).append(i)
    rng = random.Random(seed)
    quotas = {task: n * len(members) / len(rows) for task, members in strata.items()}
    alloc = {task: int(q) for task, q in quotas.items()}
    if n >= len(strata):
        for task in strata:
            alloc[task] = max(alloc[task], 1)
    leftover = n - sum(alloc.values())
    by_remainder = sorted(strata, key=lambda t: (quotas[t] - int(quotas[t]), len(strata[t]), str(t)), reverse=True)
    while leftover > 0:
        for task in by_remainder:
            if leftover and alloc[task] < len(strata[task]):
                alloc[task] += 1
                leftover -= 1
    while leftover < 0:  # minimum-one allocations overshot: take back from the largest strata
        task = max(alloc, key=lambda t: alloc[t])
        alloc[task] -= 1
        leftover += 1
    chosen: list[int] = []
    for task, members in strata.items():
        chosen.extend(rng.sample(members, min(alloc[task], len(members))))
    return [rows[i] for i in sorted(chosen)]


def task_counts(rows: Iterable[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        task = row.get("task") if isinstance(row, Mapping) else getattr(row, "task", None)
        counts[task or "(no task)"] = counts.get(task or "(no task)", 0) + 1
    return counts
