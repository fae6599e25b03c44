"""Horizontal linear fusion: linears reading the same input (q/k/v, gate/up) become one wider
linear over concatenated weights, whose output is split back into the original values."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import aten, is_op, shape_of
from peakc.passes.fuse.engine import FusionRule, Match, new_weight


def _linear_users(x: fx.Node) -> list[fx.Node]:
    return [u for u in x.users if is_op(u, aten.linear.default) and u.args[0] is x]


def _bias(node: fx.Node) -> fx.Node | None:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def fused_weight_name(targets: list[str]) -> str:
    """`m.q_proj.weight`, `m.k_proj.weight` → `m.fused_q_proj_k_proj.weight`."""
    modules = [t.rsplit(".", 1)[0].split(".") for t in targets]
    common: list[str] = []
    for column in zip(*modules):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    leaves = ["_".join(m[len(common) :]) or "self" for m in modules]
    return ".".join([*common, "fused_" + "_".join(leaves), targets[0].rsplit(".", 1)[1]])


class HorizontalLinearRule(FusionRule):
    name = "horizontal_linear"

    def is_anchor(self, node: fx.Node) -> bool:
        if not is_op(node, aten.linear.default):
            return False
        siblings = _linear_users(node.args[0])
        return len(siblings) > 1 and siblings[0] is node

    def match(self, node: fx.Node) -> Match | str:
        siblings = _linear_users(node.args[0])
        for lin in siblings:
            if lin.args[1].op != "get_attr":
                return f"weight of '{lin.name}' is computed, not a stored weight"
            bias = _bias(lin)
            if bias is not None and bias.op != "get_attr":
                return f"bias of '{lin.name}' is computed, not a stored weight"
        if len({_bias(lin) is None for lin in siblings}) != 1:
            return "some of the linears have a bias and some do not"
        if len({shape_of(lin.args[1])[1:] for lin in siblings}) != 1:
            return "weights differ in input width"
        return Match(outputs=siblings, nodes=list(siblings), values={"x": node.args[0]})

    def rewrite(self, graph: Graph, match: Match) -> list[fx.Node]:
        linears = match.outputs
        weights = [lin.args[1].target for lin in linears]
        name = fused_weight_name(weights)
        w = new_weight(graph, name, torch.cat([graph.get_weight(t) for t in weights], dim=0))
        args = [match.values["x"], w]
        if _bias(linears[0]) is not None:
            biases = [graph.get_weight(_bias(lin).target) for lin in linears]
            args.append(new_weight(graph, name.rsplit(".", 1)[0] + ".bias", torch.cat(biases)))
        wide = graph.graph.call_function(aten.linear.default, tuple(args))
        sizes = [shape_of(lin)[-1] for lin in linears]
        split = graph.graph.call_function(aten.split_with_sizes.default, (wide, sizes, -1))
        return [graph.graph.call_function(operator.getitem, (split, i)) for i in range(len(sizes))]
