"""Rotary position embedding → peakc::rotary_embedding.

Matches the rotate-half form x * cos + cat(-x2, x1) * sin (Llama, Mistral, Qwen2, Phi-3,
Gemma), the interleaved form x * cos + rotate_every_two(x) * sin (GPT-J, on [B, S, H, D]
heads: the op runs on the [B, H, S, D] view) and the partial form that rotates the first R
channels and concatenates the rest (GPT-NeoX, Phi-3, GPT-J). The full-width tables HF builds
as f(cat(freqs, freqs)) are replaced by f(freqs), the half-width tables the op takes, computed
once beside the original table (hoisted, shared by layers); a stored table gathered by
position (cos_cached[positions], generation graphs) becomes the gather of its first half.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from peakc.ir.graph import MODULE_KEY, Graph
from peakc.passes.fuse.aten_match import (
    aten,
    evaluate_constant,
    is_op,
    last_dim,
    only_user,
    other_arg,
    shape_of,
)
from peakc.passes.fuse.engine import FusionRule, Match
from peakc.passes.fuse.rotary_interleaved import pair_swapped, pairwise_table

# Elementwise steps HF applies to the angle table before it reaches the rotation.
_TABLE_STEPS = (
    aten.cos.default,
    aten.sin.default,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten._to_copy.default,
)
_END = 2**62
_SWAP_HEADS = [0, 2, 1, 3]  # [B, S, H, D] <-> [B, H, S, D]


def _rotated(node: object) -> tuple[fx.Node, list[fx.Node], bool] | None:
    """(x, the rotation's nodes, interleaved) when node is x rotated by a quarter turn."""
    found = _half_slices(node)
    if found is not None:
        high, low = node.args[0][0].args[0], node.args[0][1]
        nodes = [high, low, node.args[0][0], node]
        if is_op(high, operator.getitem):
            nodes.insert(0, high.args[0])
        return found[0], nodes, False
    swapped = pair_swapped(node)
    return (swapped[0], swapped[1], True) if swapped is not None else None


def _half_slices(cat: fx.Node) -> tuple[fx.Node, int] | None:
    """(x, half) when cat is cat([-x[..., half:], x[..., :half]], -1), else None."""
    if not is_op(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    neg, low = cat.args[0]
    if not is_op(neg, aten.neg.default):
        return None
    high = neg.args[0]
    split = _split_halves(high, low)
    if split is not None:
        return split
    if not is_op(high, aten.slice.Tensor):
        return None
    if not is_op(low, aten.slice.Tensor) or high.args[0] is not low.args[0]:
        return None
    x = low.args[0]
    rank, width = len(shape_of(x)), shape_of(x)[-1]
    half = width // 2
    ok_low = last_dim(low.args[1], rank) and low.args[2:4] == (0, half)
    ok_high = last_dim(high.args[1], rank) and high.args[2] == half and high.args[3] >= width
    return (x, half) if ok_low and ok_high and width % 2 == 0 else None


def _split_halves(high: object, low: object) -> tuple[fx.Node, int] | None:
    """(x, half) when high, low = x.chunk(2, -1)[1], [0] (split_with_sizes + getitem)."""
    if not (is_op(high, operator.getitem) and is_op(low, operator.getitem)):
        return None
    split = high.args[0]
    if low.args[0] is not split or (high.args[1], low.args[1]) != (1, 0):
        return None
    if not is_op(split, aten.split_with_sizes.default, aten.split.Tensor):
        return None
    x = split.args[0]
    width = shape_of(x)[-1]
    dim = split.args[2] if len(split.args) > 2 else 0
    sizes = split.args[1]
    halves = (
        list(sizes) == [width // 2] * 2
        if isinstance(sizes, (list, tuple))
        else (sizes == width // 2)
    )
    return (x, width // 2) if halves and last_dim(dim, len(shape_of(x))) else None


def _table_recipe(table: fx.Node) -> tuple[fx.Node, list[fx.Node]] | str:
    """(freqs, steps) when table = steps(cat([freqs, freqs], -1)), elementwise steps only."""
    steps = []
    node = table
    while is_op(node, *_TABLE_STEPS):
        if node.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(node.args[1], fx.Node):
            return f"table step '{node.name}' is not scaled by a constant"
        steps.append(node)
        node = node.args[0]
    if not is_op(node, aten.cat.default) or len(node.args[0]) != 2:
        return f"cos/sin table '{table.name}' is not built from cat([freqs, freqs])"
    a, b = node.args[0]
    if a is not b or not last_dim(node.args[1] if len(node.args) > 1 else 0, len(shape_of(a))):
        return f"cos/sin table '{table.name}' does not repeat the same freqs in both halves"
    return a, list(reversed(steps))


class RotaryRule(FusionRule):
    name = "rotary"

    def prepare(self, graph: Graph) -> None:
        self._halves: dict[fx.Node, fx.Node] = {}
        self._gm = graph.gm

    def is_anchor(self, node: fx.Node) -> bool:
        if not is_op(node, aten.add.Tensor):
            return False
        return any(
            is_op(m, aten.mul.Tensor) and any(_rotated(a) for a in m.args[:2])
            for m in node.args[:2]
        )

    def match(self, node: fx.Node) -> Match | str:
        m1, m2 = node.args[0], node.args[1]
        if not (is_op(m1, aten.mul.Tensor) and is_op(m2, aten.mul.Tensor)):
            return "rotation is not a sum of two products"
        if not any(_rotated(a) for a in m2.args[:2]):
            m1, m2 = m2, m1
        rotated = next(a for a in m2.args[:2] if _rotated(a))
        x, inner, interleaved = _rotated(rotated)
        sin_b, cos_b = other_arg(m2, rotated), other_arg(m1, x)
        if cos_b is None:
            return f"'{m1.name}' does not multiply the rotated tensor '{x.name}'"
        if interleaved:
            tables = self._pairwise_tables(cos_b, sin_b)
        else:
            tables = [self._half_width_table(t, x) for t in (cos_b, sin_b)]
        reason = next((t for t in tables if isinstance(t, str)), None)
        if reason is not None:
            return reason
        heads_at = {dim for _, dim in tables}
        if len(shape_of(x)) != 4 or len(heads_at) != 1:
            return f"rotated tensor '{x.name}' is not [B, H, S, D] or [B, S, H, D] heads"
        nodes = [*inner, m1, m2, node]
        out, source = node, x
        rest = self._passthrough(x, node)
        if rest is not None:
            source, tail = rest
            nodes = [x, *nodes, *tail]
            out = tail[-1]
        seq_major = heads_at == {2}
        values = {
            "x": source,
            "tables": [t for t, _ in tables],
            "interleaved": interleaved,
            "seq_major": seq_major,
            "absorbed": False,
        }
        back = only_user(out)
        if seq_major and is_op(back, aten.permute.default) and list(back.args[1]) == _SWAP_HEADS:
            nodes, out, values["absorbed"] = [*nodes, back], back, True  # the op's layout
        return Match(outputs=[out], nodes=nodes, values=values)

    def _half_width_table(self, t: fx.Node, x: fx.Node) -> tuple[tuple, int] | str:
        """((kind, node, recipe), head dim) for a rotate-half table, or why it is not one."""
        seq, width = shape_of(x)[-2], shape_of(x)[-1]
        if is_op(t, aten.unsqueeze.default) and t.args[1] == 1:
            gathered = self._gathered_table(t.args[0])
            if gathered is not None:
                return ("index", t.args[0], gathered), 1
            recipe = _table_recipe(t.args[0])
            return recipe if isinstance(recipe, str) else (("steps", t.args[0], recipe), 1)
        if shape_of(t) == (seq, width) and self._constant_halves_equal(t):
            return ("const", t, None), 1  # a stored [S, D] table with equal halves
        return (
            f"table '{t.name}' {list(shape_of(t) or ())} is neither a [B, S, D] "
            "table unsqueezed at the head dim nor a constant [S, D] table whose "
            "halves are equal"
        )

    @staticmethod
    def _pairwise_tables(cos_b: fx.Node, sin_b: fx.Node) -> list[tuple[tuple, int] | str]:
        found = []
        for t in (cos_b, sin_b):
            pair = pairwise_table(t)
            if pair is None:
                found.append(f"table '{t.name}' is not a half-width table repeated pairwise")
            else:
                found.append((("ready", pair[0], None), pair[1]))
        return found

    def _gathered_table(self, t: fx.Node) -> fx.Node | None:
        """The stored [N, D] table when t = table[positions] and its halves are equal."""
        if not is_op(t, aten.index.Tensor) or len(t.args[1]) != 1:
            return None
        table = t.args[0]
        if len(shape_of(table) or ()) != 2 or not self._constant_halves_equal(table):
            return None
        return table

    @staticmethod
    def _passthrough(x: fx.Node, rotated: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
        """Partial rotary: x = full[..., :R] and the result is cat([rotated, full[..., R:]])."""
        if not is_op(x, aten.slice.Tensor) or not last_dim(x.args[1], len(shape_of(x))):
            return None
        full, width = x.args[0], shape_of(x)[-1]
        if x.args[2:4] != (0, width):
            return None
        joined = only_user(rotated)
        if not is_op(joined, aten.cat.default) or len(joined.args[0]) != 2:
            return None
        first, rest = joined.args[0]
        if first is not rotated or not is_op(rest, aten.slice.Tensor) or rest.args[0] is not full:
            return None
        if rest.args[2] != width or rest.args[3] < shape_of(full)[-1] or len(rest.users) != 1:
            return None
        return full, [rest, joined]

    def _constant_halves_equal(self, table: fx.Node) -> bool:
        value = evaluate_constant(self._gm, table)
        if value is None:
            return False
        half = value.shape[-1] // 2
        return bool((value[..., :half] == value[..., half:]).all())

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        v = match.values
        halves = [self._half_table(graph, *table) for table in v["tables"]]
        x = v["x"]
        if v["seq_major"]:
            x = graph.graph.call_function(aten.permute.default, (x, _SWAP_HEADS))
        out = graph.graph.call_function(
            torch.ops.peakc.rotary_embedding.default, (x, *halves, v["interleaved"])
        )
        if v["seq_major"] and not v["absorbed"]:
            out = graph.graph.call_function(aten.permute.default, (out, _SWAP_HEADS))
        return out

    def _half_table(self, graph: Graph, kind: str, table: fx.Node, detail) -> fx.Node:
        """The half-width table [B|1, S, R/2], built once right after the full one."""
        if kind == "ready":
            return table
        if table in self._halves:
            return self._halves[table]
        new: list[fx.Node] = []
        call = graph.graph.call_function
        with graph.graph.inserting_before(table.next):
            if kind == "const":  # constant [S, D] table: its first half, as [1, S, D/2]
                half = call(aten.slice.Tensor, (table, -1, 0, shape_of(table)[-1] // 2))
                new = [half, call(aten.unsqueeze.default, (half, 0))]
            elif kind == "index":  # stored[positions]: gather from the stored table's first half
                half = call(aten.slice.Tensor, (detail, -1, 0, shape_of(detail)[-1] // 2))
                new = [half, call(aten.index.Tensor, (half, list(table.args[1])))]
            else:
                freqs, steps = detail
                current = freqs
                for step in steps:
                    current = call(step.target, (current, *step.args[1:]), dict(step.kwargs))
                    new.append(current)
        for n in new:
            n.meta[MODULE_KEY] = table.meta.get(MODULE_KEY, "")
        self._halves[table] = new[-1] if new else detail[0]
        return self._halves[table]
