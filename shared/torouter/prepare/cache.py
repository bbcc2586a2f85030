"""A durable SQLite (WAL) cache of expert calls and scores.

Every finished call is committed before it counts as done, keyed by expert name,
expert settings and prompt hash, so a run killed at any point (``kill -9`` included)
and started again redoes no finished call and loses none. Each write is its own
transaction; with ``durable=False`` (the default) SQLite's ``synchronous=NORMAL``
survives a killed process, ``durable=True`` (``synchronous=FULL``) also survives
power loss at the price of an fsync per call.

One process at a time: an open cache holds an OS file lock on ``<cache>.lock`` beside
it, and a second ``torouter prepare`` on the same cache refuses at once, naming the
process that holds it, instead of making every call a second time. The lock goes with
the process (``kill -9`` included), so a stale lock file blocks nothing; the file itself
stays. Every SQLite failure (a damaged file, a full disk) is a ``CacheError`` that
names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
    """The cache file cannot be used (not a database, damaged, full, another schema, in use)."""


def _explain(path: Path, exc: BaseException, doing: str) -> str:
    """What went wrong with the cache file and what to do about it."""
    text = str(exc)
    low = text.lower()
    if "not a database" in low:
        return (f"{path}: not a torouter cache ({text}); give another --cache, or move the file aside "
                "if it was a cache that got damaged (its calls will then be made again)")
    if "malformed" in low or isinstance(exc, ValueError):
        return (f"{path}: the cache file is damaged ({text}); move it aside and run again (its calls will "
                f"be made again), or first salvage what it holds with the sqlite3 shell: "
                f"sqlite3 {path} .recover | sqlite3 {path}.recovered")
    if "full" in low:
        return f"{path}: cannot save to the cache: {text}"
    if "readonly" in low or "read-only" in low:
        return f"{path}: cannot write the cache ({text}); check the permissions of the file and its folder"
    if "unable to open" in low:
        return f"{path}: cannot open the cache ({text}); check that its folder exists and is writable"
    if "locked" in low:
        return f"{path}: the cache is locked by another program ({text}); close it and run again"
    return f"{path}: cache error while {doing}: {text}"


def canonical_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: JSON has no such numbers (a missing measurement)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def call_key(expert: str, settings_hash: str, prompt_hash: str) -> str:
    return hashlib.sha256(f"{expert}\0{settings_hash}\0{prompt_hash}".encode()).hexdigest()


class CacheLock:
    """An exclusive OS lock on ``<cache>.lock``, held while a cache is open for a run."""

    def __init__(self, cache_path: Path):
        from filelock import FileLock

        self.cache_path = cache_path
        self.path = cache_path.with_name(cache_path.name + ".lock")
        self._lock = FileLock(str(self.path), timeout=0)

    def acquire(self) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise CacheError(
                f"{self.cache_path}: in use by another torouter process ({_holder(self.cache_path)}); two runs on "
                "one cache would make every call twice. Wait for it to finish, or give this run another --cache"
            ) from None
        except OSError as exc:
            raise CacheError(f"{self.cache_path}: cannot create the lock file {self.path} ({exc.strerror or exc})"
                             ) from None

    def release(self) -> None:
        self._lock.release()


def _holder(path: Path) -> str:
    """Who holds the cache, as the holder recorded it in the cache itself."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as db:
            row = db.execute("SELECT v FROM meta WHERE k = 'holder'").fetchone()
    except sqlite3.Error:
        row = None
    return row[0] if row else "holder unknown"


class CallCache:
    """The call and score cache of one run; ``lock=False`` opens it without the run lock
    (only to read a cache no run is writing)."""

    def __init__(self, path: str | os.PathLike, durable: bool = False, lock: bool = True):
        self.path = Path(path)
        self._connection: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"{self.path}: cannot create its folder ({exc.strerror or exc})") from None
        self._lock = CacheLock(self.path) if lock else None
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._open(durable)
        except BaseException:
            self.close()
            raise

    def _open(self, durable: bool) -> None:
        if self.path.is_file() and self.path.stat().st_size == 0:
            log.warning("%s is empty (0 bytes): starting a new cache there; every call will be made, "
                        "including any this file held before it was emptied", self.path)
        with self._guard("opening it"):
            self._connection = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise CacheError(f"{self.path}: cache schema {row[0]}, this torouter reads {SCHEMA_VERSION}")
            # Damage anywhere in the file is found now, before any call is paid for.
            problem = self._db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {problem}")
            if self._lock is not None:
                holder = (f"pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('holder', ?)", (holder,))

    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """SQLite errors (and undecodable rows) as a CacheError naming the file and what to do."""
        try:
            yield
        except sqlite3.Error as exc:
            raise CacheError(_explain(self.path, exc, doing)) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(_explain(self.path, ValueError(f"a cached call is unreadable: {exc}"), doing)
                             ) from None

    @property
    def _db(self) -> sqlite3.Connection:
        """The open connection (the cache is opened in ``__init__``; ``close`` ends it)."""
        if self._connection is None:
            raise CacheError(f"{self.path}: the cache is closed")
        return self._connection

    # --- calls ------------------------------------------------------------------------
    def put(self, key: str, expert: str, settings: str, prompt_hash: str, result: dict[str, Any]) -> None:
        """Commit one finished call (a success or a recorded failure)."""
        row = (key, expert, settings, prompt_hash, 1 if result.get("ok") else 0,
               json.dumps(_finite(result), ensure_ascii=False, allow_nan=False), time.time())
        with self._guard("saving a call"):
            self._db.execute("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, dict[str, Any]] = {}
        with self._guard("reading calls"):
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, result in self._db.execute(f"SELECT key, result FROM calls WHERE key IN ({marks})", chunk):
                    found[key] = json.loads(result)
        return found

    def count(self, expert: str | None = None, ok: bool | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM calls WHERE 1=1", list[str | int]()
        if expert is not None:
            sql += " AND expert = ?"
            args.append(expert)
        if ok is not None:
            sql += " AND ok = ?"
            args.append(1 if ok else 0)
        with self._guard("counting calls"):
            return int(self._db.execute(sql, args).fetchone()[0])

    # --- scores -----------------------------------------------------------------------
    def get_scores(self, scorer: str, keys: Sequence[str]) -> dict[str, float | None]:
        found: dict[str, float | None] = {}
        keys = list(dict.fromkeys(keys))
        with self._guard("reading scores"):
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT call_key, score FROM scores WHERE scorer = ? AND call_key IN ({marks})",
                    [scorer, *chunk])
                found.update(rows)
        return found

    def put_scores(self, scorer: str, scores: Mapping[str, float | None]) -> None:
        """Commit a batch of scores in one transaction."""
        with self._guard("saving scores"), self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)",
                                 [(key, scorer, value) for key, value in scores.items()])

    def merge(self, other: str | os.PathLike) -> int:
        """Copy the calls and scores of another cache file (a Ray worker's shard) into this one, in one
        transaction; returns the calls copied. Rows of ``other`` replace rows with the same key."""
        with self._guard("merging a shard"):
            self._db.execute("ATTACH DATABASE ? AS shard", (str(other),))
            try:
                with self._db:
                    self._db.execute("BEGIN")
                    copied = self._db.execute("INSERT OR REPLACE INTO calls SELECT * FROM shard.calls").rowcount
                    self._db.execute("INSERT OR REPLACE INTO scores SELECT * FROM shard.scores")
            finally:
                self._db.execute("DETACH DATABASE shard")
        return int(copied)

    def close(self) -> None:
        try:
            if self._connection is not None:
                if self._lock is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._connection.execute("DELETE FROM meta WHERE k = 'holder'")
                self._connection.close()
                self._connection = None
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CallCache({str(self.path)!r})"
