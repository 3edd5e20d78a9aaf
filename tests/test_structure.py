"""The package's shape: its import graph (drawn from the source, every import statement counted,
also those inside functions) has no cycle, and data_prep sits below dpo_zoo: it never imports
dpo_zoo, torch or any model library, so `import data_prep` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

from dpo_zoo.config import REPO_ROOT

PACKAGES = ("dpo_zoo", "data_prep")
# What data_prep may not import: the package above it, and the model/training stack.
NOT_IN_DATA_PREP = ("dpo_zoo", "torch", "transformers", "deepspeed", "peft")


def module_files() -> Dict[str, Path]:
    """Dotted module name -> source file, for every module of the two packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_names(name: str, path: Path) -> List[str]:
    """Every module name an import statement of ``path`` names (relative imports resolved; for
    ``from X import y`` both ``X`` and ``X.y``, since ``y`` may be a submodule)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append(target)
            out += [f"{target}.{alias.name}" for alias in node.names]
    return out


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the modules of the two packages it imports. Importing ``a.b.c`` also runs the
    ``__init__`` of ``a.b``: an edge to each such package, unless the importer is inside it."""
    modules = module_files()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target in imported_names(name, path):
            if target not in modules:
                continue
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:depth])
                if ancestor in modules and ancestor != name and not (name + ".").startswith(ancestor + "."):
                    graph[name].add(ancestor)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle as a list of modules (first == last), or [] when the graph is acyclic."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_find_cycle_finds_one():
    """The checker itself: a → b → c → a is a cycle, a → b, a → c, b → c is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "dpo_zoo.cache" in graph["dpo_zoo.cache_writer"]  # the graph sees relative imports
    assert "dpo_zoo.losses" in graph["dpo_zoo.trainer"]
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " → ".join(cycle)


def test_data_prep_imports_nothing_above_it():
    """Dependencies run one way: dpo_zoo → data_prep, never back, and data_prep needs no torch."""
    offending = []
    for name, path in module_files().items():
        if not name.startswith("data_prep"):
            continue
        for target in imported_names(name, path):
            if target.split(".")[0] in NOT_IN_DATA_PREP:
                offending.append(f"{path.relative_to(REPO_ROOT)} imports {target}")
    assert not offending, "; ".join(sorted(set(offending)))


@pytest.mark.slow
def test_import_data_prep_loads_no_torch():
    """The same, at run time, in a fresh interpreter: `import data_prep` loads neither torch nor dpo_zoo."""
    code = ("import sys, data_prep; print(sorted({m.split('.')[0] for m in sys.modules} & "
            f"{set(NOT_IN_DATA_PREP)!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
