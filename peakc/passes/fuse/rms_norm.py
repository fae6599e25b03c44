"""RMSNorm: x * rsqrt(mean(x^2, -1) + eps) * weight, with optional fp32 casts → peakc::rms_norm.

Also the Gemma form, scale (1 + weight): the shifted weight is folded into a new weight.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from peakc.ir import ops  # noqa: F401  (registers peakc::rms_norm)
from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import (
    aten,
    dtype_of,
    is_op,
    is_scalar,
    only_user,
    shape_of,
)
from peakc.passes.fuse.engine import FusionRule, Match, new_weight


def strip_cast(node: fx.Node) -> fx.Node:
    """The tensor a dtype cast reads (`_to_copy` with only a dtype), or the node itself."""
    if is_op(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"}:
        return node.args[0]
    return node


def match_rms_core(node: fx.Node) -> tuple[fx.Node, float, list[fx.Node], fx.Node] | str:
    """From an rsqrt anchor: (fp32 input, eps, nodes, x * rsqrt node) or why not."""
    add = node.args[0]
    if not is_op(add, aten.add.Tensor, aten.add.Scalar):
        return "rsqrt input is not mean + eps"
    mean, eps = add.args[0], add.args[1]
    if isinstance(mean, (int, float)):
        mean, eps = eps, mean
    if not isinstance(eps, (int, float)):
        return "eps is not a constant"
    if not is_op(mean, aten.mean.dim):
        return "rsqrt input is not a mean"
    dims = mean.args[1]
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    square = mean.args[0]
    if is_op(square, aten.pow.Tensor_Scalar) and square.args[1] == 2:
        xf = square.args[0]
    elif is_op(square, aten.mul.Tensor) and square.args[0] is square.args[1]:
        xf = square.args[0]
    else:
        return "mean is not over a square"
    rank = len(shape_of(xf))
    if not keepdim or list(dims) not in ([-1], [rank - 1]):
        return f"mean is over dims {list(dims)} (keepdim={keepdim}), not the last dim"
    scaled = [u for u in node.users if is_op(u, aten.mul.Tensor) and xf in u.args]
    if len(node.users) != 1 or not scaled:
        return "rsqrt is not multiplied by the normalized input"
    return xf, float(eps), [square, mean, add, node, scaled[0]], scaled[0]


class RmsNormRule(FusionRule):
    name = "rms_norm"

    def is_anchor(self, node: fx.Node) -> bool:
        return is_op(node, aten.rsqrt.default)

    def match(self, node: fx.Node) -> Match | str:
        core = match_rms_core(node)
        if isinstance(core, str):
            return core
        xf, eps, nodes, out = core
        rounded = len(out.users) == 1 and is_op(only_user(out), aten._to_copy.default)
        if rounded:
            out = only_user(out)
            nodes.append(out)
        weight_mul = only_user(out)
        if not is_op(weight_mul, aten.mul.Tensor):
            return "normalized value is not scaled by a weight"
        weight = weight_mul.args[1] if weight_mul.args[0] is out else weight_mul.args[0]
        hidden = shape_of(xf)[-1]
        if not isinstance(weight, fx.Node) or shape_of(weight) != (hidden,):
            return f"scale is not a [{hidden}] weight"
        nodes.append(weight_mul)
        # The op scales in promote(x, w): pick the input that makes that the graph's dtype.
        scaled_in = dtype_of(out)
        x = strip_cast(xf)
        if torch.promote_types(dtype_of(x), dtype_of(weight)) != scaled_in:
            x = xf
        if torch.promote_types(dtype_of(x), dtype_of(weight)) != scaled_in:
            return (
                f"normalized value is scaled in {scaled_in} by a {dtype_of(weight)} weight "
                f"after rounding"
            )
        if x is not xf:
            nodes.insert(0, xf)
        values = {"x": x, "w": weight, "eps": eps, "shift": 0.0, "cast": None}
        shifted = self._gemma_weight(weight)
        if shifted is not None:
            values["w"], values["shift"], values["cast"] = shifted
            nodes.insert(0, weight)
            if values["cast"] is not None:  # the w.float() that fed the + 1
                nodes.insert(0, next(a for a in weight.args if isinstance(a, fx.Node)))
        return Match(outputs=[weight_mul], nodes=nodes, values=values)

    @staticmethod
    def _gemma_weight(weight: fx.Node) -> tuple[fx.Node, float, torch.dtype | None] | None:
        """(raw weight, 1.0, cast dtype) when the scale is `weight [.to(dtype)] + 1` (Gemma)."""
        if not is_op(weight, aten.add.Tensor) or len(weight.users) != 1:
            return None
        a, b = weight.args[0], weight.args[1]
        scaled, shift = (a, b) if isinstance(a, fx.Node) else (b, a)
        raw, cast = scaled, None
        if isinstance(scaled, fx.Node) and strip_cast(scaled) is not scaled:
            if len(scaled.users) != 1:
                return None
            raw, cast = strip_cast(scaled), dtype_of(scaled)
        if isinstance(raw, fx.Node) and raw.op == "get_attr" and is_scalar(shift, 1.0):
            return raw, 1.0, cast
        return None

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        v = match.values
        weight = v["w"]
        if v["shift"]:  # folded in the dtype the graph added in (fp32 for Gemma's w.float() + 1)
            stored = graph.get_weight(weight.target)
            folded = (stored if v["cast"] is None else stored.to(v["cast"])) + v["shift"]
            weight = new_weight(graph, weight.target + "_plus_one", folded)
        return graph.graph.call_function(
            torch.ops.peakc.rms_norm.default, (v["x"], weight, v["eps"])
        )
