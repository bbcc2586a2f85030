"""Routing data: one record per prompt, every expert's answer scored.

The on-disk format is JSON Lines; each line is one record::

    {"id": "arc-17", "prompt": "text" | [{"role": "user", "content": "..."}],
     "reference": "...", "task": "...",
     "responses": {"<expert>": {"score": 0.83, "cost": 0.0012, "text": "...",
                                "latency_s": 1.2, "input_tokens": 10,
                                "output_tokens": 50, "nll": 1.7}}}

An expert missing from ``responses``, or with ``score: null``, is *unobserved* for
that record: it is masked out of training and evaluation there, never read as 0.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Prompt = str | list[dict[str, Any]]

_RESPONSE_NUMBERS = ("score", "cost", "latency_s", "input_tokens", "output_tokens", "nll")


class DataError(ValueError):
    """Bad routing data; the message names the file and line."""


class OutputPathError(ValueError):
    """A file or folder torouter was asked to write cannot be written there; the message says why."""


@dataclass
class Record:
    """One prompt and what every expert answered to it."""

    id: str
    prompt: Prompt
    responses: dict[str, dict[str, Any]]
    reference: str | None = None
    task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "prompt": self.prompt}
        if self.reference is not None:
            out["reference"] = self.reference
        if self.task is not None:
            out["task"] = self.task
        out["responses"] = self.responses
        out.update(self.extra)
        return out


def prompt_text(prompt: Prompt, route_on: str = "conversation") -> str:
    """The text a router reads for a prompt.

    ``last_user`` reads the latest user message alone; ``conversation`` reads every
    system and user message, oldest first (a plain string is itself either way).
    Non-text content blocks (images) are skipped.
    """
    if isinstance(prompt, str):
        return prompt
    if route_on not in ("last_user", "conversation"):
        raise ValueError(f"route_on must be 'last_user' or 'conversation', not {route_on!r}")
    texts = []
    for message in prompt:
        role = message.get("role", "user")
        if role not in ("user", "human", "system"):
            continue
        text = content_text(message.get("content", ""))
        if not text.strip():
            continue
        if route_on == "last_user":
            if role in ("user", "human"):
                texts = [text]
        else:
            texts.append(text)
    return "\n".join(texts)


def content_text(content: Any) -> str:
    """The text parts of a message's content (a string or a list of content blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
        return "\n".join(p for p in parts if p)
    return ""


def _fail(where: str, message: str) -> DataError:
    return DataError(f"{where}: {message}")


def check_id_and_prompt(obj: Any, where: str) -> tuple[str, Prompt]:
    """Validate the two fields every prompts or routing-data line needs."""
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        raise _fail(where, "missing 'id'")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise _fail(where, f"'id' must be a string, got {type(rid).__name__}")
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _fail(where, "empty 'prompt'")
    elif isinstance(prompt, list) and prompt:
        for i, message in enumerate(prompt):
            if not isinstance(message, dict) or "content" not in message:
                raise _fail(where, f"prompt message {i} must be an object with 'role' and 'content'")
    else:
        raise _fail(where, "missing 'prompt' (a string or a non-empty list of messages)")
    return str(rid), prompt


def validate_record(obj: Any, where: str) -> Record:
    """Check one parsed JSON object against the routing-data format."""
    rid, prompt = check_id_and_prompt(obj, where)
    responses = obj.get("responses")
    if not isinstance(responses, dict) or not responses:
        raise _fail(where, "missing 'responses' (an object mapping expert names to responses)")
    for expert, response in responses.items():
        if not isinstance(response, dict):
            raise _fail(where, f"response of expert {expert!r} must be an object")
        for key in _RESPONSE_NUMBERS:
            value = response.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _fail(where, f"expert {expert!r}: {key} must be a number, got {value!r}")
            if math.isnan(value) or math.isinf(value):
                raise _fail(where, f"expert {expert!r}: {key} is {value}")
            if value < 0:
                raise _fail(where, f"expert {expert!r}: negative {key} {value}")
        score = response.get("score")
        if score is not None and not 0.0 <= score <= 1.0:
            raise _fail(where, f"expert {expert!r}: score {score} outside [0, 1]")
        if score is not None and response.get("cost") is None:
            raise _fail(where, f"expert {expert!r}: a scored response needs 'cost'")
    for key in ("reference", "task"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise _fail(where, f"'{key}' must be a string")
    known = {"id", "prompt", "reference", "task", "responses"}
    return Record(
        id=rid,
        prompt=prompt,
        responses=responses,
        reference=obj.get("reference"),
        task=obj.get("task"),
        extra={k: v for k, v in obj.items() if k not in known},
    )


def iter_json_objects(path: str | os.PathLike) -> Iterator[tuple[Any, str]]:
    """Parsed JSON objects of a JSONL file (UTF-8, a byte order mark allowed) with their ``file:line``."""
    path = Path(path)
    count = 0
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a JSONL file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        for lineno, raw in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _fail(where, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of "
                                   "the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise _fail(where, f"malformed JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise _fail(where, "JSON nested too deeply to read") from None
            except ValueError as exc:
                raise _fail(where, str(exc)) from None
            count += 1
            yield obj, where
    if count == 0:
        raise DataError(f"{path}: empty file (no records)")


def iter_jsonl(path: str | os.PathLike) -> Iterator[Record]:
    """Stream validated routing records from a JSONL file."""
    seen: set[str] = set()
    for obj, where in iter_json_objects(path):
        record = validate_record(obj, where)
        if record.id in seen:
            raise _fail(where, f"duplicate id {record.id!r}")
        seen.add(record.id)
        yield record


def iter_prompts(path: str | os.PathLike) -> Iterator[tuple[str, Prompt]]:
    """``(id, prompt)`` pairs of a prompts or routing-data JSONL file (responses not needed)."""
    seen: set[str] = set()
    for obj, where in iter_json_objects(path):
        rid, prompt = check_id_and_prompt(obj, where)
        if rid in seen:
            raise _fail(where, f"duplicate id {rid!r}")
        seen.add(rid)
        yield rid, prompt


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def check_writable(path: str | os.PathLike, folder: bool = False) -> None:
    """Fail now, before any work is spent, if ``path`` cannot be written the way ``atomic_write``
    (or, with ``folder``, a router's ``save``) writes it: a temp file beside it, renamed into place.

    Missing parent folders are created, as writing would create them.
    """
    path = Path(path)
    if path.is_dir() and not folder:
        raise OutputPathError(f"{path}: cannot write there: it is a folder")
    if path.exists() and not path.is_dir() and folder:
        raise OutputPathError(f"{path}: cannot write there: it is a file, not a folder")
    ancestor = path.parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise OutputPathError(f"{path}: cannot write there: {ancestor} is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot write there ({exc.strerror or exc})") from None


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(handle)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[Record | dict[str, Any]]) -> int:
    """Write records (or plain dicts) as JSON Lines, all or nothing. Returns the count."""
    count = 0

    def write(handle):
        nonlocal count
        for row in rows:
            obj = row.to_json() if isinstance(row, Record) else row
            handle.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
            count += 1

    atomic_write(path, write)
    return count


class RoutingDataset:
    """Records plus dense ``(n_prompts, n_experts)`` views used for training and evaluation.

    ``scores``, ``costs``, ``nll`` and ``latency`` hold NaN where a value is unobserved;
    ``mask`` is True where the expert's score is observed.
    """

    def __init__(self, records: Sequence[Record], experts: Sequence[str] | None = None):
        if not records:
            raise DataError("a routing dataset needs at least one record")
        self.records = list(records)
        if experts is None:
            names: dict[str, None] = {}
            for record in self.records:
                for name in record.responses:
                    names.setdefault(name, None)
            experts = list(names)
        self.experts = list(experts)
        index = {name: j for j, name in enumerate(self.experts)}
        shape = (len(self.records), len(self.experts))
        self.scores = np.full(shape, np.nan)
        self.costs = np.full(shape, np.nan)
        self.nll = np.full(shape, np.nan)
        self.latency = np.full(shape, np.nan)
        self.output_tokens = np.full(shape, np.nan)
        for i, record in enumerate(self.records):
            for name, response in record.responses.items():
                j = index.get(name)
                if j is None or response.get("score") is None:
                    continue
                self.scores[i, j] = response["score"]
                self.costs[i, j] = response["cost"]
                for key, arr in (("nll", self.nll), ("latency_s", self.latency),
                                 ("output_tokens", self.output_tokens)):
                    if response.get(key) is not None:
                        arr[i, j] = response[key]
        self.mask = ~np.isnan(self.scores)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, experts: Sequence[str] | None = None) -> RoutingDataset:
        return cls(list(iter_jsonl(path)), experts)

    def to_jsonl(self, path: str | os.PathLike) -> int:
        return write_jsonl(path, self.records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def texts(self, route_on: str = "conversation") -> list[str]:
        return [prompt_text(r.prompt, route_on) for r in self.records]

    def mean_costs(self) -> np.ndarray:
        """Each expert's mean cost per query where observed (NaN if never observed)."""
        return _masked_mean(self.costs, self.mask)

    def mean_scores(self) -> np.ndarray:
        """Each expert's mean score where observed (NaN if never observed)."""
        return _masked_mean(self.scores, self.mask)

    def subset(self, indices: Sequence[int] | np.ndarray) -> RoutingDataset:
        return RoutingDataset([self.records[i] for i in indices], self.experts)

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[RoutingDataset, RoutingDataset]:
        """A seeded random train/test split."""
        if not 0 < test_fraction < 1:
            raise ValueError("test_fraction must be in (0, 1)")
        order = np.random.default_rng(seed).permutation(len(self))
        n_test = max(1, int(round(len(self) * test_fraction)))
        return self.subset(sorted(order[n_test:])), self.subset(sorted(order[:n_test]))


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    counts = mask.sum(axis=0)
    totals = np.where(mask, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
