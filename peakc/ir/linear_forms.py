"""Linears written out by hand: `x @ W.T (+ b)` in a module's own forward, as torch.export
decomposes it (transpose of a stored 2-D weight, mm between a flattening view and a view back,
optional add of a stored 1-D bias), becomes one `aten.linear`, so prune and quantize see it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


@dataclass
class LinearForm:
    """One matched `x @ W.T (+ b)`: its operands and the nodes it replaces, first to last."""

    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    nodes: list[fx.Node]


def recognize_linears(graph: fx.Graph) -> int:
    """Rewrite every hand-written linear in `graph` into `aten.linear`; return how many."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.mm.default:
            continue
        form = match_linear(node)
        if form is None:
            continue
        last = form.nodes[-1]
        args = (form.x, form.weight) + ((form.bias,) if form.bias is not None else ())
        with graph.inserting_after(last):
            linear = graph.call_function(aten.linear.default, args)
        linear.meta = dict(node.meta)  # the mm's module path and stack trace
        for key in ("val", "tensor_meta"):
            if key in last.meta:
                linear.meta[key] = last.meta[key]
        linear.meta.pop("original_aten", None)
        last.replace_all_uses_with(linear)
        _erase_unused(graph, list(reversed(form.nodes)))
        count += 1
    return count


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the replaced nodes nothing reads any more, and the size arithmetic (dynamic
    shapes: sym_size, mul) that only fed their views."""
    replaced, erased = set(nodes), set()
    while nodes:
        node = nodes.pop(0)
        if node in erased or node.users or node.op != "call_function":
            continue
        if node not in replaced and not _is_size_arithmetic(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        nodes.extend(inputs)


def _is_size_arithmetic(node: fx.Node) -> bool:
    return node.target is aten.sym_size.int or getattr(node.target, "__module__", "") in (
        "_operator",
        "operator",
    )


def match_linear(mm: fx.Node) -> LinearForm | None:
    """The linear an `aten.mm` node computes, when its right operand is a stored weight
    transposed; None otherwise."""
    flat, transposed = mm.args
    weight = _transposed_weight(transposed)
    x_val = _val(flat)
    if weight is None or x_val is None or x_val.dim() != 2:
        return None
    out_features, in_features = _val(weight).shape
    if _val(weight).dtype != x_val.dtype:
        return None
    x, nodes = flat, [transposed, mm]
    restored = _only_user(mm)
    if _is_flatten_of(flat, in_features) and _is_view_back(restored, flat.args[0], out_features):
        x, nodes = flat.args[0], [transposed, flat, mm, restored]
    bias = _bias_add(nodes[-1], out_features, x_val.dtype)
    if bias is not None:
        add = _only_user(nodes[-1])
        return LinearForm(x, weight, bias, [*nodes, add])
    return LinearForm(x, weight, None, nodes)


def _transposed_weight(node: object) -> fx.Node | None:
    """W when `node` is W.T for a stored 2-D weight W."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or source.op != "get_attr":
        return None
    val = _val(source)
    if val is None or val.dim() != 2:
        return None
    if node.target is aten.t.default:
        return source
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return source
    if node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return source
    return None


def _is_flatten_of(flat: fx.Node, in_features: int) -> bool:
    """`flat` views a tensor of shape [*lead, K] as [prod(lead), K]."""
    if flat.op != "call_function" or flat.target not in _VIEWS:
        return False
    source = flat.args[0]
    src_val, flat_val = _val(source), _val(flat)
    if src_val is None or src_val.dim() < 2 or not _same_size(src_val.shape[-1], in_features):
        return False
    rows = math.prod(src_val.shape[:-1])
    return _same_size(flat_val.shape[0], rows) and _same_size(flat_val.shape[1], in_features)


def _is_view_back(node: fx.Node | None, source: fx.Node, out_features: int) -> bool:
    """`node` views the mm's [rows, N] result back to [*lead, N] of the flattened source."""
    if node is None or node.op != "call_function" or node.target not in _VIEWS:
        return False
    val, src_val = _val(node), _val(source)
    return val is not None and _same_shape(val.shape, (*src_val.shape[:-1], out_features))


def _bias_add(node: fx.Node, out_features: int, dtype: torch.dtype) -> fx.Node | None:
    """The stored [N] bias when `node`'s only user adds it (without changing shape or dtype)."""
    add = _only_user(node)
    if add is None or add.op != "call_function" or add.target is not aten.add.Tensor:
        return None
    if add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    bias = add.args[1] if add.args[0] is node else add.args[0]
    if not isinstance(bias, fx.Node) or bias.op != "get_attr":
        return None
    bias_val, add_val, val = _val(bias), _val(add), _val(node)
    if bias_val is None or add_val is None or tuple(bias_val.shape) != (out_features,):
        return None
    if bias_val.dtype != dtype or add_val.dtype != dtype:
        return None
    if not _same_shape(add_val.shape, val.shape):
        return None
    return bias


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _val(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _same_size(a: object, b: object) -> bool:
    """Equal sizes; symbolic ones only when provably equal (no guard is added)."""
    return bool(statically_known_true(a == b))


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_same_size(x, y) for x, y in zip(a, b))
