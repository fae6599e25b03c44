"""quantize: low-bit weights for linear layers, by round-to-nearest or GPTQ.

Each quantized `aten.linear` becomes `peakc::linear_wq` reading packed integer codes,
per-group scales and zero points (layout: peakc/ir/ops.py, linear_wq section) that the
artifact stores in safetensors like any weight. GPTQ calibrates block by block and, inside
a block, stage by stage (q/k/v, o, gate/up, down); weights that are exactly zero (a pruned
layer) stay zero. The output head and embeddings are left alone unless `targets` says so.
GPTQ's column blocks run in a Triton kernel for CUDA weights (`kernel=auto`, when triton
imports) and in torch otherwise; the stats say which (`gptq_kernel`).

Calibration runs the graph at its captured shape: windows have the captured sequence
length (capture with `peakc compile --seq-len N` to calibrate on N-token windows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.passes.base import Pass, PassContext, PassResult, register_pass
from peakc.passes.calibration import (
    BlockCalibration,
    LinearSite,
    calibrate_blocks,
    calibration_samples,
    compute_device,
    linear_sites,
    target_selector,
)
from peakc.passes.prune.sparsegpt import reconstruction_error
from peakc.passes.quantize.gptq import QuantizedWeight, gptq_quantize, rtn_quantize
from peakc.passes.quantize.grid import GridSpec
from peakc.passes.quantize.rewrite import QUANT_KEY, PackedLinear, pack_layer, replace_linear

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
class QuantizePass(Pass):
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
        if o.block_size < 1:
            raise PeakcError(
                f"pass 'quantize': option 'block_size' must be >= 1, got {o.block_size}"
            )
        if o.damp < 0:
            raise PeakcError(f"pass 'quantize': option 'damp' must be >= 0, got {o.damp}")
        if o.nsamples < 1 or o.seq_len < 0:
            raise PeakcError("pass 'quantize': options 'nsamples' >= 1 and 'seq_len' >= 0 required")
        if o.kernel not in KERNELS:
            raise PeakcError(
                f"pass 'quantize': option 'kernel' must be one of {KERNELS}, got {o.kernel!r}"
            )
        target_selector(o.targets, "quantize")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        select = target_selector(o.targets, "quantize")
        sites = linear_sites(graph, list(graph.graph.nodes), select)
        if not sites:
            what = f"'{o.targets}'" if o.targets else "the default (linears in numbered layers)"
            raise PeakcError(f"pass 'quantize': option 'targets' {what} matches no linear layer")
        specs = {s.module: self._spec(graph, s) for s in sites}
        bytes_before = _weight_bytes(graph)
        packed: dict[str, PackedLinear] = {}
        errors: dict[str, float] = {}
        kernels: set[str] = set()
        if o.method == "rtn":
            device = compute_device(ctx.device)  # the GPU when there is one, as GPTQ's
            for site in sites:
                w = graph.get_weight(site.weight)
                packed[site.module] = pack_layer(
                    rtn_quantize(w.to(device), specs[site.module]),
                    o.bits,
                    specs[site.module].group_size,
                    w.dtype,
                )
        else:
            compress = _gptq_compressor(o, specs, packed, errors, kernels)
            calibrate_blocks(
                graph,
                self._samples(graph, ctx),
                compress,
                select=select,
                device=compute_device(ctx.device),
                progress=bool(ctx.settings.get("progress", True)),
                description="quantize",
                stagewise=True,
            )
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
        if kernels:
            stats["gptq_kernel"] = ",".join(sorted(kernels))
        return PassResult(graph, True, stats)

    def _spec(self, graph: Graph, site: LinearSite) -> GridSpec:
        o = self.options
        cols = graph.get_weight(site.weight).shape[1]
        if o.group_size > cols:
            raise PeakcError(
                f"pass 'quantize': option 'group_size' ({o.group_size}) exceeds the "
                f"{cols} input features of layer {site.module}"
            )
        return GridSpec(o.bits, cols if o.group_size == -1 else o.group_size, o.sym)

    def _samples(self, graph: Graph, ctx: PassContext) -> list[tuple[torch.Tensor, ...]]:
        o = self.options
        return calibration_samples(
            graph, ctx.calibration_data, o.nsamples, o.seq_len, o.seed, "quantize"
        )


def _gptq_compressor(
    o: QuantizeOptions,
    specs: dict[str, GridSpec],
    packed: dict[str, PackedLinear],
    errors: dict[str, float],
    kernels: set[str],
) -> Callable[[BlockCalibration], dict[str, torch.Tensor]]:
    """Per stage: GPTQ once per shared Hessian with the rows of its linears stacked (GPTQ treats
    rows independently, so stacking q/k/v is exact) when they share a grid spec."""

    def compress(cal: BlockCalibration) -> dict[str, torch.Tensor]:
        groups: dict[tuple, list[LinearSite]] = {}
        for site in cal.sites:
            spec = specs[site.module]
            key = (id(cal.hessians[site.module]), spec.group_size)
            groups.setdefault(key, []).append(site)
        new: dict[str, torch.Tensor] = {}
        for group in groups.values():
            h = cal.hessians[group[0].module]
            spec = specs[group[0].module]
            weights = [cal.weight(s) for s in group]
            q = gptq_quantize(
                torch.cat(weights),
                h,
                spec,
                block_size=o.block_size,
                damp=o.damp,
                act_order=o.act_order,
                static_groups=o.static_groups,
                layer="+".join(s.module for s in group),
                kernel=o.kernel,
            )
            kernels.add(q.kernel)
            start = 0
            for s, w in zip(group, weights):
                part = _rows(q, start, start + w.shape[0])
                start += w.shape[0]
                dtype = cal.graph.get_weight(s.weight).dtype
                packed[s.module] = pack_layer(part, o.bits, spec.group_size, dtype)
                errors[s.module] = reconstruction_error(w, part.dequantized, h)
                new[s.weight] = part.dequantized
        return new

    return compress


def _rows(q: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    return QuantizedWeight(
        q.ints[start:stop],
        q.scales[start:stop],
        q.zeros[start:stop],
        q.g_idx,
        q.dequantized[start:stop],
        q.kernel,
    )


def _weight_bytes(graph: Graph) -> int:
    return sum(t.numel() * t.element_size() for t in graph.weights().values())


def _stats(
    graph: Graph,
    packed: dict[str, PackedLinear],
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
