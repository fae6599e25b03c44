"""The interleaved (GPT-J `rotate_every_two`) rotary form: its rotated operand and its tables.

GPT-J rotates channel pairs (2i, 2i + 1): rotated = stack((-x[..., 1::2], x[..., 0::2]), -1)
flattened back to x's shape, and each table is a half-width table t repeated pairwise,
repeat_interleave(t[:, :, None, :], 2, -1), which ATen spells unsqueeze → expand → clone → view.
"""

from __future__ import annotations

import torch.fx as fx

from peakc.passes.fuse.aten_match import aten, is_op, last_dim, shape_of


def _strided_half(node: object, start: int) -> fx.Node | None:
    """x when node is x[..., start::2] over the last dim, else None."""
    if not is_op(node, aten.slice.Tensor) or len(node.args) < 5 or node.args[4] != 2:
        return None
    x = node.args[0]
    ok = last_dim(node.args[1], len(shape_of(x))) and node.args[2] == start
    return x if ok and node.args[3] >= shape_of(x)[-1] else None


def _unsqueezed_last(node: object) -> fx.Node | None:
    """t when node is t.unsqueeze(-1), else None."""
    if not is_op(node, aten.unsqueeze.default):
        return None
    t = node.args[0]
    return t if last_dim(node.args[1], len(shape_of(t)) + 1) else None


def pair_swapped(view: object) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, nodes) when view is flatten(stack((-x[..., 1::2], x[..., 0::2]), -1)), else None."""
    if not is_op(view, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return None
    cat = view.args[0]
    if not is_op(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    if not last_dim(cat.args[1] if len(cat.args) > 1 else 0, len(shape_of(cat))):
        return None
    neg, even = (_unsqueezed_last(p) for p in cat.args[0])
    if not is_op(neg, aten.neg.default):
        return None
    x = _strided_half(even, 0)
    if x is None or _strided_half(neg.args[0], 1) is not x or shape_of(view) != shape_of(x):
        return None
    return x, [neg.args[0], neg, cat.args[0][0], even, cat.args[0][1], cat, view]


def pairwise_table(table: object) -> tuple[fx.Node, int] | None:
    """(t, head_dim) when table = repeat_interleave(t.unsqueeze(head_dim), 2, -1), else None.

    t is [B|1, S, R/2]; head_dim is 1 ([B, H, S, D] layout) or 2 ([B, S, H, D], GPT-J).
    """
    if not is_op(table, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return None
    node = table.args[0]
    if is_op(node, aten.clone.default):
        node = node.args[0]
    if not is_op(node, aten.expand.default) or list(node.args[1])[-1] != 2:
        return None
    unsqueezed = _unsqueezed_last(node.args[0])
    if shape_of(unsqueezed) is None or shape_of(node.args[0])[-1] != 1:
        return None
    if not is_op(unsqueezed, aten.unsqueeze.default) or unsqueezed.args[1] not in (1, 2):
        return None
    t = unsqueezed.args[0]
    if len(shape_of(t)) != 3 or shape_of(table)[-1] != 2 * shape_of(t)[-1]:
        return None
    return t, unsqueezed.args[1]
