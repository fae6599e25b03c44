"""The fusion planner: chains of elementwise and last-dim reduction ATen ops become one
generated kernel each (codegen.py).

Nodes are visited in graph order. A fusible node (an op of `ATEN_OPS` on float tensors) joins
the group of one of its producers when their iteration spaces agree (equal, or one is the
other's rows: [..., 1] against [..., N]) and every other input it reads was computed before the
group's first node, so the group can run as one step at that position. A group is kept when it
has at least two ops, a reducing or row-wise group has a static last dim the row kernel can
hold, and the cost model's bytes say it moves less memory than its ops do one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peakc.backends.triton.codegen import MAX_ROW_SIZE

if TYPE_CHECKING:
    import torch.fx as fx

FLOAT_DTYPES = ("float32", "float16", "bfloat16")

# aten op -> codegen op (unary and binary ops whose args map one to one)
_DIRECT = {
    "aten.neg.default": "neg",
    "aten.exp.default": "exp",
    "aten.log.default": "log",
    "aten.sqrt.default": "sqrt",
    "aten.rsqrt.default": "rsqrt",
    "aten.abs.default": "abs",
    "aten.sin.default": "sin",
    "aten.cos.default": "cos",
    "aten.erf.default": "erf",
    "aten.sigmoid.default": "sigmoid",
    "aten.silu.default": "silu",
    "aten.relu.default": "relu",
    "aten.tanh.default": "tanh",
    "aten.reciprocal.default": "reciprocal",
    "aten.clone.default": "identity",
    "aten.add.Tensor": "add",
    "aten.add.Scalar": "add",
    "aten.sub.Tensor": "sub",
    "aten.sub.Scalar": "sub",
    "aten.mul.Tensor": "mul",
    "aten.mul.Scalar": "mul",
    "aten.div.Tensor": "div",
    "aten.div.Scalar": "div",
    "aten.maximum.default": "maximum",
    "aten.minimum.default": "minimum",
}
_POWERS = {
    2.0: "square",
    3.0: "cube",
    0.5: "sqrt",
    -0.5: "rsqrt",
    -1.0: "reciprocal",
    1.0: "identity",
}
_REDUCE = {
    "aten.mean.dim": "mean",
    "aten.sum.dim_IntList": "sum",
    "aten.amax.default": "amax",
    "aten.amin.default": "amin",
}
_SPECIAL = (
    "aten.pow.Tensor_Scalar",
    "aten.rsub.Scalar",
    "aten.gelu.default",
    "aten._to_copy.default",
)
_ALLOWED_KWARGS = {"memory_format"}


def op_key(node: fx.Node) -> str:
    """`aten.add.Tensor`: the overload's qualified name."""
    return str(node.target)


def dtype_of(node: Any) -> str | None:
    value = node.meta.get("val") if hasattr(node, "meta") else None
    return str(value.dtype).removeprefix("torch.") if hasattr(value, "dtype") else None


def shape_of(node: fx.Node) -> tuple[str, ...]:
    """The node's shape with symbolic sizes by name (equal strings: equal sizes)."""
    return tuple(str(d) for d in node.meta["val"].shape)


@dataclass
class Fusible:
    """What a fusible node becomes: a codegen op name, its args (nodes or numbers), its space."""

    op: str
    args: list[Any]
    space: tuple[str, ...]
    reduces: bool = False


def fusible(node: fx.Node) -> Fusible | str:
    """The node as a codegen op, or why it cannot join a fusion group."""
    key = op_key(node)
    if node.op != "call_function" or key not in (*_DIRECT, *_REDUCE, *_SPECIAL):
        return f"{key}: no generated form"
    tensors = [a for a in node.all_input_nodes]
    if dtype_of(node) not in FLOAT_DTYPES or any(dtype_of(a) not in FLOAT_DTYPES for a in tensors):
        return f"{key}: not a float16/bfloat16/float32 op"
    shape = shape_of(node)
    if not shape:
        return f"{key}: a 0-d value"
    if key in _REDUCE:
        return _reduction(node, key)
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if key == "aten._to_copy.default":
        if set(kwargs) - {"dtype", "memory_format"}:
            return f"{key}: changes more than the dtype"
        target = str(kwargs.get("dtype")).removeprefix("torch.")
        name = {"float16": "cast_float16", "bfloat16": "cast_bfloat16"}.get(target, "identity")
        return Fusible(name, args[:1], shape)
    if key == "aten.pow.Tensor_Scalar":
        name = _POWERS.get(float(args[1])) if isinstance(args[1], (int, float)) else None
        return Fusible(name, args[:1], shape) if name else f"{key}: exponent {args[1]}"
    if key == "aten.rsub.Scalar":
        if kwargs.get("alpha", 1) != 1 or len(args) > 2:
            return f"{key}: alpha"
        return Fusible("sub", [args[1], args[0]], shape)
    if key == "aten.gelu.default":
        approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        return Fusible("gelu" if approximate == "none" else "gelu_tanh", args[:1], shape)
    if set(kwargs) - _ALLOWED_KWARGS or (
        key.startswith(("aten.add", "aten.sub")) and len(args) > 2
    ):
        return f"{key}: {sorted(kwargs) or 'alpha'} not generated"
    if not all(_is_arg(a) for a in args):
        return f"{key}: an argument that is neither a tensor nor a number"
    return Fusible(_DIRECT[key], args, shape)


def _is_arg(arg: Any) -> bool:
    return hasattr(arg, "meta") or (isinstance(arg, (int, float)) and not isinstance(arg, bool))


def _reduction(node: fx.Node, key: str) -> Fusible | str:
    source = node.args[0]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    rank = len(source.meta["val"].shape)
    if node.kwargs.get("dtype") is not None:
        return f"{key}: a dtype argument"
    if not keepdim or list(dims or []) not in ([-1], [rank - 1]):
        return f"{key}: not a keepdim reduction over the last dim"
    return Fusible(_REDUCE[key], [source], shape_of(source), reduces=True)


def row_of(space: tuple[str, ...]) -> tuple[str, ...]:
    return (*space[:-1], "1")


def combine(group: tuple[str, ...], node: tuple[str, ...]) -> tuple[str, ...] | None:
    """The iteration space of a group holding both, or None when they do not share one."""
    if group == node:
        return group
    if len(group) != len(node):
        return None
    if node == row_of(group):
        return group
    if group == row_of(node):
        return node
    return None


@dataclass(eq=False)
class FusionGroup:
    """Nodes that become one generated kernel, in graph order, and their iteration space."""

    nodes: list[fx.Node]
    space: tuple[str, ...]
    start: int  # graph position of the first node: the group runs there
    ops: dict[fx.Node, Fusible] = field(default_factory=dict)

    @property
    def row_wise(self) -> bool:
        """Reduces, or holds [..., 1] values beside [..., N] ones: one program per row."""
        return any(f.reduces or tuple(shape_of(n)) != self.space for n, f in self.ops.items())

    def inputs(self) -> list[fx.Node]:
        seen: list[fx.Node] = []
        for node in self.nodes:
            for arg in self.ops[node].args:
                if hasattr(arg, "meta") and arg not in self.ops and arg not in seen:
                    seen.append(arg)
        return seen

    def outputs(self) -> list[fx.Node]:
        """Nodes whose values are used outside the group (or are graph outputs)."""
        return [n for n in self.nodes if any(u not in self.ops for u in n.users)]

    def description(self) -> dict[str, Any]:
        """The codegen description (codegen.py's module docstring)."""
        inputs = self.inputs()
        index = {n: i for i, n in enumerate(self.nodes)}
        row = int(self.space[-1]) if self.row_wise else None

        def ref(arg: Any) -> Any:
            if arg in index:
                return {"op": index[arg]}
            if hasattr(arg, "meta"):
                return {"in": inputs.index(arg)}
            return float(arg)

        return {
            "rank": len(self.space),
            "row_size": row,
            "inputs": [
                {"dtype": dtype_of(a), "row": bool(row) and _is_row(a, self.space)} for a in inputs
            ],
            "ops": [
                {
                    "op": self.ops[n].op,
                    "args": [ref(a) for a in self.ops[n].args],
                    "dtype": dtype_of(n),
                }
                for n in self.nodes
            ],  # fmt: skip
            "outputs": [{"op": index[n], "order": memory_order(n)} for n in self.outputs()],
        }


def memory_order(node: fx.Node) -> list[int] | None:
    """The dims of the node's value from the largest stride to the smallest (None: the
    row-major order), as ATen lays the op's output out."""
    value = node.meta["val"]
    strides = [int(s.node.hint) if hasattr(s, "node") else int(s) for s in value.stride()]
    order = sorted(range(len(strides)), key=lambda d: -strides[d])
    return None if order == list(range(len(strides))) else order


def _is_row(node: fx.Node, space: tuple[str, ...]) -> bool:
    shape = shape_of(node)
    return len(shape) >= 1 and shape[-1] == "1" and space[-1] != "1"


@dataclass
class FusionPlan:
    groups: list[FusionGroup]
    not_fused: dict[str, int]  # why nodes of a fusible kind stayed apart, with counts


def plan_fusion(graph: fx.Graph, bytes_of: Callable[[fx.Node], float] | None = None) -> FusionPlan:
    """Group the graph's fusible chains (module docstring). `bytes_of(node)`: the cost model's
    bytes of an ATen node run on its own, to keep only groups that save memory traffic."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    group_of: dict[fx.Node, FusionGroup] = {}
    groups: list[FusionGroup] = []
    for node in graph.nodes:
        found = fusible(node) if node.op == "call_function" else "not a call"
        if isinstance(found, str):
            continue
        producers = list(dict.fromkeys(group_of[a] for a in node.all_input_nodes if a in group_of))
        # every producer's group merged into one, else the first group the node can join alone
        choices = [producers, *([g] for g in producers)] if len(producers) > 1 else [producers]
        joined = next(filter(None, (_join(c, node, found, order) for c in choices)), None)
        if joined is None:
            joined = FusionGroup([], found.space, order[node])
        groups = [g for g in groups if g.nodes[0] not in joined.ops] + [joined]
        joined.nodes.append(node)
        joined.ops[node] = found
        for member in joined.nodes:
            group_of[member] = joined
    kept, why = [], {}
    for group in groups:
        reason = why_not_kept(group, bytes_of)
        if reason is None:
            kept.append(group)
        elif len(group.nodes) > 1:
            why[reason] = why.get(reason, 0) + len(group.nodes)
    return FusionPlan(kept, why)


def _join(
    candidates: list[FusionGroup], node: fx.Node, found: Fusible, order: dict[fx.Node, int]
) -> FusionGroup | None:
    """The candidates merged into one group the node may join (not holding it yet), or None:
    their spaces must combine, and every value the merged group reads from outside must be
    computed before its first node (where it runs)."""
    if not candidates:
        return None
    space = found.space
    for group in candidates:
        space = space and combine(group.space, space)
    if space is None:
        return None
    members = sorted((n for g in candidates for n in g.nodes), key=order.__getitem__)
    start = order[members[0]]
    inside = set(members) | {node}
    for member in inside:
        if any(a not in inside and order[a] >= start for a in member.all_input_nodes):
            return None
    ops = {n: f for g in candidates for n, f in g.ops.items()}
    return FusionGroup(members, space, start, ops)


def why_not_kept(group: FusionGroup, bytes_of: Callable[[fx.Node], float] | None) -> str | None:
    if len(group.nodes) < 2:
        return "a single op"
    if group.row_wise:
        size = group.space[-1]
        if not size.isdigit() or not 1 < int(size) <= MAX_ROW_SIZE:
            return f"row-wise group over a last dim of {size} (needs 2..{MAX_ROW_SIZE})"
    if bytes_of is not None:
        separate = sum(bytes_of(n) for n in group.nodes)
        fused = sum(value_bytes(n) for n in group.inputs() + group.outputs())
        if fused >= separate:
            return "moves no less memory than its ops one by one"
    return None


def value_bytes(node: fx.Node) -> float:
    value = node.meta.get("val")
    numel = 1
    for d in value.shape:
        numel *= int(d.node.hint) if hasattr(d, "node") else int(d)
    return float(numel * value.element_size())
