"""cleanup: dead code elimination and common subexpression elimination."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peakc.passes.base import Pass, PassContext, PassResult, register_pass

if TYPE_CHECKING:  # the declaration stays light for `peakc passes`
    from peakc.ir.graph import Graph


@register_pass
class Cleanup(Pass):
    """Remove dead nodes and merge identical pure computations."""

    name = "cleanup"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = len(graph.graph.nodes)
        merged = eliminate_common_subexpressions(graph)
        graph.graph.eliminate_dead_code()
        removed = before - len(graph.graph.nodes)
        return PassResult(graph, modified=removed > 0, stats={"cse": merged, "removed": removed})


def eliminate_common_subexpressions(graph: Graph) -> int:
    """Replace each pure call node equal to an earlier one (same target and args); count them."""
    seen: dict[tuple, object] = {}
    merged = 0
    for node in list(graph.graph.nodes):
        if node.op not in ("call_function", "get_attr"):
            continue
        if node.op == "call_function" and not _is_pure(node):
            continue
        key = (node.op, node.target, _hashable(node.args), _hashable(node.kwargs))
        try:
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _is_pure(node) -> bool:
    import torch

    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.target.__module__ == "_operator"
    if schema.is_mutable or any(a.alias_info is not None for a in schema.returns):
        return False
    return torch.Tag.nondeterministic_seeded not in node.target.tags


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if hasattr(value, "dtype") and not hasattr(value, "op"):
        return (type(value).__name__, id(value))
    return value
