"""OWL (outlier-weighted layerwise sparsity): layers with more activation outliers keep more.

Per block (the paper's unit; or per linear layer), the outlier ratio is the share of Wanda
scores |W_ij|·‖X_j‖ above `threshold` times their mean; ratios are spread linearly over
[S − λ, S + λ] of density and shifted so the parameter-weighted mean sparsity is exactly the
target S.
"""

from __future__ import annotations

import torch


def outlier_ratio(
    weights: list[torch.Tensor], hessians: list[torch.Tensor], threshold: float
) -> float:
    """Share of |W|·‖X_j‖ scores above `threshold`·mean over a block's linears (‖X‖ from H)."""
    scores = [
        (w.abs() * h.diagonal().clamp(min=0).sqrt().unsqueeze(0)).flatten()
        for w, h in zip(weights, hessians)
    ]
    flat = torch.cat(scores)
    return float((flat > threshold * flat.mean()).float().mean())


def owl_sparsities(
    ratios: list[float], params: list[int], target: float, lam: float
) -> list[float]:
    """Per-block sparsity: more outliers → lower sparsity; weighted mean equals `target`."""
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0:
        return [target] * len(ratios)
    density = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    total = sum(params)
    shift = (1 - target) - sum(d * p for d, p in zip(density, params)) / total
    sparsity = [1 - (d + shift) for d in density]
    return [min(max(s, 0.0), 0.99) for s in sparsity]
