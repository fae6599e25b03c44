"""A plug-in pass: count the ATen ops in the graph, and optionally fold `x * 1.0` away.

    peakc compile demo:llama -o out/custom --plugin examples/custom_pass.py \
        --pipeline "cleanup,count_ops{fold_mul_one=true},fuse"
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

import peakc


@dataclass
class CountOpsOptions:
    fold_mul_one: bool = False  # rewrite aten.mul(x, 1.0) into x


@peakc.register_pass
class CountOps(peakc.Pass):
    """Count call nodes by op; optionally remove multiplications by one."""

    name = "count_ops"
    Options = CountOpsOptions

    def run(self, graph: peakc.ir.Graph, ctx: peakc.PassContext) -> peakc.PassResult:
        folded = 0
        if self.options.fold_mul_one:
            for node in list(graph.call_nodes()):
                if node.target == torch.ops.aten.mul.Tensor and node.args[1] == 1.0:
                    source = node.args[0]
                    if source.meta["val"].shape == node.meta["val"].shape:
                        node.replace_all_uses_with(source)
                        graph.graph.erase_node(node)
                        folded += 1
        counts = Counter(str(n.target).removeprefix("aten.") for n in graph.call_nodes())
        stats = {f"ops.{name}": count for name, count in counts.most_common(5)}
        stats["folded_mul_one"] = folded
        return peakc.PassResult(graph, modified=folded > 0, stats=stats)
