"""Per-unit sparsities from per-unit importance scores, at an exact overall sparsity.

A unit is a block (transformer layer) or one linear layer. Scores are spread over 2λ of
density (shape `linear`: min-max, OWL's map; `rank`: evenly by rank, so equal-size units span
exactly [S − λ, S + λ]), then shifted so the parameter-weighted mean sparsity is the target S.
A higher score keeps more weights. Used by the `owl` and `sensitivity` profiles of `prune`.
"""

from __future__ import annotations


def spread_sparsities(
    scores: list[float], params: list[int], target: float, lam: float, shape: str = "linear"
) -> list[float]:
    """Per-unit sparsity: a higher score → a lower sparsity; the weighted mean is `target`."""
    n = len(scores)
    lo, hi = min(scores), max(scores)
    if n < 2 or hi - lo <= 0:
        return [target] * n
    if shape == "rank":
        position = [r / (n - 1) for r in ranks(scores)]
    else:
        position = [(r - lo) / (hi - lo) for r in scores]
    density = [p * 2 * lam for p in position]
    total = sum(params)
    shift = (1 - target) - sum(d * p for d, p in zip(density, params)) / total
    sparsity = [1 - (d + shift) for d in density]
    return [min(max(s, 0.0), 0.99) for s in sparsity]


def ranks(values: list[float]) -> list[float]:
    """0-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out
