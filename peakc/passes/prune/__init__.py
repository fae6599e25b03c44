"""prune: zero weights of linear layers by magnitude or SparseGPT, unstructured or N:M.

Pruned weights stay dense-with-zeros in the graph. Each pruned linear node carries
`node.meta["peakc_sparsity"]` (achieved sparsity, pattern, method, reconstruction error);
`Graph.sparsity_record()` collects them for the artifact's manifest, so a backend can pick
sparse kernels for 2:4 layers.

Layers are picked, calibrated and solved by the compressor loop (peakc/passes/compress.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from peakc.errors import PeakcError
from peakc.passes.base import PassContext, PassResult, register_pass
from peakc.passes.compress import CompressorPass, Solver, Stack, block_compressor
from peakc.passes.prune.pattern import Pattern, check_divides, parse_pattern

# The declaration stays light for `peakc passes`; the solvers import torch where they run.
if TYPE_CHECKING:
    import torch

    from peakc.ir.graph import Graph
    from peakc.passes.calibration import BlockCalibration, LinearSite


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
    emit: Literal["dense", "sparse24"] = "dense"  # sparse24: 2:4 layers as linear_sparse24


@register_pass
class PrunePass(CompressorPass):
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
        super().validate()  # block_size, damp, nsamples, seq_len, targets
        given = o.sparsity != PruneOptions.sparsity  # the spec names only non-defaults
        if pattern.structured and given and abs(o.sparsity - pattern.sparsity) > 1e-3:
            raise PeakcError(
                f"pass 'prune': option 'sparsity' ({o.sparsity}) disagrees with option "
                f"'pattern' ({pattern}, which prunes {pattern.sparsity:.4g} of each row): "
                "leave 'sparsity' out with an N:M pattern"
            )
        if pattern.structured and o.block_size % pattern.m:
            raise PeakcError(
                f"pass 'prune': option 'block_size' ({o.block_size}) must be a multiple of "
                f"M={pattern.m} for pattern {pattern}"
            )
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
        if o.emit == "sparse24" and (pattern.n, pattern.m) != (2, 4):
            raise PeakcError(f"pass 'prune': emit=sparse24 needs pattern=2:4, got {pattern}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        pattern = parse_pattern(o.pattern)
        select, sites = self.select_sites(graph)
        if not pattern.structured and o.sparsity == 0:
            return PassResult(graph, False, {"layers": 0})  # nothing to prune
        for site in sites:
            check_divides(pattern, graph.get_weight(site.weight).shape[1], site.module)
        before = ctx.cost.phases_or_reason(graph)
        base = pattern.sparsity if pattern.structured else o.sparsity
        sparsity = {s.module: base for s in sites}
        samples = self.samples(graph, ctx) if self.requires else None
        started = time.perf_counter()
        scores: dict[str, float] = {}
        if o.sparsity_profile != "uniform":
            sparsity, scores = self._profile(graph, ctx, samples, select, pattern)
        profile_s = time.perf_counter() - started
        solver = prune_solver(o, pattern, sparsity)
        errors = self.compress(graph, ctx, sites, select, solver, samples=samples)
        stats = _annotate(graph, sites, pattern, o.method, errors, scores)
        if o.sparsity_profile != "uniform":
            stats["profile_s"] = round(profile_s, 2)  # measuring the profile, before pruning
        if o.emit == "sparse24":
            from peakc.passes.prune.sparse24 import compress_sparse24_linears

            stats["sparse24"] = compress_sparse24_linears(graph, [s.node for s in sites]).rewritten
        return self.changed(graph, ctx, before, stats)

    def _profile(
        self,
        graph: Graph,
        ctx: PassContext,
        samples: list[tuple[torch.Tensor, ...]],
        select: Callable[[str], bool],
        pattern: Pattern,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Module path → sparsity from the OWL or sensitivity profile (overall: o.sparsity),
        and module path → the score that placed it (outlier ratio, or loss rise per token)."""
        from peakc.passes.calibration import compute_device
        from peakc.passes.prune.owl import measure_outliers, owl_allocation
        from peakc.passes.prune.sensitivity import measure_sensitivity

        o = self.options
        device = compute_device(ctx.device)
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
                progress=ctx.progress,
            )
            allocation = owl_allocation(profile, o.sparsity, o.owl_lambda, o.owl_shape)
            return allocation, profile.scores()
        measured = measure_sensitivity(
            graph,
            samples,
            select,
            block_pruner(o, pattern),
            target=o.sparsity,
            step=o.sensitivity_step,
            probe_samples=o.sensitivity_nsamples,
            device=device,
            progress=ctx.progress,
        )
        return measured.allocation(o.sparsity, o.sensitivity_lambda), measured.scores()


@dataclass
class MagnitudeSolver:
    """Magnitude pruning, one linear at a time (the threshold is the layer's own)."""

    sparsity: dict[str, float]  # by module path
    pattern: Pattern
    calibrated: ClassVar[bool] = False

    def stack_key(self, site: LinearSite) -> str:
        return site.module

    def solve(self, stack: Stack) -> torch.Tensor:
        from peakc.passes.prune.magnitude import magnitude_prune

        return magnitude_prune(stack.rows(), self.sparsity[stack.sites[0].module], self.pattern)

    def accept(self, site: LinearSite, part: torch.Tensor) -> torch.Tensor:
        return part


@dataclass
class SparseGPTSolver(MagnitudeSolver):
    """SparseGPT once per shared Hessian, q/k/v stacked by rows, each linear a segment at its
    own sparsity."""

    block_size: int = 128
    damp: float = 0.01
    calibrated: ClassVar[bool] = True

    def stack_key(self, site: LinearSite) -> None:
        return None

    def solve(self, stack: Stack) -> torch.Tensor:
        from peakc.passes.prune.sparsegpt import Segment, sparsegpt_prune

        segments = [
            Segment(start, stop, self.sparsity[s.module])
            for s, (start, stop) in zip(stack.sites, stack.spans())
        ]
        return sparsegpt_prune(
            stack.rows(),
            stack.hessian,
            segments,
            self.pattern,
            self.block_size,
            self.damp,
            stack.name,
        )


def prune_solver(o: PruneOptions, pattern: Pattern, sparsity: dict[str, float]) -> Solver:
    """The pass's method as a solver, at `sparsity` (module path → sparsity)."""
    if o.method == "magnitude":
        return MagnitudeSolver(sparsity, pattern)
    return SparseGPTSolver(sparsity, pattern, o.block_size, o.damp)


def block_pruner(
    o: PruneOptions, pattern: Pattern
) -> Callable[[BlockCalibration, float], dict[str, torch.Tensor]]:
    """New weights for one block's linears, all at one sparsity, by the pass's method."""

    def prune_block(cal: BlockCalibration, sparsity: float) -> dict[str, torch.Tensor]:
        solver = prune_solver(o, pattern, {s.module: sparsity for s in cal.sites})
        return block_compressor(solver)(cal)

    return prune_block


def _annotate(
    graph: Graph,
    sites: list[LinearSite],
    pattern: Pattern,
    method: str,
    errors: dict[str, float],
    scores: dict[str, float],
) -> dict[str, float | int | str]:
    """Measure what was achieved, mark each pruned linear node, and return the stats."""
    from peakc.ir.graph import SPARSITY_KEY

    zeros = total = 0
    measured = []
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
        score = scores.get(site.module)
        if score is not None:  # what placed this layer in a non-uniform profile
            rec["profile_score"] = round(score, 6)
        err = errors.get(site.module)
        if err is not None:
            rec["recon_error"] = round(err, 6)
            measured.append(err)
        site.node.meta[SPARSITY_KEY] = rec
    per_layer = [site.node.meta[SPARSITY_KEY]["sparsity"] for site in sites]
    stats: dict[str, float | int | str] = {
        "layers": len(sites),
        "sparsity": round(zeros / total, 6),
        "sparsity.min": min(per_layer),
        "sparsity.max": max(per_layer),
        "pattern": str(pattern),
    }
    if measured:
        stats["recon_error.mean"] = round(sum(measured) / len(measured), 6)
        stats["recon_error.max"] = round(max(measured), 6)
    return stats
