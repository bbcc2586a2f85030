"""Where torouter keeps files it derives from installed packages.

Converted GGUF weights (``prepare.local``) and built encoder artefacts (ONNX exports,
distilled static models: ``encoder_backends``) live under one folder,
``$TOROUTER_CACHE`` or ``$XDG_CACHE_HOME/torouter`` (``~/.cache/torouter`` by default).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where torouter keeps files it derives from installed packages (``$TOROUTER_CACHE``)."""
    if os.environ.get("TOROUTER_CACHE"):
        return Path(os.environ["TOROUTER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torouter"
