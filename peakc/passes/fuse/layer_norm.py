"""LayerNorm over the last dim: aten.layer_norm → peakc::layer_norm (ONNX LayerNormalization)."""

from __future__ import annotations

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import aten, is_op, shape_of
from peakc.passes.fuse.engine import FusionRule, Match


class LayerNormRule(FusionRule):
    name = "layer_norm"

    def is_anchor(self, node: fx.Node) -> bool:
        return is_op(node, aten.layer_norm.default)

    def match(self, node: fx.Node) -> Match | str:
        x, normalized = node.args[0], list(node.args[1])
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
        if len(normalized) != 1 or normalized[0] != shape_of(x)[-1]:
            return f"normalizes over {normalized}, not only the last dim"
        return Match(outputs=[node], nodes=[node], values={"args": (x, weight, bias, float(eps))})

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        return graph.graph.call_function(torch.ops.peakc.layer_norm.default, match.values["args"])
