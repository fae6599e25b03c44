"""GELU: aten.gelu, the spelled-out tanh form (GPT-2's gelu_new) and the erf form, with an
optional preceding bias add → peakc::gelu(x, bias, approximate) (ORT Gelu/FastGelu/BiasGelu)."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import aten, is_op, is_scalar, only_user, scalar_operand, shape_of
from peakc.passes.fuse.engine import FusionRule, Match

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _scalar_mul_of(node: object, value: float) -> fx.Node | None:
    """t when node is t * value (either order), else None."""
    if not is_op(node, aten.mul.Tensor):
        return None
    found = scalar_operand(node)
    return found[0] if found and is_scalar(found[1], value, 1e-4) else None


def _scaled_by_inv_sqrt2(node: object) -> fx.Node | None:
    """x when node is x * (1 / sqrt(2)) or x / sqrt(2), else None."""
    if is_op(node, aten.div.Tensor) and isinstance(node.args[0], fx.Node):
        return node.args[0] if is_scalar(node.args[1], math.sqrt(2.0), 1e-4) else None
    return _scalar_mul_of(node, 1.0 / math.sqrt(2.0))


def _outer_half_product(inner_plus_one: fx.Node, x: fx.Node) -> tuple[fx.Node, list] | None:
    """The final 0.5 * x * (1 + inner) node (both associations), and its helper nodes."""
    out = only_user(inner_plus_one)
    if not is_op(out, aten.mul.Tensor):
        return None
    other = out.args[0] if out.args[1] is inner_plus_one else out.args[1]
    if _scalar_mul_of(other, 0.5) is x and len(other.users) == 1:
        return out, [other]
    halved = only_user(out)
    if other is x and _scalar_mul_of(halved, 0.5) is out:
        return halved, []
    return None


class GeluRule(FusionRule):
    name = "gelu"

    def is_anchor(self, node: fx.Node) -> bool:
        return is_op(node, aten.gelu.default, aten.tanh.default, aten.erf.default)

    def match(self, node: fx.Node) -> Match | str:
        if is_op(node, aten.gelu.default):
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            return self._with_bias(node.args[0], [node], node, approx)
        plus_one = only_user(node)
        if not (
            is_op(plus_one, aten.add.Tensor)
            and scalar_operand(plus_one)
            and is_scalar(scalar_operand(plus_one)[1], 1.0)
        ):
            return f"{node.target.__name__.split('.')[0]} is not followed by + 1"
        if is_op(node, aten.erf.default):
            x = _scaled_by_inv_sqrt2(node.args[0])
            if x is None:
                return "erf input is not x / sqrt(2) or x * (1 / sqrt(2))"
            inner = [node.args[0], node]
            approx = "none"
        else:
            poly = _scalar_mul_of(node.args[0], _SQRT_2_OVER_PI)
            if not is_op(poly, aten.add.Tensor):
                return "tanh input is not sqrt(2/pi) * (x + 0.044715 x^3)"
            x = next((a for a in poly.args if not _scalar_mul_of(a, 0.044715)), None)
            cube = next(
                (_scalar_mul_of(a, 0.044715) for a in poly.args if _scalar_mul_of(a, 0.044715)),
                None,
            )
            if not (
                is_op(cube, aten.pow.Tensor_Scalar)
                and cube.args[0] is x
                and is_scalar(cube.args[1], 3.0)
            ):
                return "tanh polynomial is not x + 0.044715 * x^3"
            inner = [cube, cube.users and next(iter(cube.users)), poly, node.args[0], node]
            approx = "tanh"
        outer = _outer_half_product(plus_one, x)
        if outer is None:
            return "result is not 0.5 * x * (1 + ...)"
        out, extra = outer
        if extra:
            nodes = [*extra, *inner, plus_one, out]
        else:
            nodes = [*inner, plus_one, only_user(plus_one), out]
        nodes = list(dict.fromkeys(n for n in nodes if isinstance(n, fx.Node)))
        return self._with_bias(x, nodes, out, approx)

    @staticmethod
    def _with_bias(x: fx.Node, nodes: list[fx.Node], out: fx.Node, approx: str) -> Match:
        bias = None
        if is_op(x, aten.add.Tensor) and all(u in nodes for u in x.users):
            a, b = x.args[0], x.args[1]
            for t, bb in ((a, b), (b, a)):
                if (
                    isinstance(bb, fx.Node)
                    and isinstance(t, fx.Node)
                    and shape_of(bb) == (shape_of(t)[-1],)
                    and shape_of(t) == shape_of(x)
                ):
                    x, bias, nodes = t, bb, [x, *nodes]
                    break
        return Match(outputs=[out], nodes=nodes, values={"args": (x, bias, approx)})

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        return graph.graph.call_function(torch.ops.peakc.gelu.default, match.values["args"])
