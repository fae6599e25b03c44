"""RMSNorm: x * rsqrt(mean(x^2, -1) + eps) * weight, with optional fp32 casts → peakc::rms_norm."""

from __future__ import annotations

import torch
import torch.fx as fx

from peakc.ir import ops  # noqa: F401  (registers peakc::rms_norm)
from peakc.ir.graph import Graph
from peakc.passes.fuse.engine import FusionRule, Match

aten = torch.ops.aten


def _is(node: object, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _strip_cast(node: fx.Node) -> fx.Node:
    """The tensor a dtype cast reads (`_to_copy` with only a dtype), or the node itself."""
    if _is(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"}:
        return node.args[0]
    return node


class RmsNormRule(FusionRule):
    name = "rms_norm"

    def is_anchor(self, node: fx.Node) -> bool:
        return _is(node, aten.rsqrt.default)

    def match(self, node: fx.Node) -> Match | str:
        add = node.args[0]
        if not _is(add, aten.add.Tensor, aten.add.Scalar):
            return "rsqrt input is not mean + eps"
        mean, eps = add.args[0], add.args[1]
        if isinstance(mean, (int, float)):
            mean, eps = eps, mean
        if not isinstance(eps, (int, float)):
            return "eps is not a constant"
        if not _is(mean, aten.mean.dim):
            return "rsqrt input is not a mean"
        dims = mean.args[1]
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        square = mean.args[0]
        if _is(square, aten.pow.Tensor_Scalar) and square.args[1] == 2:
            xf = square.args[0]
        elif _is(square, aten.mul.Tensor) and square.args[0] is square.args[1]:
            xf = square.args[0]
        else:
            return "mean is not over a square"
        rank = len(xf.meta["val"].shape)
        if not keepdim or list(dims) not in ([-1], [rank - 1]):
            return f"mean is over dims {list(dims)} (keepdim={keepdim}), not the last dim"
        scaled = [u for u in node.users if _is(u, aten.mul.Tensor) and xf in u.args]
        if len(node.users) != 1 or not scaled:
            return "rsqrt is not multiplied by the normalized input"
        normed = scaled[0]
        nodes = [square, mean, add, node, normed]
        out = normed
        if len(out.users) == 1 and _is(next(iter(out.users)), aten._to_copy.default):
            out = next(iter(out.users))
            nodes.append(out)
        weight_mul = next(iter(out.users)) if len(out.users) == 1 else None
        if not _is(weight_mul, aten.mul.Tensor):
            return "normalized value is not scaled by a weight"
        weight = weight_mul.args[1] if weight_mul.args[0] is out else weight_mul.args[0]
        hidden = xf.meta["val"].shape[-1]
        if not isinstance(weight, fx.Node) or tuple(weight.meta["val"].shape) != (hidden,):
            return f"scale is not a [{hidden}] weight"
        nodes.append(weight_mul)
        x = _strip_cast(xf)
        if x is not xf:
            nodes.insert(0, xf)
        return Match(output=weight_mul, nodes=nodes, values={"x": x, "w": weight, "eps": eps})

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        v = match.values
        return graph.graph.call_function(
            torch.ops.peakc.rms_norm.default, (v["x"], v["w"], float(v["eps"]))
        )
