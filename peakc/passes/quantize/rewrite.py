"""Replace a quantized aten.linear node with peakc::linear_wq and its packed weights."""

from __future__ import annotations

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.ir.ops import LINEAR_WQ, PackedWeight, pack_bits
from peakc.passes.calibration import LinearSite
from peakc.passes.quantize import QUANT_KEY
from peakc.passes.quantize.gptq import QuantizedWeight


def pack_layer(q: QuantizedWeight, bits: int, group_size: int, dtype: torch.dtype) -> PackedWeight:
    """Pack a quantized layer where it was quantized, keep the result on the CPU; scales are
    stored in the original weight's dtype."""
    ints = q.ints.to(torch.int64)
    zeros = q.zeros.to(torch.int64)
    g_idx = None if q.g_idx is None else q.g_idx.to("cpu", torch.int32)
    return PackedWeight(
        qweight=pack_bits(ints, bits).cpu(),
        scales=q.scales.to("cpu", dtype),
        qzeros=pack_bits(zeros, bits).cpu(),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        in_features=ints.shape[1],
    )


def replace_linear(graph: Graph, site: LinearSite, packed: PackedWeight, record: dict) -> fx.Node:
    """Swap `site`'s aten.linear for linear_wq reading `<module>.qweight/.scales/.qzeros/.g_idx`;
    the float weight goes when nothing else reads it."""
    node = site.node
    x = node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    attrs = {
        key: graph.add_weight(f"{site.module}.{key}", value, before=node)
        for key, value in packed.tensors().items()
    }
    args = packed.with_tensors(attrs).args(x, bias)
    new = graph.replace_call(node, LINEAR_WQ.overload, args, [node.args[1]])
    new.meta[QUANT_KEY] = record
    return new
