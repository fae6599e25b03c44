"""compress_moe: mixture-of-experts weights below one bit per parameter (QMoE).

Two kinds of experts are compressed: the linears inside experts (module paths
`...experts.N...`, e.g. a dense model split by peakc.models.moe.moefy) and routed experts
stacked in one weight (transformers' Mixtral, Qwen2-MoE, OLMoE: `peakc::grouped_mm` over
[E, N, K], peakc/ir/experts.py). Their weights are quantized to ternary (or 2-bit) levels by
GPTQ, calibrated block by block and stage by stage; the levels of all experts then get one
dictionary code (peakc/ir/dictionary_code.py: Tunstall words over the levels, 16-bit
codewords). Each expert linear becomes `peakc::linear_compressed` and each stacked weight
`peakc::grouped_mm_compressed`, reading their coded streams and sharing the one code table.
Mostly-zero ternary experts code below one bit per parameter; the stats put the measured
bits beside the levels' entropy.

Routing-aware calibration: a routed expert's Hessian comes from the tokens the router sends
it, at most `max_tokens_per_expert` of them. An expert with fewer than `min_tokens` tokens is
below the floor: `floor=blend` makes up the missing tokens with the layer's all-token
statistics, `floor=rtn` rounds it to nearest; the stats count the experts at the floor and
at the cap. Experts of one shape with their own Hessians (every routed expert of a layer,
all-active experts' downs) are solved together, `expert_batch` at a time, by a batched GPTQ
(peakc/passes/quantize/gptq.py); all-active experts' gate/up share one Hessian and are one
stack of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from peakc.errors import PeakcError
from peakc.passes.base import PassContext, PassResult, register_pass
from peakc.passes.compress import CompressorPass

if TYPE_CHECKING:
    from peakc.ir.graph import Graph

LEVELS = ("ternary", "2bit")
METHODS = ("gptq", "rtn")
FLOORS = ("blend", "rtn")


@dataclass
class CompressMoEOptions:
    levels: Literal["ternary", "2bit"] = "ternary"  # {-1, 0, 1} or {-2, -1, 0, 1} x row scale
    method: Literal["gptq", "rtn"] = "gptq"
    segment: int = 1024  # columns per independently coded segment (decoders' parallelism)
    dictionary_size: int = 65536  # code words (at most 2^16: codewords are 16 bits)
    min_tokens: int = 64  # the floor: experts that received fewer tokens are handled by `floor`
    floor: Literal["blend", "rtn"] = "blend"  # blend with the layer's all-token Hessian, or RTN
    max_tokens_per_expert: int = 0  # the cap on each routed expert's tokens (0: no cap)
    expert_batch: int = 16  # experts solved together by the batched GPTQ (memory bound)
    damp: float = 0.01
    block_size: int = 128
    targets: str = ""  # regex on expert linears' module paths and stacked weights' paths
    nsamples: int = 128
    seq_len: int = 0  # 0: the graph's captured sequence length
    seed: int = 0


@register_pass
class CompressMoEPass(CompressorPass):
    """Ternary/2-bit GPTQ on experts (linears and stacked routed weights), then a dictionary
    code into linear_compressed / grouped_mm_compressed."""

    name: ClassVar[str] = "compress_moe"
    Options: ClassVar[type] = CompressMoEOptions
    parity_tol: ClassVar[float | None] = None

    @property
    def requires(self) -> tuple[str, ...]:
        return ("calibration_data",) if self.options.method == "gptq" else ()

    def validate(self) -> None:
        o = self.options
        if o.levels not in LEVELS:
            raise PeakcError(
                f"pass 'compress_moe': option 'levels' must be one of {LEVELS}, got {o.levels!r}"
            )
        if o.method not in METHODS:
            raise PeakcError(
                f"pass 'compress_moe': option 'method' must be one of {METHODS}, got {o.method!r}"
            )
        if o.segment < 16:
            raise PeakcError(
                f"pass 'compress_moe': option 'segment' must be >= 16, got {o.segment}"
            )
        if not 16 <= o.dictionary_size <= 65536:
            raise PeakcError(
                "pass 'compress_moe': option 'dictionary_size' must be in 16..65536, "
                f"got {o.dictionary_size}"
            )
        if o.min_tokens < 0:
            raise PeakcError(
                f"pass 'compress_moe': option 'min_tokens' must be >= 0, got {o.min_tokens}"
            )
        if o.floor not in FLOORS:
            raise PeakcError(
                f"pass 'compress_moe': option 'floor' must be one of {FLOORS}, got {o.floor!r}"
            )
        if o.max_tokens_per_expert < 0:
            raise PeakcError(
                "pass 'compress_moe': option 'max_tokens_per_expert' must be >= 0 (0: no cap), "
                f"got {o.max_tokens_per_expert}"
            )
        if o.expert_batch < 1:
            raise PeakcError(
                f"pass 'compress_moe': option 'expert_batch' must be >= 1, got {o.expert_batch}"
            )
        super().validate()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from peakc.passes.calibration import compute_device
        from peakc.passes.moe_experts import (
            ExpertSolver,
            calibrate_experts,
            code_experts,
            expert_sites,
            round_experts,
        )

        o = self.options
        select, linears, routed = expert_sites(graph, o.targets, self.name)
        before = ctx.cost.phases_or_reason(graph)
        sites = [*linears, *routed]
        solver = ExpertSolver(o, {s.module: graph.get_weight(s.weight).dtype for s in sites})
        device = compute_device(ctx.device)
        errors: dict[str, float] = {}
        if o.method == "gptq":
            samples = self.samples(graph, ctx)
            errors = calibrate_experts(
                graph, samples, select, linears, routed, solver, device, ctx.progress
            )
        else:
            round_experts(graph, linears, routed, solver, device)
        stats = code_experts(graph, linears, routed, solver, errors, o, device)
        graph.recompile()
        return self.changed(graph, ctx, before, stats)


__all__ = ["CompressMoEOptions", "CompressMoEPass"]
