"""The package's shape: its import graph (drawn from the source, every import statement counted,
also those inside functions) has no cycle; every dpo_zoo module belongs to one layer of
``dpo_zoo.LAYERS`` and imports nothing from a layer above its own; no module is over 600 lines; and
data_prep sits below dpo_zoo: it never imports dpo_zoo, torch or any model library, so
`import data_prep` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

from dpo_zoo import LAYERS
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
    assert "dpo_zoo.losses.base" in graph["dpo_zoo.losses.dpo"]  # the graph sees relative imports
    assert "dpo_zoo.cache.reader" in graph["dpo_zoo.cache.writer"]
    assert "dpo_zoo.losses" in graph["dpo_zoo.train.trainer"]
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


MAX_MODULE_LINES = 600


def layer_of(module: str) -> int:
    """The index in LAYERS of a dpo_zoo module (``dpo_zoo.train.trainer`` -> the train layer), or -1
    for the package's own ``__init__``, which everything may import (it holds only the version and LAYERS)."""
    if module == "dpo_zoo":
        return -1
    part = module.split(".")[1]
    for index, (_, parts) in enumerate(LAYERS):
        if part in parts:
            return index
    raise KeyError(module)


def test_every_module_has_a_layer():
    unplaced = []
    for name in module_files():
        if name.startswith("dpo_zoo"):
            try:
                layer_of(name)
            except KeyError:
                unplaced.append(name)
    assert not unplaced, f"not in dpo_zoo.LAYERS: {unplaced} (add the module or its subpackage there)"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for name, targets in import_graph().items():
        if not name.startswith("dpo_zoo."):
            continue
        for target in targets:
            if target.startswith("dpo_zoo") and layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the layers of dpo_zoo/__init__.py: " + "; ".join(sorted(upward))


def test_the_layer_checker_sees_an_upward_import():
    """The checker itself: the cache layer sits below train, the base layer below everything."""
    assert layer_of("dpo_zoo.cache.prep") < layer_of("dpo_zoo.train.trainer")
    assert layer_of("dpo_zoo.errors") == 0
    with pytest.raises(KeyError):
        layer_of("dpo_zoo.nowhere")


def test_no_module_is_over_600_lines():
    long = [f"{path.relative_to(REPO_ROOT)}: {n}" for path in module_files().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, f"over {MAX_MODULE_LINES} lines (split by what the parts do): {long}"
