"""Credentials in expert configurations: hidden in reprs, read from the environment, masked in text.

Both the experts manifest (``torouter prepare``) and the server config (``torouter
serve``) take constructor kwargs that may hold API keys, written as ``${VAR}`` so
the key itself never sits in a file. Two rules keep them out of everything torouter
writes or says:

- Every value read from ``${VAR}`` is a secret, whatever its key or variable is
  called: an ``x-api-key`` or ``Authorization`` header, a password inside a URL and an
  ``api_key`` are all credentials, and a name cannot tell them apart from the rest.
  The value is substituted only when the client is built, and from then on every
  ``Redactor`` in the process masks it by value (also URL- and JSON-escaped), in
  error messages, logs, recorded answers and failure records.
- Values written literally under credential-like keys (``api_key``, ``token``,
  ``x-api-key``, ``Authorization``, ``X-Auth-Token``, ...) are wrapped in
  ``SecretStr`` as soon as they are parsed, so reprs, dumps and cache keys show
  ``**********``, and are unwrapped only to build the client. Passwords inside URLs and
  key-like strings (``sk-...``, ``hf_...``, ``Bearer ...``) are masked by pattern.

Values shorter than ``MIN_SECRET_CHARS`` are not masked: a port or a flag read from the
environment would otherwise garble every message, and no credential is that short.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import SecretStr

MIN_SECRET_CHARS = 4
MASK = "***"

SECRET_KEY = re.compile(
    r"(?i)(^|[_\-.])(api[_\-]?key|key|secret|password|passwd|passphrase|token|access[_\-]?token|"
    r"credentials?|authorization|auth|cookie)$")
# Environment variables whose names end like a credential's (OPENAI_API_KEY, HF_TOKEN, ...).
SECRET_ENV_ENDINGS = ("APIKEY", "API_KEY", "TOKEN", "SECRET", "PASSWORD")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Key-like strings that provider error messages sometimes echo back.
KEY_PATTERNS = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{16,}|(?i:bearer)\s+[A-Za-z0-9_\-.=]{8,})")
# The password of ``scheme://user:password@host``.
URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:)[^/\s@]+@")

# Every secret revealed in this process: any Redactor masks all of them, so an error
# raised by one component (a manifest expert served by the endpoint, say) is masked by
# whichever component reports it.
_known: set[str] = set()
_known_lock = threading.Lock()
_version = 0


class MissingEnvironmentVariable(KeyError):
    """A ``${VAR}`` reference to a variable that is not set; ``where`` says which value."""

    def __init__(self, var: str, where: str):
        super().__init__(var)
        self.var, self.where = var, where

    def __str__(self) -> str:
        return f"{self.where}: environment variable {self.var} is not set"


def register_secret(value: str) -> None:
    """Mask ``value`` (and its URL- and JSON-escaped forms) in every Redactor of this process."""
    global _version
    if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
        return
    with _known_lock:
        if value not in _known:
            _known.add(value)
            _version += 1


def _forms(values: Iterable[str]) -> list[str]:
    """Each value plus the escaped forms an error message may carry it in, longest first."""
    forms: set[str] = set()
    for value in values:
        for form in (value, urllib.parse.quote(value, safe=""), urllib.parse.quote(value),
                     urllib.parse.quote_plus(value), json.dumps(value)[1:-1], repr(value)[1:-1]):
            if len(form) >= MIN_SECRET_CHARS:
                forms.add(form)
    return sorted(forms, key=len, reverse=True)


_environment_seen: dict | None = None
_environment_secrets: frozenset[str] = frozenset()


def _environment() -> frozenset[str]:
    """Values of credential-like environment variables (``*_API_KEY``, ``*TOKEN``, ...).

    Client libraries read these themselves (``OPENAI_API_KEY``), so their errors may echo
    them though no ``${VAR}`` named them. Scanned again only when the environment changes.
    """
    global _environment_seen, _environment_secrets
    raw = getattr(os.environ, "_data", None)  # CPython's undecoded copy: cheap to compare
    if isinstance(raw, dict) and raw == _environment_seen:
        return _environment_secrets
    secrets = frozenset(v for k, v in os.environ.items()
                        if k.upper().endswith(SECRET_ENV_ENDINGS) and len(v) >= 6)
    _environment_seen, _environment_secrets = (dict(raw) if isinstance(raw, dict) else None), secrets
    return secrets


def hide_secrets(value: Any, key: str = "") -> Any:
    """Wrap credential-looking string values (recursively, by key name) in ``SecretStr``."""
    if isinstance(value, Mapping):
        return {k: hide_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [hide_secrets(v, key) for v in value]
    if isinstance(value, str) and SECRET_KEY.search(key):
        return SecretStr(value)
    return value


class Redactor:
    """Masks the secrets it was given, every secret revealed in this process, credential-like
    environment values, URL passwords and key-like strings."""

    def __init__(self, secrets: list[str] | None = None):
        self._secrets: set[str] = set()
        self._cache: tuple[Any, list[str]] = ((), [])
        for secret in secrets or []:
            self.add(secret)

    def add(self, secret: str) -> None:
        if isinstance(secret, str) and len(secret) >= MIN_SECRET_CHARS:
            self._secrets.add(secret)
            register_secret(secret)

    def _all_forms(self) -> list[str]:
        environment = _environment()
        state = (_version, len(self._secrets), environment)
        if self._cache[0] != state:
            with _known_lock:
                known = set(_known)
            self._cache = (state, _forms(known | self._secrets | environment))
        return self._cache[1]

    def __call__(self, text: str) -> str:
        for form in self._all_forms():
            if form in text:
                text = text.replace(form, MASK)
        text = URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}@", text)
        return KEY_PATTERNS.sub(MASK, text)

    def mask_values(self, text: str) -> str:
        """Mask only known secret values (and their escaped forms): for a model's answer, where the
        key-like patterns of ``__call__`` would also hit ordinary text."""
        for form in self._all_forms():
            if form in text:
                text = text.replace(form, MASK)
        return text

    def longest(self) -> int:
        """Length of the longest secret form ``mask_values`` looks for."""
        return max((len(form) for form in self._all_forms()), default=0)

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secrets)"


class StreamMasker:
    """Masks known secret values in streamed text, even a secret split across chunks.

    ``feed`` returns the text that is safe to send: everything except a tail one
    character shorter than the longest secret, which may be the start of one; ``flush``
    returns that tail at the end. Any secret lying wholly inside the held text is masked
    before anything is released, so none can straddle what was sent and what was held.
    """

    def __init__(self, redactor: Redactor):
        self.redactor = redactor
        self.pending = ""

    def feed(self, text: str) -> str:
        self.pending = self.redactor.mask_values(self.pending + text)
        hold = max(self.redactor.longest() - 1, 0)
        cut = max(len(self.pending) - hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.redactor.mask_values(self.pending), ""
        return out


def reveal(value: Any, redactor: Redactor, where: str = "kwargs") -> Any:
    """Kwargs ready for a constructor: secrets unwrapped, ``${VAR}`` read from the environment.

    Every unwrapped secret and every value read from the environment is handed to
    ``redactor`` (and so to every Redactor of the process) before it is returned.
    """
    if isinstance(value, Mapping):
        return {k: reveal(v, redactor, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v, redactor, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, SecretStr):
        revealed = reveal(value.get_secret_value(), redactor, where)
        redactor.add(revealed)
        return revealed
    if isinstance(value, str) and ENV_REF.search(value):
        def lookup(match: re.Match) -> str:
            var = match.group(1)
            if var not in os.environ:
                raise MissingEnvironmentVariable(var, where)
            redactor.add(os.environ[var])
            return os.environ[var]
        return ENV_REF.sub(lookup, value)
    return value


def import_object(path: str) -> Any:
    """``package.module:Name`` or ``package.module.Name``; raises ImportError or AttributeError."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{path!r} is not an import path like 'package.module:Name'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
