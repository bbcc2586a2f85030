"""A durable SQLite (WAL) cache of expert calls and scores.

Every finished call is committed before it counts as done, keyed by expert name,
expert settings and prompt hash, so a run killed at any point (``kill -9`` included)
and started again redoes no finished call and loses none. Each write is its own
transaction; with ``durable=False`` (the default) SQLite's ``synchronous=NORMAL``
survives a killed process, ``durable=True`` (``synchronous=FULL``) also survives
power loss at the price of an fsync per call.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1"
_CHUNK = 500  # keys per IN (...) query, under SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    expert TEXT NOT NULL,
    settings TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    ok INTEGER NOT NULL,
    result TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_expert ON calls (expert);
CREATE TABLE IF NOT EXISTS scores (
    call_key TEXT NOT NULL,
    scorer TEXT NOT NULL,
    score REAL,
    PRIMARY KEY (call_key, scorer)
);
"""


class CacheError(RuntimeError):
    """The cache file cannot be used (not a database, another schema, locked)."""


def canonical_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def call_key(expert: str, settings_hash: str, prompt_hash: str) -> str:
    return hashlib.sha256(f"{expert}\0{settings_hash}\0{prompt_hash}".encode()).hexdigest()


class CallCache:
    def __init__(self, path: str | os.PathLike, durable: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise CacheError(f"{self.path}: cache schema {row[0]}, this torouter reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path}: not a usable cache ({exc})") from None

    # --- calls ------------------------------------------------------------------------
    def put(self, key: str, expert: str, settings: str, prompt_hash: str, result: dict[str, Any]) -> None:
        """Commit one finished call (a success or a recorded failure)."""
        self._db.execute(
            "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, expert, settings, prompt_hash, 1 if result.get("ok") else 0,
             json.dumps(result, ensure_ascii=False, allow_nan=False), time.time()))

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i:i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, result in self._db.execute(f"SELECT key, result FROM calls WHERE key IN ({marks})", chunk):
                found[key] = json.loads(result)
        return found

    def count(self, expert: str | None = None, ok: bool | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM calls WHERE 1=1", []
        if expert is not None:
            sql += " AND expert = ?"
            args.append(expert)
        if ok is not None:
            sql += " AND ok = ?"
            args.append(1 if ok else 0)
        return int(self._db.execute(sql, args).fetchone()[0])

    # --- scores -----------------------------------------------------------------------
    def get_scores(self, scorer: str, keys: Sequence[str]) -> dict[str, float | None]:
        found: dict[str, float | None] = {}
        keys = list(dict.fromkeys(keys))
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i:i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT call_key, score FROM scores WHERE scorer = ? AND call_key IN ({marks})", [scorer, *chunk])
            found.update(rows)
        return found

    def put_scores(self, scorer: str, scores: dict[str, float | None]) -> None:
        """Commit a batch of scores in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)",
                                 [(key, scorer, value) for key, value in scores.items()])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CallCache({str(self.path)!r})"
