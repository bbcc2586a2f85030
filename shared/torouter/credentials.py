"""Credentials in expert configurations: hidden in reprs, read from the environment, masked in text.

Both the experts manifest (``torouter prepare``) and the server config (``torouter
serve``) take constructor kwargs that may hold API keys, written as ``${VAR}`` so
the key itself never sits in a file. Values under credential-like keys are wrapped in
``SecretStr`` as soon as they are parsed, unwrapped only to build the client, and every
secret seen is masked in error messages and logs.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

SECRET_KEY = re.compile(r"(?i)(^|_)(api_?key|key|secret|password|passwd|token|access_token|credentials?)$")
SECRET_ENV = re.compile(r"(?i)(API_?KEY|TOKEN|SECRET|PASSWORD)$")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Key-like strings that provider error messages sometimes echo back.
KEY_PATTERNS = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{16,}|(?i:bearer)\s+[A-Za-z0-9_\-.=]{8,})")


class MissingEnvironmentVariable(KeyError):
    """A ``${VAR}`` reference to a variable that is not set; ``where`` says which value."""

    def __init__(self, var: str, where: str):
        super().__init__(var)
        self.var, self.where = var, where

    def __str__(self) -> str:
        return f"{self.where}: environment variable {self.var} is not set"


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
    """Masks every secret it was given, credential-like environment values and key-like strings."""

    def __init__(self, secrets: list[str] | None = None):
        self._secrets = [s for s in (secrets or []) if s]

    def add(self, secret: str) -> None:
        if secret:
            self._secrets.append(secret)

    def __call__(self, text: str) -> str:
        environment = [v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 6]
        for secret in sorted(set(self._secrets + environment), key=len, reverse=True):
            text = text.replace(secret, "***")
        return KEY_PATTERNS.sub("***", text)

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secrets)"


def reveal(value: Any, redactor: Redactor, where: str = "kwargs") -> Any:
    """Kwargs ready for a constructor: secrets unwrapped (and remembered), ``${VAR}`` read from the environment."""
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
            if SECRET_ENV.search(var):
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
