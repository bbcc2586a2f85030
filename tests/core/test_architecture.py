"""The import graph keeps the layout's promises: the core imports no adapter, and no modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"torouter": ROOT / "shared" / "torouter", "langchain_torouter": ROOT / "langchain_torouter",
            "llamaindex_torouter": ROOT / "llamaindex_torouter", "torouter_apps": ROOT / "torouter_apps"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _module_level_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports when it is imported (imports inside functions are lazy: left out)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If):  # e.g. ``if TYPE_CHECKING:`` blocks import nothing at run time
            continue
        if isinstance(node, ast.Try):
            nodes = [n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        else:
            nodes = [node]
        for stmt in nodes:
            if isinstance(stmt, ast.Import):
                candidates = [a.name for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom):
                if stmt.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (stmt.level - 1)]
                    module = ".".join(base + ([stmt.module] if stmt.module else []))
                else:
                    module = stmt.module or ""
                candidates = [module] + [f"{module}.{a.name}" for a in stmt.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _module_level_imports(name, path, modules) for name, path in modules.items()}


def test_the_core_imports_no_adapter_and_no_app():
    outside = ("langchain_torouter", "llamaindex_torouter", "torouter_apps")
    offenders = []
    for path in sorted((ROOT / "shared" / "torouter").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in outside]
    assert offenders == []


def test_apps_use_only_the_public_api_of_the_adapter():
    offenders = []
    for path in sorted((ROOT / "torouter_apps").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if node.module.startswith("langchain_torouter."):
                    offenders.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert offenders == []


def test_the_adapters_do_not_import_each_other_or_the_apps():
    graph = _graph()
    arrows = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if {a.split(".")[0], b.split(".")[0]} in ({"langchain_torouter", "llamaindex_torouter"},)
              or (a.split(".")[0] != "torouter_apps" and b.split(".")[0] == "torouter_apps")]
    assert arrows == []


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                # A package's __init__ re-exporting its own submodules is not a cycle of ideas.
                if nxt == start and not any(start.startswith(p + ".") or p.startswith(start + ".")
                                            for p in path[1:] + [node]):
                    cycles.append(" -> ".join(path + [nxt]))
                elif nxt not in seen and nxt != start:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return cycles


def test_no_import_cycle_between_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_cycles():
    assert _cycles({"p.a": {"p.b"}, "p.b": {"p.a"}, "p": {"p.a"}}) == ["p.a -> p.b -> p.a", "p.b -> p.a -> p.b"]
    assert _cycles({"p": {"p.a"}, "p.a": {"p"}}) == []  # a package and its own module


def test_the_graph_is_read():
    graph = _graph()
    assert "torouter.controller" in graph["langchain_torouter.base"]
    assert "torouter.routers" in graph["torouter.controller"]
