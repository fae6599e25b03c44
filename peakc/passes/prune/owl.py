"""OWL (outlier-weighted layerwise sparsity): layers with more outlier weights keep more.

Per block (the paper's unit; or per linear layer), the outlier ratio is the share of scores
above `threshold` times their mean. Scores are measured on the DENSE model (one calibration
pass that compresses nothing, before pruning), as in the paper:
  wanda: |W_ij|·‖X_j‖ (the paper's score; ‖X_j‖ from the Hessian's diagonal),
  obs:   |W_ij| / sqrt([H⁻¹]_jj), the square root of the OBS saliency w²/[H⁻¹]_jj that
         SparseGPT prunes by (H dampened as SparseGPT does; equal to wanda for diagonal H).
Ratios become sparsities through profile.spread_sparsities (shape `linear`: the paper's min-max
map; `rank`: evenly by rank), a higher ratio keeping more, at exactly the target overall.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peakc.ir.graph import Graph
from peakc.passes.calibration import BlockCalibration, calibrate_blocks
from peakc.passes.prune.profile import spread_sparsities
from peakc.passes.prune.sparsegpt import inverse_hessian_factor
from peakc.progress import ProgressFn, silent


def wanda_scores(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖ up to a constant (H = 2XᵀX/n, so ‖X_j‖ ∝ sqrt(H_jj))."""
    return weight.abs() * hessian.diagonal().clamp(min=0).sqrt().unsqueeze(0)


def inverse_diagonal(hessian: torch.Tensor, damp: float, layer: str) -> torch.Tensor:
    """diag((H + damp·mean(diag H)·I)⁻¹), inf for dead inputs (their weights score 0)."""
    factor, dead = inverse_hessian_factor(hessian, damp, layer)
    diag = factor.pow(2).sum(0)  # H⁻¹ = UᵀU: column norms of U
    return diag.masked_fill(dead, float("inf"))


def obs_scores(weight: torch.Tensor, inverse_diag: torch.Tensor) -> torch.Tensor:
    """sqrt(w²/[H⁻¹]_jj): the square root of the OBS saliency of removing each weight."""
    return weight.abs() / inverse_diag.sqrt().unsqueeze(0)


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Share of scores above `threshold`·mean, over all of a unit's linears together."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


@dataclass
class OutlierProfile:
    """The dense model's outlier ratio per unit (a block, or a linear), and its size."""

    units: list[list[str]]  # module paths of each unit's linears
    ratios: list[float]
    params: list[int]

    def scores(self) -> dict[str, float]:
        """Module path → its unit's outlier ratio."""
        return {m: r for unit, r in zip(self.units, self.ratios) for m in unit}


def measure_outliers(
    graph: Graph,
    samples: list[tuple[torch.Tensor, ...]],
    select: Callable[[str], bool],
    *,
    threshold: float,
    score: str = "wanda",
    granularity: str = "block",
    damp: float = 0.01,
    device: torch.device | str = "cpu",
    progress: ProgressFn = silent,
) -> OutlierProfile:
    """One calibration pass that changes no weight, so every block sees dense inputs."""
    profile = OutlierProfile([], [], [])

    def measure(cal: BlockCalibration) -> None:
        inverses: dict[int, torch.Tensor] = {}
        scores: dict[str, torch.Tensor] = {}
        for site in cal.sites:
            w, h = cal.weight(site), cal.hessians[site.module]
            if score == "obs":
                if id(h) not in inverses:
                    inverses[id(h)] = inverse_diagonal(h, damp, site.module)
                scores[site.module] = obs_scores(w, inverses[id(h)])
            else:
                scores[site.module] = wanda_scores(w, h)
        units = [cal.sites] if granularity == "block" else [[s] for s in cal.sites]
        for unit in units:
            profile.units.append([s.module for s in unit])
            profile.ratios.append(outlier_ratio([scores[s.module] for s in unit], threshold))
            profile.params.append(sum(scores[s.module].numel() for s in unit))

    calibrate_blocks(
        graph,
        samples,
        measure,
        select=select,
        device=device,
        progress=progress,
        description="prune (owl)",
    )
    return profile


def owl_allocation(profile: OutlierProfile, target: float, lam: float, shape: str) -> dict:
    """Module path → sparsity from a dense outlier profile."""
    per_unit = spread_sparsities(profile.ratios, profile.params, target, lam, shape)
    return {m: s for unit, s in zip(profile.units, per_unit) for m in unit}
