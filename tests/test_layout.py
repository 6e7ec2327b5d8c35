"""Layers point one way: `embeddings/` (the lower layer) imports nothing from `trainer/`, the offline dataset tools
are not imported by the runtime, and no two modules import each other, directly or around a loop (every import
counts: module level, TYPE_CHECKING and lazy ones inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "embeddings")
# Entry points and tools may reach the offline dataset tools; the training runtime may not.
MAY_USE_DATASET_TOOLS = ("trainer.cli", "trainer.demo", "trainer.experiment", "trainer.dataset_tools")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_embeddings_import_nothing_from_the_trainer() -> None:
    graph = import_graph()
    upward = {m: sorted(d for d in deps if d.startswith("trainer")) for m, deps in graph.items()}
    assert {m: d for m, d in upward.items() if m.startswith("embeddings") and d} == {}


def test_the_runtime_does_not_import_the_dataset_tools() -> None:
    graph = import_graph()
    users = {
        m
        for m, deps in graph.items()
        if any(d.startswith("trainer.dataset_tools") for d in deps)
        and not m.startswith(MAY_USE_DATASET_TOOLS)
    }
    assert users == set()
