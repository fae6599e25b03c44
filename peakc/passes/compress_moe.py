"""compress_moe: mixture-of-experts weights below one bit per parameter (QMoE).

The linears inside experts (module paths `...experts.N...`, peakc/ir/experts.py) are
quantized to ternary (or 2-bit) levels by GPTQ, calibrated block by block with each expert's
Hessian measured on the tokens it receives; the levels of all experts then get one
dictionary code (peakc/ir/dictionary_code.py: Tunstall words over the levels, 16-bit
codewords) and each expert linear becomes `peakc::linear_compressed`, reading its coded
stream and sharing the one code table. Mostly-zero ternary experts code below one bit per
parameter; the stats put the measured bits beside the levels' entropy.

Experts reading one input (all-active experts' gate/up) share a Hessian and are solved as
one stack of rows; an expert whose Hessian saw fewer than `min_tokens` tokens is rounded to
nearest instead (its Hessian says too little), and the stats count them.
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


@dataclass
class CompressMoEOptions:
    levels: Literal["ternary", "2bit"] = "ternary"  # {-1, 0, 1} or {-2, -1, 0, 1} x row scale
    method: Literal["gptq", "rtn"] = "gptq"
    segment: int = 1024  # columns per independently coded segment (decoders' parallelism)
    dictionary_size: int = 65536  # code words (at most 2^16: codewords are 16 bits)
    min_tokens: int = 64  # experts whose Hessian saw fewer tokens are rounded to nearest
    damp: float = 0.01
    block_size: int = 128
    targets: str = ""  # regex on module path among expert linears; empty: all of them
    nsamples: int = 128
    seq_len: int = 0  # 0: the graph's captured sequence length
    seed: int = 0


@register_pass
class CompressMoEPass(CompressorPass):
    """Ternary/2-bit GPTQ on expert linears, then a dictionary code into linear_compressed."""

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
        super().validate()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from peakc.passes.calibration import compute_device
        from peakc.passes.moe_experts import (
            ExpertSolver,
            calibrate_experts,
            code_experts,
            expert_sites,
        )

        o = self.options
        select, sites = expert_sites(graph, o.targets, self.name)
        before = ctx.cost.phases_or_reason(graph)
        solver = ExpertSolver(o, {s.module: graph.get_weight(s.weight).dtype for s in sites})
        if solver.calibrated:
            device = compute_device(ctx.device)
            samples = self.samples(graph, ctx)
            errors = calibrate_experts(graph, samples, select, solver, device, ctx.progress)
        else:
            errors = self.compress(graph, ctx, sites, select, solver)
        stats = code_experts(graph, sites, solver, errors, o)
        graph.recompile()
        return self.changed(graph, ctx, before, stats)


__all__ = ["CompressMoEOptions", "CompressMoEPass"]
