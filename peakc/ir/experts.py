"""Experts of mixture-of-experts layers, found by module path (`...mlp.experts.3.down_proj`).

Capture tags every node inside an expert with its MoE module and expert index (node.meta
EXPERT_KEY), so passes and reports can treat the experts of one layer together. Models whose
experts are stacked in one weight (transformers' Mixtral, Qwen2-MoE, OLMoE) export their
routed computation through a grouped matmul: transformers' own fallback op, or PyTorch's
`aten._grouped_mm` where transformers picks it (bfloat16 weights, or a CUDA device). Capture
swaps either for `peakc::grouped_mm` (same arguments), so the graph is the same whatever
transformers chose and artifacts load without transformers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.fx as fx

    from peakc.ir.graph import Graph

EXPERT_KEY = "peakc_expert"  # node.meta: {"moe": module path of the layer, "index": expert}
_EXPERT = re.compile(r"^(.*?)\.experts\.(\d+)(?:\.|$)")


def expert_of(module: str) -> tuple[str, int] | None:
    """(MoE module path, expert index) of a module path inside an expert, else None."""
    match = _EXPERT.match(module)
    return (match.group(1), int(match.group(2))) if match else None


def adopt_grouped_mm(graph: Graph) -> int:
    """Replace transformers' `grouped_mm_fallback` nodes, and `aten._grouped_mm` nodes of the
    same form (x [T, K], stacked weight [E, K, N], offsets; no bias or output dtype), by
    `peakc::grouped_mm`; returns how many were replaced."""
    import torch

    from peakc.ir.ops import GROUPED_MM

    replaced = 0
    for node in graph.graph.nodes:
        target = node.target
        fallback = getattr(target, "namespace", None) == "transformers" and (
            target._schema.name == "transformers::grouped_mm_fallback"
        )
        native = (
            target is torch.ops.aten._grouped_mm.default
            and len(node.args) == 3
            and not node.kwargs
            and _ranks(node) == (2, 3)
        )
        if fallback or native:
            node.target = GROUPED_MM.overload
            replaced += 1
    return replaced


def _ranks(node: fx.Node) -> tuple[int, ...]:
    """The ranks of a grouped matmul's x and weight, from their recorded values."""
    vals = [getattr(arg, "meta", {}).get("val") for arg in node.args[:2]]
    return tuple(v.dim() if v is not None else -1 for v in vals)


def tag_experts(graph: Graph) -> int:
    """Mark the nodes inside experts (node.meta[EXPERT_KEY]); returns how many were marked."""
    from peakc.ir.graph import MODULE_KEY

    marked = 0
    for node in graph.graph.nodes:
        found = expert_of(node.meta.get(MODULE_KEY, ""))
        if found is not None:
            node.meta[EXPERT_KEY] = {"moe": found[0], "index": found[1]}
            marked += 1
    return marked
