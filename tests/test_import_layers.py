"""Rooms import downward only: the import graph between the parts of the peakc package is a DAG
that follows one declared order (docs/architecture.md, "Rooms and layers", mirrors it).

A room is a top-level part of the package (`peakc/runtime/`, `peakc/data.py`, ...; the package
root `peakc/__init__.py` is the room `peakc`). Every import counts: at module level, inside
functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "peakc"

# Bottom to top: a room may import only rooms listed before it.
LAYERS = [
    "errors",
    "version",
    "progress",
    "ir",
    "data",
    "runtime",
    "models",
    "cost_model",
    "passes",
    "backends",
    "api",
    "peakc",
    "cli_progress",
    "cli_options",
    "cli_estimate",
    "cli",
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room_of(module: str) -> str | None:
    """The room a dotted module name belongs to, or None outside peakc."""
    parts = module.split(".")
    if parts[0] != "peakc":
        return None
    return parts[1] if len(parts) > 1 else "peakc"


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the tree, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((name, node.lineno))
    return found


def room_edges() -> dict[tuple[str, str], list[str]]:
    """(importing room, imported room) -> the "file:line" of each import making that edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        source = room_of(module)
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line in imported_modules(tree, module, path.name == "__init__.py"):
            target = room_of(name)
            if target is not None and target != source:
                where = f"peakc/{path.relative_to(PACKAGE)}:{line}"
                edges.setdefault((source, target), []).append(where)
    return edges


def test_every_room_has_a_layer():
    rooms = {room for edge in room_edges() for room in edge}
    rooms |= {room_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    unplaced = sorted(rooms - set(LAYERS))
    assert not unplaced, (
        f"rooms {unplaced} are not in LAYERS (tests/test_import_layers.py and the layer list "
        "in docs/architecture.md): place each below the rooms that import it"
    )


def test_room_imports_form_no_cycle():
    edges = room_edges()
    graph = nx.DiGraph(list(edges))
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return
    lines = [f"  {a} -> {b}: {', '.join(edges[(a, b)][:3])}" for a, b in cycle]
    raise AssertionError("rooms import each other in a cycle:\n" + "\n".join(lines))


def test_rooms_import_only_rooms_below_them():
    rank = {room: i for i, room in enumerate(LAYERS)}
    upward = [
        f"  {a} -> {b}: {', '.join(places[:3])}"
        for (a, b), places in sorted(room_edges().items())
        if a in rank and b in rank and rank[b] > rank[a]
    ]
    assert not upward, "imports going up the layer order (LAYERS, bottom first):\n" + "\n".join(
        upward
    )
