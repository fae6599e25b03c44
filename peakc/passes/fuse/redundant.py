"""Redundant casts, views, transposes, copies and identity arithmetic: replaced by their input.

Also pairs that undo each other: a view back to the original shape, a permutation followed by
its inverse, and a widening cast followed by the cast back (bf16 → fp32 → bf16 is exact).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import aten, dtype_of, is_op, shape_of
from peakc.passes.fuse.engine import FusionRule, Match

_COPIES = (aten.clone.default, aten.alias.default, aten.detach.default)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)
_IDENTITY_ARITH = {
    aten.mul.Tensor: 1.0,
    aten.div.Tensor: 1.0,
    aten.add.Tensor: 0.0,
    aten.sub.Tensor: 0.0,
}
_ANCHORS = (
    *_COPIES,
    *_VIEWS,
    *_IDENTITY_ARITH,
    aten._to_copy.default,
    aten.permute.default,
    aten.slice.Tensor,
    aten.cat.default,
)


class RedundantRule(FusionRule):
    """Drop nodes that return their input unchanged (same values, shape and dtype)."""

    name = "redundant"

    def is_anchor(self, node: fx.Node) -> bool:
        # Only actual no-ops are anchors: shape-changing views are not near misses.
        return is_op(node, *_ANCHORS) and isinstance(self.identity_source(node), fx.Node)

    def match(self, node: fx.Node) -> Match | str:
        source = self.identity_source(node)
        if isinstance(source, str):
            return source
        return Match(outputs=[node], nodes=[node], values={"source": source})

    def identity_source(self, node: fx.Node) -> fx.Node | str:
        """The node whose value `node` repeats, or why it is not a no-op."""
        x = node.args[0]
        if node.target is aten.cat.default:
            return self._cat_source(node)
        undone = undone_pair(node)
        if undone is not None:
            return undone
        if not isinstance(x, fx.Node) or shape_of(x) != shape_of(node):
            return "changes the shape"
        if dtype_of(x) != dtype_of(node):
            return "changes the dtype"
        if node.target is aten.clone.default and node.kwargs.get("memory_format") is not None:
            val = x.meta.get("val")
            if val is None or not val.is_contiguous():
                return "clone makes a strided tensor contiguous"
        if node.target in _COPIES or node.target in _VIEWS:
            return x
        if node.target is aten._to_copy.default:
            return x if set(node.kwargs) <= {"dtype"} else "cast also changes layout or device"
        if node.target is aten.permute.default:
            perm = list(node.args[1])
            return x if perm == sorted(perm) else f"permutation {perm} is not the identity"
        if node.target is aten.slice.Tensor:
            return x  # same shape as its input: the slice covers the whole dim
        other = node.args[1]
        if isinstance(other, (int, float)) and float(other) == _IDENTITY_ARITH[node.target]:
            return x
        return "not an identity"

    def _cat_source(self, node: fx.Node) -> fx.Node | str:
        parts = list(node.args[0])
        kept = [p for p in parts if 0 not in (shape_of(p) or (0,))]
        if len(kept) == 1 and shape_of(kept[0]) == shape_of(node):
            if dtype_of(kept[0]) == dtype_of(node):
                return kept[0]
        return "concatenates more than one non-empty tensor"

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        return match.values["source"]


def undone_pair(node: fx.Node) -> fx.Node | None:
    """y when node undoes its input, which is a view, permute or widening cast of y."""
    inner = node.args[0]
    if not isinstance(inner, fx.Node) or not isinstance(
        inner.args[0] if inner.args else None, fx.Node
    ):
        return None
    y = inner.args[0]
    if dtype_of(y) != dtype_of(node):
        return None
    if is_op(node, *_RESHAPES) and is_op(inner, *_RESHAPES):
        return y if shape_of(y) == shape_of(node) else None
    if is_op(node, aten.permute.default) and is_op(inner, aten.permute.default):
        first, then = list(inner.args[1]), list(node.args[1])
        rank = len(first)
        return y if [first[then[i]] % rank for i in range(rank)] == list(range(rank)) else None
    if is_op(node, aten._to_copy.default) and is_op(inner, aten._to_copy.default):
        if not set(node.kwargs) | set(inner.kwargs) <= {"dtype"}:
            return None
        narrow, wide = dtype_of(y), dtype_of(inner)
        exact = (
            narrow.is_floating_point
            and wide.is_floating_point
            and narrow != wide
            and torch.promote_types(narrow, wide) == wide
        )
        return y if exact else None
    return None


def strip_copies(node: object) -> object:
    """Follow clone/alias/same-dtype casts back to the value they copy."""
    while isinstance(node, fx.Node) and (
        is_op(node, *_COPIES)
        or (
            is_op(node, aten._to_copy.default)
            and set(node.kwargs) <= {"dtype"}
            and dtype_of(node) == dtype_of(node.args[0])
        )
    ):
        node = node.args[0]
    return node
