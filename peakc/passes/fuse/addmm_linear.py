"""GPT-2 Conv1D: view(x, [-1, K]) → addmm(bias, ·, W[K, N]) → view back, becomes one
aten.linear(x, W.T, bias) over a transposed copy of the weight, so later rules see a linear."""

from __future__ import annotations

import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import aten, is_op, only_user, shape_of
from peakc.passes.fuse.engine import FusionRule, Match, new_weight

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class AddmmLinearRule(FusionRule):
    name = "addmm_linear"

    def is_anchor(self, node: fx.Node) -> bool:
        return is_op(node, aten.addmm.default)

    def match(self, node: fx.Node) -> Match | str:
        bias, flat, weight = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm has beta or alpha"
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            return "matrix operand is not a stored weight"
        if not (isinstance(bias, fx.Node) and len(shape_of(bias)) == 1):
            return "bias is not a vector"
        if not is_op(flat, *_VIEWS):
            return "input is not a flattened tensor"
        x = flat.args[0]
        back = only_user(node)
        n = shape_of(weight)[1]
        if not is_op(back, *_VIEWS) or shape_of(back) != (*shape_of(x)[:-1], n):
            return "output is not viewed back to the input's leading dims"
        nodes = [flat, node, back] if len(flat.users) == 1 else [node, back]
        return Match(outputs=[back], nodes=nodes, values={"x": x, "w": weight, "b": bias})

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        v = match.values
        transposed = graph.get_weight(v["w"].target).t().contiguous()
        w = new_weight(graph, v["w"].target + "_t", transposed)
        return graph.graph.call_function(aten.linear.default, (v["x"], w, v["b"]))
