"""Magnitude pruning: zero the smallest |w| per layer (or per group of M for N:M)."""

from __future__ import annotations

import torch

from peakc.passes.prune.pattern import Pattern


def magnitude_prune(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """A copy of `weight` with exactly round(sparsity·numel) zeros, or M−N zeros per group."""
    w = weight.detach().clone()
    rows, cols = w.shape
    if pattern.structured:
        groups = w.view(rows, cols // pattern.m, pattern.m)
        drop = torch.topk(groups.abs(), pattern.m - pattern.n, dim=-1, largest=False).indices
        groups.scatter_(-1, drop, 0.0)
        return w
    k = round(sparsity * w.numel())
    if k:
        drop = torch.topk(w.abs().flatten(), k, largest=False).indices
        w.view(-1)[drop] = 0.0
    return w
