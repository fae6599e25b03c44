"""Residual add + norm → peakc::skip_rms_norm / skip_layer_norm, returning (normed, sum)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import aten, is_op, shape_of
from peakc.passes.fuse.engine import FusionRule, Match

peakc_ops = torch.ops.peakc


class SkipNormRule(FusionRule):
    """Runs after rms_norm/layer_norm: fuses the residual add feeding a fused norm."""

    name = "skip_norm"

    def is_anchor(self, node: fx.Node) -> bool:
        return is_op(node, peakc_ops.rms_norm.default, peakc_ops.layer_norm.default)

    def match(self, node: fx.Node) -> Match | str:
        total = node.args[0]
        if not is_op(total, aten.add.Tensor):
            return f"norm input '{getattr(total, 'name', total)}' is not a residual add"
        a, b = total.args[0], total.args[1]
        if total.kwargs.get("alpha", 1) != 1 or not all(isinstance(t, fx.Node) for t in (a, b)):
            return "residual add has a scalar operand or alpha"
        if not (shape_of(a) == shape_of(b) == shape_of(total)):
            return f"residual add broadcasts {shape_of(a)} + {shape_of(b)}"
        outputs = [node, total] if len(total.users) > 1 else [node]
        return Match(outputs=outputs, nodes=[total, node], values={"a": a, "b": b})

    def rewrite(self, graph: Graph, match: Match) -> list[fx.Node]:
        norm = match.output
        a, b = match.values["a"], match.values["b"]
        if norm.target is peakc_ops.rms_norm.default:
            _, weight, eps = norm.args
            fused = graph.graph.call_function(peakc_ops.skip_rms_norm.default, (a, b, weight, eps))
        else:
            _, weight, bias, eps = norm.args
            fused = graph.graph.call_function(
                peakc_ops.skip_layer_norm.default, (a, b, weight, bias, eps)
            )
        outs = [graph.graph.call_function(operator.getitem, (fused, 0))]
        if len(match.outputs) == 2:
            outs.append(graph.graph.call_function(operator.getitem, (fused, 1)))
        return outs
