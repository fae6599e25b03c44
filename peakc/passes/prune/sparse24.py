"""sparse24: store 2:4-sparse linears compressed, as `linear_sparse24` (float weights) or
`linear_sparse24_wq` (a GPTQ/RTN linear_wq whose dequantized weight is 2:4, as prune{pattern=2:4}
then quantize leaves it: quantization keeps pruned weights at exactly zero).

Pattern, check, rewrite: each `aten.linear` with a stored weight and each `linear_wq` with
contiguous groups is checked (every 4 consecutive input columns of a row hold at most two
nonzeros) and rewritten; a layer that is not 2:4 keeps its op and the report says why. A layer
whose K is not a multiple of 4, or whose quantization groups are not whole groups of 4, is an
error naming it. prune{emit=sparse24} runs the same rewrite on the layers it pruned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from peakc.errors import PeakcError
from peakc.passes.base import Pass, PassContext, PassResult, register_pass

if TYPE_CHECKING:  # the declaration stays light for `peakc passes`
    import torch
    from torch import fx

    from peakc.ir.graph import Graph


@dataclass
class Sparse24Options:
    targets: str = ""  # regex on module path; empty: every linear and linear_wq


@register_pass
class Sparse24Pass(Pass):
    """Rewrite 2:4-sparse linears (float or quantized) into the 2:4-compressed ops."""

    name: ClassVar[str] = "sparse24"
    Options: ClassVar[type] = Sparse24Options
    parity_tol: ClassVar[float | None] = 1e-3  # same weights; the matmul may round differently

    def validate(self) -> None:
        try:
            re.compile(self.options.targets)
        except re.error as exc:
            raise PeakcError(f"pass 'sparse24': option 'targets' is not a regex: {exc}") from None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        pattern = re.compile(self.options.targets)
        nodes = [n for n in graph.call_nodes() if pattern.search(module_of(n))]
        before = ctx.cost.phases_or_reason(graph)
        outcome = compress_sparse24_linears(graph, nodes)
        stats = {
            "linear_sparse24": outcome.float_layers,
            "linear_sparse24_wq": outcome.quantized_layers,
            "kept_dense": len(outcome.skipped),
        }
        report: dict = {"kept_dense": outcome.skipped}
        if outcome.rewritten:
            from peakc.cost_model.predict import cost_change

            report["cost"] = cost_change(before, ctx.cost.phases_or_reason(graph))
        return PassResult(graph, outcome.rewritten > 0, stats, report=report)


@dataclass
class Sparse24Outcome:
    """What the rewrite did: layers rewritten per op, and each layer left alone with why."""

    float_layers: int = 0
    quantized_layers: int = 0
    skipped: dict[str, str] | None = None

    @property
    def rewritten(self) -> int:
        return self.float_layers + self.quantized_layers


def module_of(node: fx.Node) -> str:
    return node.meta.get("peakc_module", node.name)


def compress_sparse24_linears(graph: Graph, nodes: list[fx.Node]) -> Sparse24Outcome:
    """Rewrite each linear / linear_wq among `nodes` whose weight is 2:4 (module docstring)."""
    import torch

    from peakc.ir.ops import LINEAR_WQ

    outcome = Sparse24Outcome(skipped={})
    for node in nodes:
        if node.target == torch.ops.aten.linear.default:
            reason = _rewrite_linear(graph, node)
            if reason is None:
                outcome.float_layers += 1
        elif node.target == LINEAR_WQ.overload:
            reason = _rewrite_linear_wq(graph, node)
            if reason is None:
                outcome.quantized_layers += 1
        else:
            continue
        if reason is not None:
            outcome.skipped[module_of(node)] = reason
    return outcome


def _stored(graph: Graph, node: object) -> torch.Tensor | None:
    return graph.get_weight(node.target) if getattr(node, "op", None) == "get_attr" else None


def _compressed(w: torch.Tensor, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(values, meta) of a 2:4 weight, or why it is not 2:4. K % 4 != 0 is an error for a
    layer that prune recorded as 2:4, a reason for any other."""
    from peakc.ir.graph import SPARSITY_KEY
    from peakc.ir.ops import compress_sparse24

    layer = module_of(node)
    if w.shape[1] % 4:
        if node.meta.get(SPARSITY_KEY, {}).get("pattern") != "2:4":
            return f"in_features {w.shape[1]} is not a multiple of 4"
        raise PeakcError(
            f"sparse24: layer {layer}: in_features {w.shape[1]} is not a multiple of 4, so 2:4 "
            "compression cannot tile it"
        )
    if bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) > 2).any()):
        return "not 2:4 sparse (a group of 4 input columns holds more than two nonzeros)"
    return compress_sparse24(w, layer)


def _rewrite_linear(graph: Graph, node: fx.Node) -> str | None:
    """aten.linear(x, W, b) -> linear_sparse24(x, values, meta, b, K); None when rewritten."""
    from peakc.ir.ops import LINEAR_SPARSE24

    x, weight, *rest = node.args
    w = _stored(graph, weight)
    if w is None or w.dim() != 2:
        return "the weight is not a stored 2-D tensor"
    compressed = _compressed(w, node)
    if isinstance(compressed, str):
        return compressed
    values, meta = compressed
    bias = rest[0] if rest else None
    added = _add(graph, node, weight.target, {"values": values, "meta": meta})
    args = (x, added["values"], added["meta"], bias, w.shape[1])
    graph.replace_call(node, LINEAR_SPARSE24.overload, args, [weight])
    return None


def _rewrite_linear_wq(graph: Graph, node: fx.Node) -> str | None:
    """linear_wq -> linear_sparse24_wq with the kept values' codes and the same scales and zero
    points (groups of G dense columns hold G/2 kept values); None when rewritten."""
    import torch

    from peakc.ir.ops import LINEAR_SPARSE24_WQ, PackedWeight, pack_bits, unpack_bits

    x, packed, bias = PackedWeight.of(node.args)
    tensors = {k: _stored(graph, n) for k, n in packed.tensors().items()}
    if any(t is None for t in tensors.values()):
        return "the packed weights are not stored tensors"
    weight = packed.with_tensors(tensors)
    k, layer = packed.in_features, module_of(node)
    natural = torch.arange(k, device=weight.qweight.device) // packed.group_size
    if weight.g_idx is not None and not torch.equal(weight.g_idx.long(), natural):
        return "act-order groups (a kept value's group would differ per row)"
    per_channel = weight.scales.shape[1] == 1
    if not per_channel and packed.group_size % 4:
        raise PeakcError(
            f"sparse24: layer {layer}: group size {packed.group_size} is not a multiple of 4, "
            "so its groups do not hold whole 2:4 groups"
        )
    compressed = _compressed(weight.dequantize(), node)
    if isinstance(compressed, str):
        return compressed
    _, meta = compressed
    codes = unpack_bits(weight.qweight, packed.bits, k).reshape(-1, k // 4, 4)
    kept = unpack_bits(meta, 2, k // 2).long().reshape(-1, k // 4, 2)
    qvalues = pack_bits(codes.gather(-1, kept).reshape(-1, k // 2), packed.bits)
    group_size = k if per_channel else packed.group_size
    old = list(packed.tensors().values())
    added = _add(graph, node, packed.qweight.target, {"qvalues": qvalues, "meta": meta})
    args = (x, added["qvalues"], packed.scales, packed.qzeros, added["meta"], bias, packed.bits,
            group_size, k)  # fmt: skip
    graph.replace_call(node, LINEAR_SPARSE24_WQ.overload, args, old)
    return None


def _add(graph: Graph, node: fx.Node, old_name: str, tensors: dict) -> dict:
    """New weights beside the old one, named `<module>.sparse24_<field>`."""
    prefix = old_name.rsplit(".", 1)[0]
    return {
        key: graph.add_weight(f"{prefix}.sparse24_{key}", value.contiguous(), before=node)
        for key, value in tensors.items()
    }
