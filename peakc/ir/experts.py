"""Experts of mixture-of-experts layers, found by module path (`...mlp.experts.3.down_proj`).

Capture tags every node inside an expert with its MoE module and expert index (node.meta
EXPERT_KEY), so passes and reports can treat the experts of one layer together. Models whose
experts are stacked in one weight (transformers' Mixtral, Qwen2-MoE, OLMoE) export their
routed computation through transformers' own grouped matmul op; capture swaps it for
`peakc::grouped_mm` (same arguments), so artifacts load without transformers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peakc.ir.graph import Graph

EXPERT_KEY = "peakc_expert"  # node.meta: {"moe": module path of the layer, "index": expert}
_EXPERT = re.compile(r"^(.*?)\.experts\.(\d+)(?:\.|$)")


def expert_of(module: str) -> tuple[str, int] | None:
    """(MoE module path, expert index) of a module path inside an expert, else None."""
    match = _EXPERT.match(module)
    return (match.group(1), int(match.group(2))) if match else None


def adopt_grouped_mm(graph: Graph) -> int:
    """Replace transformers' `grouped_mm_fallback` nodes by `peakc::grouped_mm`; returns how
    many were replaced."""
    from peakc.ir.ops import GROUPED_MM

    replaced = 0
    for node in graph.graph.nodes:
        target = node.target
        if getattr(target, "namespace", None) == "transformers" and (
            target._schema.name == "transformers::grouped_mm_fallback"
        ):
            node.target = GROUPED_MM.overload
            replaced += 1
    return replaced


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
