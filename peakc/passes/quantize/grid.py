"""Uniform integer grids: per row (output channel) and group of input columns, a scale and an
integer zero point, so every dequantized value is (q - z) * s with q in [0, 2^bits - 1]."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GridSpec:
    """How a layer is quantized: bit width, columns per group (the layer's width when per
    channel) and whether the grid is symmetric around zero."""

    bits: int
    group_size: int
    sym: bool

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


def fit_grid(w: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` [rows, cols] from its min and max (zero included, so
    zero is exactly representable); returns float scales [rows] and integer zeros [rows]."""
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = (hi - lo) / spec.maxq
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale).clamp(0, spec.maxq)
    return scale, zero


def fit_groups(w: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [rows, n_groups] for consecutive column groups (last may be partial)."""
    cols = w.shape[1]
    scales, zeros = [], []
    for g in range(0, cols, spec.group_size):
        s, z = fit_grid(w[:, g : g + spec.group_size], spec)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales, 1), torch.stack(zeros, 1)


def quantize_ints(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Integer codes round(w / s) + z clamped to [0, maxq] (broadcasting s and z over w)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_ints(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - z) * s."""
    return scale * (q - zero)
