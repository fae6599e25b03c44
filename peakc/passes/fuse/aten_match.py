"""Predicates and walks over ATen FX nodes that several fusion rules share."""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def is_op(node: object, *targets) -> bool:
    """True when `node` is a call_function node of one of `targets`."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def shape_of(node: object) -> tuple[int, ...] | None:
    """The recorded shape of a tensor-valued node, or None."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def dtype_of(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def only_user(node: fx.Node) -> fx.Node | None:
    """The single user of `node`, or None when it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def other_arg(node: fx.Node, known: object) -> object:
    """For a binary node, the operand that is not `known` (None when neither matches)."""
    a, b = node.args[0], node.args[1]
    if a is known:
        return b
    if b is known:
        return a
    return None


def is_scalar(value: object, expected: float, tol: float = 1e-6) -> bool:
    return isinstance(value, (int, float)) and abs(float(value) - expected) <= tol * max(
        1.0, abs(expected)
    )


def scalar_operand(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(tensor, constant) for a binary node with one Python-number operand."""
    a, b = node.args[0], node.args[1]
    if isinstance(a, fx.Node) and isinstance(b, (int, float)):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, (int, float)):
        return b, float(a)
    return None


def last_dim(dim: int, rank: int) -> bool:
    return dim in (-1, rank - 1)


def depends_on_input(node: fx.Node) -> bool:
    """True when a graph input (placeholder) is among the node's ancestors."""
    stack, seen = [node], set()
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur.op == "placeholder":
            return True
        stack.extend(cur.all_input_nodes)
    return False


def evaluate_constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The value of a node that depends on weights and constants only, else None."""
    if depends_on_input(node):
        return None
    env: dict[fx.Node, object] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    todo, stack = set(), [node]
    while stack:
        cur = stack.pop()
        if cur not in todo:
            todo.add(cur)
            stack.extend(cur.all_input_nodes)
    with torch.no_grad():
        for cur in sorted(todo, key=order.__getitem__):
            if cur.op == "get_attr":
                value = gm
                for part in cur.target.split("."):
                    value = getattr(value, part)
                env[cur] = value
            elif cur.op == "call_function":
                args, kwargs = fx.node.map_arg((cur.args, cur.kwargs), env.__getitem__)
                env[cur] = cur.target(*args, **kwargs)
            else:
                return None
    value = env[node]
    return value if isinstance(value, torch.Tensor) else None
