"""Linear + bias + activation epilogue → peakc::linear_act(x, weight, bias, activation)."""

from __future__ import annotations

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import aten, is_op
from peakc.passes.fuse.engine import FusionRule, Match
from peakc.passes.fuse.glu import activation_name

peakc_ops = torch.ops.peakc


def epilogue_activation(node: fx.Node) -> str | None:
    """The activation an epilogue node applies (aten relu/silu/gelu or bias-free peakc::gelu)."""
    if is_op(node, peakc_ops.gelu.default) and node.args[1] is None:
        return "gelu_tanh" if node.args[2] == "tanh" else "gelu"
    return activation_name(node)


class LinearActRule(FusionRule):
    name = "linear_act"

    def is_anchor(self, node: fx.Node) -> bool:
        return epilogue_activation(node) is not None

    def match(self, node: fx.Node) -> Match | str:
        linear = node.args[0]
        if not is_op(linear, aten.linear.default):
            return f"activation input '{getattr(linear, 'name', linear)}' is not a linear"
        if len(linear.users) != 1:
            return f"linear '{linear.name}' has other users"
        x, weight = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        return Match(
            outputs=[node],
            nodes=[linear, node],
            values={"args": (x, weight, bias, epilogue_activation(node))},
        )

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        return graph.graph.call_function(peakc_ops.linear_act.default, match.values["args"])
