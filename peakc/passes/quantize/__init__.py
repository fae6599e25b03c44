"""quantize: low-bit weights for linear layers, by round-to-nearest or GPTQ.

Each quantized `aten.linear` becomes `peakc::linear_wq` reading packed integer codes,
per-group scales and zero points (layout: peakc/ir/ops.py, linear_wq section) that the
artifact stores in safetensors like any weight. GPTQ calibrates block by block and, inside
a block, stage by stage (q/k/v, o, gate/up, down); weights that are exactly zero (a pruned
layer) stay zero. The output head and embeddings are left alone unless `targets` says so.
GPTQ's column blocks run in a Triton kernel for CUDA weights (`kernel=auto`, when triton
imports) and in torch otherwise; the stats say which (`gptq_kernel`).

Layers are picked, calibrated and solved by the compressor loop (peakc/passes/compress.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from peakc.errors import PeakcError
from peakc.passes.base import PassContext, PassResult, register_pass
from peakc.passes.compress import CompressorPass, Stack

# The declaration stays light for `peakc passes`; the solvers import torch where they run.
if TYPE_CHECKING:
    import torch

    from peakc.ir.graph import Graph
    from peakc.ir.ops import PackedWeight
    from peakc.passes.calibration import LinearSite
    from peakc.passes.quantize.gptq import QuantizedWeight
    from peakc.passes.quantize.grid import GridSpec

QUANT_KEY = "peakc_quant"  # node.meta entry of each linear_wq: method, bits, group, error
BITS = (2, 3, 4, 8)
KERNELS = ("auto", "torch", "triton")


@dataclass
class QuantizeOptions:
    method: Literal["rtn", "gptq"] = "gptq"
    bits: int = 4
    group_size: int = -1  # -1: one group per output channel; else a power of two >= 16
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    damp: float = 0.01
    block_size: int = 128
    targets: str = ""  # regex on module path; empty: linears inside numbered layers
    nsamples: int = 128
    seq_len: int = 0  # 0: the graph's captured sequence length
    seed: int = 0
    kernel: Literal["auto", "torch", "triton"] = "auto"  # GPTQ column blocks; auto: Triton on CUDA


@register_pass
class QuantizePass(CompressorPass):
    """Quantize linear weights to 2/3/4/8 bits (RTN or GPTQ) into peakc::linear_wq."""

    name: ClassVar[str] = "quantize"
    Options: ClassVar[type] = QuantizeOptions
    parity_tol: ClassVar[float | None] = None

    @property
    def requires(self) -> tuple[str, ...]:
        return ("calibration_data",) if self.options.method == "gptq" else ()

    def validate(self) -> None:
        o = self.options
        if o.bits not in BITS:
            raise PeakcError(f"pass 'quantize': option 'bits' must be one of {BITS}, got {o.bits}")
        power_of_two = o.group_size >= 16 and o.group_size & (o.group_size - 1) == 0
        if o.group_size != -1 and not power_of_two:
            raise PeakcError(
                "pass 'quantize': option 'group_size' must be -1 (per channel) or a power of "
                f"two >= 16 (32, 64, 128, ...), got {o.group_size}"
            )
        if o.kernel not in KERNELS:
            raise PeakcError(
                f"pass 'quantize': option 'kernel' must be one of {KERNELS}, got {o.kernel!r}"
            )
        super().validate()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from peakc.passes.quantize.rewrite import replace_linear

        o = self.options
        select, sites = self.select_sites(graph)
        specs = {s.module: self._spec(graph, s) for s in sites}
        dtypes = {s.module: graph.get_weight(s.weight).dtype for s in sites}
        before = ctx.cost.phases_or_reason(graph)
        bytes_before = _weight_bytes(graph)
        solver_type = GPTQSolver if o.method == "gptq" else RTNSolver
        solver = solver_type(o, specs, dtypes)
        errors = self.compress(graph, ctx, sites, select, solver, stagewise=True)
        packed = solver.packed
        params = 0
        for site in sites:
            p = packed[site.module]
            params += p.qweight.shape[0] * p.in_features
            record = {
                "method": o.method,
                "bits": o.bits,
                "group_size": p.group_size,
                "sym": o.sym,
                "g_idx": p.g_idx is not None,
            }
            if site.module in errors:
                record["recon_error"] = round(errors[site.module], 6)
            replace_linear(graph, site, p, record)
        graph.recompile()
        stats = _stats(graph, packed, params, bytes_before, errors)
        if solver.kernels:
            stats["gptq_kernel"] = ",".join(sorted(solver.kernels))
        return self.changed(graph, ctx, before, stats)

    def _spec(self, graph: Graph, site: LinearSite) -> GridSpec:
        from peakc.passes.quantize.grid import GridSpec

        o = self.options
        cols = graph.get_weight(site.weight).shape[1]
        if o.group_size > cols:
            raise PeakcError(
                f"pass 'quantize': option 'group_size' ({o.group_size}) exceeds the "
                f"{cols} input features of layer {site.module}"
            )
        return GridSpec(o.bits, cols if o.group_size == -1 else o.group_size, o.sym)


@dataclass
class RTNSolver:
    """Round to nearest on each group's grid, one linear at a time (on the compute device, as
    GPTQ); each linear's codes are packed for linear_wq, which replaces it afterwards."""

    o: QuantizeOptions
    specs: dict[str, GridSpec]  # by module path
    dtypes: dict[str, torch.dtype]  # each linear's weight dtype: the scales are stored in it
    packed: dict[str, PackedWeight] = field(default_factory=dict)
    kernels: set[str] = field(default_factory=set)  # what solved GPTQ's column blocks
    calibrated: ClassVar[bool] = False

    def stack_key(self, site: LinearSite) -> str:
        return site.module

    def solve(self, stack: Stack) -> QuantizedWeight:
        from peakc.passes.quantize.gptq import rtn_quantize

        return rtn_quantize(stack.rows(), self.specs[stack.sites[0].module])

    def accept(self, site: LinearSite, part: QuantizedWeight) -> torch.Tensor | None:
        from peakc.passes.quantize.rewrite import pack_layer

        spec = self.specs[site.module]
        self.packed[site.module] = pack_layer(
            part, self.o.bits, spec.group_size, self.dtypes[site.module]
        )
        return None


class GPTQSolver(RTNSolver):
    """GPTQ once per shared Hessian, the rows of its linears stacked when they share a grid
    spec (GPTQ treats rows independently, so stacking q/k/v is exact); the next stage and
    block see the dequantized weights."""

    calibrated: ClassVar[bool] = True

    def stack_key(self, site: LinearSite) -> int:
        return self.specs[site.module].group_size

    def solve(self, stack: Stack) -> QuantizedWeight:
        from peakc.passes.quantize.gptq import gptq_quantize

        o = self.o
        q = gptq_quantize(
            stack.rows(),
            stack.hessian,
            self.specs[stack.sites[0].module],
            block_size=o.block_size,
            damp=o.damp,
            act_order=o.act_order,
            static_groups=o.static_groups,
            layer=stack.name,
            kernel=o.kernel,
        )
        self.kernels.add(q.kernel)
        return q

    def accept(self, site: LinearSite, part: QuantizedWeight) -> torch.Tensor:
        super().accept(site, part)
        return part.dequantized


def _weight_bytes(graph: Graph) -> int:
    return sum(t.numel() * t.element_size() for t in graph.weights().values())


def _stats(
    graph: Graph,
    packed: dict[str, PackedWeight],
    params: int,
    bytes_before: int,
    errors: dict[str, float],
) -> dict[str, float | int | str]:
    """Measured sizes: bits per quantized parameter (codes, scales, zeros, g_idx) and all
    weights' bytes before and after."""
    qbytes = sum(p.nbytes() for p in packed.values())
    stats: dict[str, float | int | str] = {
        "layers": len(packed),
        "params": params,
        "bits_per_param": round(8 * qbytes / params, 4),
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": _weight_bytes(graph),
        "g_idx_layers": sum(p.g_idx is not None for p in packed.values()),
    }
    if errors:
        values = list(errors.values())
        stats["recon_error.mean"] = round(sum(values) / len(values), 6)
        stats["recon_error.max"] = round(max(values), 6)
    return stats


__all__ = ["QUANT_KEY", "QuantizeOptions", "QuantizePass"]
