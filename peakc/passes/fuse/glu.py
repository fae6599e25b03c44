"""Gated MLP activations: act(gate) * up → peakc::glu (SwiGLU with silu, GeGLU with gelu)."""

from __future__ import annotations

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import aten, is_op, shape_of
from peakc.passes.fuse.engine import FusionRule, Match


def activation_name(node: fx.Node) -> str | None:
    """The peakc activation name of an aten activation node, or None."""
    if is_op(node, aten.silu.default):
        return "silu"
    if is_op(node, aten.relu.default):
        return "relu"
    if is_op(node, aten.gelu.default):
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else "gelu"
    return None


class GluRule(FusionRule):
    name = "glu"

    def is_anchor(self, node: fx.Node) -> bool:
        return is_op(node, aten.mul.Tensor) and any(
            isinstance(a, fx.Node) and activation_name(a) in ("silu", "gelu", "gelu_tanh")
            for a in node.args[:2]
        )

    def match(self, node: fx.Node) -> Match | str:
        a, b = node.args[0], node.args[1]
        act = a if isinstance(a, fx.Node) and activation_name(a) else b
        up = b if act is a else a
        if not isinstance(up, fx.Node) or shape_of(up) != shape_of(node):
            return f"'{act.name}' is multiplied by a broadcast or constant, not an up projection"
        if shape_of(act) != shape_of(node):
            return "gate and up shapes differ"
        if len(act.users) != 1:
            return f"activation '{act.name}' has other users"
        gate = act.args[0]
        return Match(
            outputs=[node], nodes=[act, node], values={"args": (gate, up, activation_name(act))}
        )

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        return graph.graph.call_function(torch.ops.peakc.glu.default, match.values["args"])
