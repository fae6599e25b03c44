"""Sensitivity profile: each block keeps weights in proportion to what pruning it costs.

Measured on the calibration data, for the pruner the pass uses (SparseGPT or magnitude):
1. one block-sequential pass prunes every block to the target S and, from the same Hessians,
   also prunes each block to S + step (kept aside, the graph keeps the S weights);
2. the uniformly pruned model's next-token loss is measured as it is and with each block's
   S + step weights in turn (calibration.variant_losses: the blocks run in step, ~n²/2 block
   runs for n blocks); a block's loss rise is its sensitivity;
3. blocks are spread by the rank of their rise over [S − λ, S + λ] (profile.spread_sparsities),
   the most sensitive keeping the most, at exactly S overall.

On SmolLM2-135M this is what beats uniform SparseGPT at 50 %: the rise per block is not
predicted by OWL's outlier ratios, block influence or reconstruction error (rank correlations
-0.16 to +0.21, benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peakc.ir.graph import Graph
from peakc.passes.calibration import BlockCalibration, calibrate_blocks, variant_losses
from peakc.passes.prune.profile import spread_sparsities
from peakc.progress import ProgressFn, silent
from peakc.runtime.evaluate import next_token_nll

PruneBlock = Callable[[BlockCalibration, float], dict[str, torch.Tensor]]


@dataclass
class SensitivityProfile:
    """Per block with target linears: their module paths, size, and loss rise at S + step."""

    units: list[list[str]]
    params: list[int]
    rises: list[float]  # mean next-token NLL rise, nats per token
    base_nll: float  # the uniformly pruned model's mean next-token NLL

    def allocation(self, target: float, lam: float) -> dict[str, float]:
        """Module path → sparsity: by rank of rise over [S − λ, S + λ], exactly S overall."""
        per_unit = spread_sparsities(self.rises, self.params, target, lam, "rank")
        return {m: s for unit, s in zip(self.units, per_unit) for m in unit}

    def scores(self) -> dict[str, float]:
        """Module path → its block's loss rise."""
        return {m: r for unit, r in zip(self.units, self.rises) for m in unit}


def sample_nll(logits: torch.Tensor, sample: tuple[torch.Tensor, ...]) -> float:
    """Summed next-token NLL of a calibration sample (sample[0]: token ids [batch, seq])."""
    return next_token_nll(logits, sample[0], "prune (sensitivity)")


def measure_sensitivity(
    graph: Graph,
    samples: list[tuple[torch.Tensor, ...]],
    select: Callable[[str], bool],
    prune_block: PruneBlock,
    *,
    target: float,
    step: float,
    probe_samples: int = 0,
    device: torch.device | str = "cpu",
    progress: ProgressFn = silent,
) -> SensitivityProfile:
    """Prune a copy uniformly to `target`, then probe each block at `target + step`.

    `probe_samples`: how many of the samples score the probes (0: all of them)."""
    uniform = graph.copy()
    harder = min(target + step, 0.99)
    probes: dict[int, dict[str, torch.Tensor]] = {}
    units: dict[int, list[str]] = {}
    params: dict[int, int] = {}

    def compress(cal: BlockCalibration) -> dict[str, torch.Tensor]:
        probe = prune_block(cal, harder)
        probes[cal.index] = {k: v.to("cpu", graph.get_weight(k).dtype) for k, v in probe.items()}
        units[cal.index] = [s.module for s in cal.sites]
        params[cal.index] = sum(graph.get_weight(s.weight).numel() for s in cal.sites)
        return prune_block(cal, target)

    calibrate_blocks(
        uniform,
        samples,
        compress,
        select=select,
        device=device,
        progress=progress,
        description="prune (sensitivity)",
    )
    scored = samples[:probe_samples] if probe_samples else samples
    base, losses = variant_losses(
        uniform,
        scored,
        probes,
        sample_nll,
        device=device,
        progress=progress,
        description="prune (probes)",
    )
    tokens = sum(s[0].shape[0] * (s[0].shape[1] - 1) for s in scored)
    order = sorted(probes)
    return SensitivityProfile(
        units=[units[i] for i in order],
        params=[params[i] for i in order],
        rises=[(losses[i] - base) / tokens for i in order],
        base_nll=base / tokens,
    )
