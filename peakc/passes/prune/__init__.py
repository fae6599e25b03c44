"""prune: zero weights of linear layers by magnitude or SparseGPT, unstructured or N:M.

Pruned weights stay dense-with-zeros in the graph. Each pruned linear node carries
`node.meta["peakc_sparsity"]` (achieved sparsity, pattern, method, reconstruction error);
`sparsity_record(graph)` collects them for the artifact's manifest, so a backend can pick
sparse kernels for 2:4 layers.

Calibration runs the graph at its captured shape: windows have the captured sequence
length (capture with `peakc compile --seq-len N` to calibrate on N-token windows).
"""

from __future__ import annotations

import time
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
from peakc.passes.prune.magnitude import magnitude_prune
from peakc.passes.prune.owl import measure_outliers, owl_allocation
from peakc.passes.prune.pattern import Pattern, check_divides, parse_pattern
from peakc.passes.prune.sensitivity import measure_sensitivity
from peakc.passes.prune.sparsegpt import Segment, reconstruction_error, sparsegpt_prune

SPARSITY_KEY = "peakc_sparsity"


@dataclass
class PruneOptions:
    method: Literal["magnitude", "sparsegpt"] = "sparsegpt"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    block_size: int = 128
    damp: float = 0.01
    targets: str = ""  # regex on module path; empty: linears inside numbered layers
    nsamples: int = 128
    seq_len: int = 0  # 0: the graph's captured sequence length
    seed: int = 0
    sparsity_profile: Literal["uniform", "owl", "sensitivity"] = "uniform"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    owl_granularity: Literal["block", "linear"] = "block"
    owl_score: Literal["wanda", "obs"] = "wanda"  # obs: sqrt of SparseGPT's w²/[H⁻¹]_jj
    owl_shape: Literal["linear", "rank"] = "linear"  # ratios → sparsities: min-max or by rank
    sensitivity_lambda: float = 0.05  # blocks spread over [S − λ, S + λ] by measured loss rise
    sensitivity_step: float = 0.1  # each block probed at S + step
    sensitivity_nsamples: int = 0  # calibration samples that score the probes (0: all)


@register_pass
class PrunePass(Pass):
    """Prune linear layers (magnitude or SparseGPT; unstructured or N:M; uniform, OWL or
    sensitivity profile)."""

    name: ClassVar[str] = "prune"
    Options: ClassVar[type] = PruneOptions
    parity_tol: ClassVar[float | None] = None

    @property
    def requires(self) -> tuple[str, ...]:
        o = self.options
        needs = o.method == "sparsegpt" or o.sparsity_profile != "uniform"
        return ("calibration_data",) if needs else ()

    def validate(self) -> None:
        o = self.options
        if not 0.0 <= o.sparsity < 1.0:
            raise PeakcError(f"pass 'prune': option 'sparsity' must be in [0, 1), got {o.sparsity}")
        pattern = parse_pattern(o.pattern)
        if o.block_size < 1:
            raise PeakcError(f"pass 'prune': option 'block_size' must be >= 1, got {o.block_size}")
        if pattern.structured and o.block_size % pattern.m:
            raise PeakcError(
                f"pass 'prune': option 'block_size' ({o.block_size}) must be a multiple of "
                f"M={pattern.m} for pattern {pattern}"
            )
        if o.damp < 0:
            raise PeakcError(f"pass 'prune': option 'damp' must be >= 0, got {o.damp}")
        if o.nsamples < 1 or o.seq_len < 0:
            raise PeakcError("pass 'prune': options 'nsamples' >= 1 and 'seq_len' >= 0 required")
        if not 0.0 <= o.owl_lambda < 0.5:
            raise PeakcError(
                f"pass 'prune': option 'owl_lambda' must be in [0, 0.5), got {o.owl_lambda}"
            )
        if o.owl_threshold <= 0:
            raise PeakcError(
                f"pass 'prune': option 'owl_threshold' must be > 0, got {o.owl_threshold}"
            )
        if not 0.0 <= o.sensitivity_lambda < 0.5:
            raise PeakcError(
                "pass 'prune': option 'sensitivity_lambda' must be in [0, 0.5), got "
                f"{o.sensitivity_lambda}"
            )
        if not 0.0 < o.sensitivity_step <= 0.5:
            raise PeakcError(
                "pass 'prune': option 'sensitivity_step' must be in (0, 0.5], got "
                f"{o.sensitivity_step}"
            )
        if o.sensitivity_nsamples < 0:
            raise PeakcError("pass 'prune': option 'sensitivity_nsamples' must be >= 0")
        if o.sparsity_profile != "uniform" and pattern.structured:
            raise PeakcError(
                f"pass 'prune': sparsity_profile={o.sparsity_profile} applies to unstructured "
                "patterns"
            )
        target_selector(o.targets, "prune")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        pattern = parse_pattern(o.pattern)
        select = target_selector(o.targets, "prune")
        sites = linear_sites(graph, list(graph.graph.nodes), select)
        if not sites:
            return PassResult(graph, False, {"layers": 0})
        for site in sites:
            check_divides(pattern, graph.get_weight(site.weight).shape[1], site.module)
        base = pattern.sparsity if pattern.structured else o.sparsity
        sparsity = {s.module: base for s in sites}
        device = compute_device(ctx.device)
        progress = bool(ctx.settings.get("progress", True))
        samples = None
        if self.requires:
            samples = self._samples(graph, ctx)
        started = time.perf_counter()
        scores: dict[str, float] = {}
        if o.sparsity_profile != "uniform":
            sparsity, scores = self._profile(graph, samples, select, pattern, device, progress)
        profile_s = time.perf_counter() - started
        records: dict[str, dict] = {}
        if o.method == "magnitude":
            for site in sites:
                w = graph.get_weight(site.weight)
                new = magnitude_prune(w.to(device), sparsity[site.module], pattern)
                graph.set_weight(site.weight, new.to("cpu", w.dtype))
                records[site.module] = {}
        else:
            compress = _sparsegpt_compressor(o, pattern, sparsity, records)
            calibrate_blocks(
                graph,
                samples,
                compress,
                select=select,
                device=device,
                progress=progress,
                description="prune",
            )
        for module, score in scores.items():
            records.setdefault(module, {})["profile_score"] = score
        stats = _annotate(graph, sites, pattern, o.method, records)
        if o.sparsity_profile != "uniform":
            stats["profile_s"] = round(profile_s, 2)  # measuring the profile, before pruning
        return PassResult(graph, True, stats)

    def _profile(
        self,
        graph: Graph,
        samples: list[tuple[torch.Tensor, ...]],
        select: Callable[[str], bool],
        pattern: Pattern,
        device: torch.device,
        progress: bool,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Module path → sparsity from the OWL or sensitivity profile (overall: o.sparsity),
        and module path → the score that placed it (outlier ratio, or loss rise per token)."""
        o = self.options
        if o.sparsity_profile == "owl":
            profile = measure_outliers(
                graph,
                samples,
                select,
                threshold=o.owl_threshold,
                score=o.owl_score,
                granularity=o.owl_granularity,
                damp=o.damp,
                device=device,
                progress=progress,
            )
            allocation = owl_allocation(profile, o.sparsity, o.owl_lambda, o.owl_shape)
            return allocation, profile.scores()
        measured = measure_sensitivity(
            graph,
            samples,
            select,
            _block_pruner(o, pattern),
            target=o.sparsity,
            step=o.sensitivity_step,
            probe_samples=o.sensitivity_nsamples,
            device=device,
            progress=progress,
        )
        return measured.allocation(o.sparsity, o.sensitivity_lambda), measured.scores()

    def _samples(self, graph: Graph, ctx: PassContext) -> list[tuple[torch.Tensor, ...]]:
        o = self.options
        return calibration_samples(
            graph, ctx.calibration_data, o.nsamples, o.seq_len, o.seed, "prune"
        )


def _block_pruner(
    o: PruneOptions, pattern: Pattern
) -> Callable[[BlockCalibration, float], dict[str, torch.Tensor]]:
    """New weights for one block's linears, all at one sparsity, by the pass's method."""

    def prune_block(cal: BlockCalibration, sparsity: float) -> dict[str, torch.Tensor]:
        if o.method == "magnitude":
            return {s.weight: magnitude_prune(cal.weight(s), sparsity, pattern) for s in cal.sites}
        at = {s.module: sparsity for s in cal.sites}
        return _sparsegpt_compressor(o, pattern, at, {})(cal)

    return prune_block


def _sparsegpt_compressor(
    o: PruneOptions, pattern: Pattern, sparsity: dict[str, float], records: dict[str, dict]
) -> Callable[[BlockCalibration], dict[str, torch.Tensor]]:
    """The per-block callback: SparseGPT once per shared Hessian (q/k/v stacked by rows)."""

    def compress(cal: BlockCalibration) -> dict[str, torch.Tensor]:
        groups: dict[int, list[LinearSite]] = {}
        for site in cal.sites:
            groups.setdefault(id(cal.hessians[site.module]), []).append(site)
        new: dict[str, torch.Tensor] = {}
        for group in groups.values():
            h = cal.hessians[group[0].module]
            weights = [cal.weight(s) for s in group]
            segments, start = [], 0
            for s, w in zip(group, weights):
                segments.append(Segment(start, start + w.shape[0], sparsity[s.module]))
                start += w.shape[0]
            name = "+".join(s.module for s in group)
            pruned = sparsegpt_prune(
                torch.cat(weights), h, segments, pattern, o.block_size, o.damp, name
            )
            for s, w, seg in zip(group, weights, segments):
                part = pruned[seg.start : seg.stop]
                new[s.weight] = part
                records[s.module] = {"recon_error": reconstruction_error(w, part, h)}
        return new

    return compress


def _annotate(
    graph: Graph, sites: list[LinearSite], pattern: Pattern, method: str, records: dict
) -> dict[str, float | int | str]:
    """Measure what was achieved, mark each pruned linear node, and return the stats."""
    zeros = total = 0
    errors = []
    for site in sites:
        w = graph.get_weight(site.weight)
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        rec = {
            "weight": site.weight,
            "sparsity": round(z / w.numel(), 6),
            "pattern": str(pattern),
            "method": method,
        }
        score = records.get(site.module, {}).get("profile_score")
        if score is not None:  # what placed this layer in a non-uniform profile
            rec["profile_score"] = round(score, 6)
        err = records.get(site.module, {}).get("recon_error")
        if err is not None:
            rec["recon_error"] = round(err, 6)
            errors.append(err)
        site.node.meta[SPARSITY_KEY] = rec
    per_layer = [site.node.meta[SPARSITY_KEY]["sparsity"] for site in sites]
    stats: dict[str, float | int | str] = {
        "layers": len(sites),
        "sparsity": round(zeros / total, 6),
        "sparsity.min": min(per_layer),
        "sparsity.max": max(per_layer),
        "pattern": str(pattern),
    }
    if errors:
        stats["recon_error.mean"] = round(sum(errors) / len(errors), 6)
        stats["recon_error.max"] = round(max(errors), 6)
    return stats


def sparsity_record(graph: Graph) -> dict[str, dict]:
    """Per pruned linear (by module path): sparsity, pattern, method, error; for the manifest."""
    return {
        node.meta.get("peakc_module", node.name): dict(node.meta[SPARSITY_KEY])
        for node in graph.call_nodes()
        if SPARSITY_KEY in node.meta
    }
