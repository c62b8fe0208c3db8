"""Inside each package, modules import each other one way: no cycle, lazy and ``TYPE_CHECKING`` imports counted.

Why: a cycle dodged by a lazy import (the experiment-file validator imported the tuner, which imported the runner,
which imported the validator; the budget plan imported the stage registry, whose kinds imported the budget) works
until someone moves the import to the top or imports in another order. Shared small things live in leaf modules
instead (``metrics/base.py``, ``experiments/space.py``, ``optimizers/stages/base.py``). tests/test_architecture.py
checks the arrows between packages; this checks them inside each one, subpackages included. A package's own
``__init__`` is left out of the graph: importing ``pkg.x`` runs it first, whatever ``x`` imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACYCLIC = ("metrics", "rl", "programs", "embedded", "optimizers", "experiments")


def module_graph(package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, named by dotted path (``metrics.calibration.fit``)."""
    paths = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in paths and t != name and t != package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ACYCLIC)
def test_the_modules_of_a_package_import_each_other_without_a_cycle(package):
    graph = module_graph(package)
    assert sum(map(len, graph.values())) > 0, graph  # the graph is read at all
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle inside {package}/: {' -> '.join(cycle or [])}"


def test_the_leaf_modules_import_nothing_of_their_package():
    assert module_graph("experiments")["experiments.space"] == set()
    assert module_graph("metrics")["metrics.base"] == set()
    assert module_graph("optimizers")["optimizers.stages.base"] <= {"optimizers.budget"}
