"""Where the heavy work of ``prepare``, ``score`` and ``route`` runs: this process (``local``, the
default) or a Ray cluster (``ray``, the ``torouter[ray]`` extra).

Only the modules of this package import ``ray``, and only when the Ray engine is asked for,
so the rest of torouter runs without it. The Ray engine produces the same files as the local
one (same records, same cache format); see docs/prepare.md, "Running on Ray".
"""

from __future__ import annotations

ENGINES = ("local", "ray")


class EngineError(RuntimeError):
    """The engine asked for cannot run (Ray not installed, a cluster that cannot be joined)."""


def check_engine(engine: str) -> str:
    """``engine`` when it is one torouter knows; an ``EngineError`` naming the known ones otherwise."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    return engine
