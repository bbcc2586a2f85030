"""Expert backends by name: ``build_expert(spec)`` builds a manifest entry with the backend it names.

A backend is an ``Expert`` subclass registered under the key a manifest entry uses for
it. Four are built in: ``huggingface`` (``torouter.prepare.local``, imported only when
such an expert is built, since it needs ``transformers``), ``langchain``,
``llamaindex`` and ``python`` (``torouter.prepare.clients``). Users add their own::

    class TGISpec(KwargsSpec):
        url: str

    class TGIExpert(Expert):
        kind = "tgi"
        spec_class = TGISpec
        async def start(self): ...
        async def agenerate(self, prompt, reference, timeout_s): ...

    register_backend("tgi", TGIExpert)

after which a manifest entry may say ``tgi: {url: ..., kwargs: {...}}``.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING

from .base import Expert
from .clients import LangChainExpert, LlamaIndexExpert, PythonExpert
from .manifest import (BUILTIN_BACKENDS, BackendSpec, ExpertSpec, Manifest, ManifestError, add_backend_section,
                       backend_sections, remove_backend_section)

if TYPE_CHECKING:
    from collections.abc import Iterable

# A class, or where to import it from when first needed.
_BACKENDS: dict[str, type[Expert] | tuple[str, str]] = {
    "huggingface": ("torouter.prepare.local", "HuggingFaceExpert"),
    "langchain": LangChainExpert,
    "llamaindex": LlamaIndexExpert,
    "python": PythonExpert,
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def backend_names() -> list[str]:
    """Every registered backend key, built-in ones first."""
    return list(_BACKENDS)


def get_backend(name: str) -> type[Expert]:
    """The ``Expert`` class registered under ``name``; ``ManifestError`` lists the known ones otherwise."""
    entry = _BACKENDS.get(name)
    if entry is None:
        raise ManifestError(f"unknown expert backend {name!r}; known backends: {', '.join(_BACKENDS)}")
    if isinstance(entry, tuple):
        module, attr = entry
        entry = _BACKENDS[name] = getattr(importlib.import_module(module), attr)
    return entry


def register_backend(name: str, expert_class: type[Expert], *, replace: bool = False) -> None:
    """Let manifest entries name ``name`` to be built by ``expert_class``.

    ``expert_class`` subclasses ``Expert`` with ``kind = name``; for a new name its
    ``spec_class`` (a ``BackendSpec`` subclass) checks the entry's section. A built-in
    name, or one already registered, is replaced only with ``replace=True``; a built-in
    backend keeps its section (``spec_class`` must be unset or the built-in one).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"backend name {name!r} must be a word (letters, digits, '_' or '-')")
    if not (isinstance(expert_class, type) and issubclass(expert_class, Expert)):
        raise TypeError(f"backend {name!r}: {expert_class!r} is not a subclass of torouter.prepare.Expert")
    if expert_class.kind != name:
        raise ValueError(f"backend {name!r}: {expert_class.__name__}.kind is {expert_class.kind!r}; "
                         f"set kind = {name!r}")
    if name in _BACKENDS and not replace:
        raise ValueError(f"backend {name!r} is already registered; pass replace=True to replace it")
    section = expert_class.spec_class
    if name in BUILTIN_BACKENDS:
        builtin = backend_sections()[name]
        if section is not None and section is not builtin:
            raise ValueError(f"backend {name!r} is built in and keeps its section {builtin.__name__}; "
                             f"{expert_class.__name__}.spec_class is {section.__name__}")
    else:
        if not (isinstance(section, type) and issubclass(section, BackendSpec)):
            raise TypeError(f"backend {name!r}: {expert_class.__name__}.spec_class must be a subclass of "
                            f"torouter.prepare.BackendSpec (the class that checks its manifest section)")
        add_backend_section(name, section)
    _BACKENDS[name] = expert_class


def unregister_backend(name: str) -> None:
    """Forget a backend added with ``register_backend``; built-in backends cannot be removed."""
    if name in BUILTIN_BACKENDS:
        raise ValueError(f"backend {name!r} is built in; replace it with register_backend(..., replace=True)")
    _BACKENDS.pop(name, None)
    remove_backend_section(name)


def build_expert(spec: ExpertSpec) -> Expert:
    """The expert object for a manifest entry (nothing is loaded or connected until ``start``)."""
    try:
        expert_class = get_backend(spec.kind)
    except ManifestError as exc:
        raise ManifestError(f"expert {spec.name!r}: {exc}") from None
    return expert_class(spec)


def build_experts(manifest: Manifest | Iterable[ExpertSpec]) -> list[Expert]:
    """The expert objects for every entry of a manifest, in its order."""
    specs = manifest.experts if isinstance(manifest, Manifest) else manifest
    return [build_expert(spec) for spec in specs]
