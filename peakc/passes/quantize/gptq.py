"""GPTQ (Frantar et al., 2023): quantize a layer column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of its inputs.

Columns are walked in blocks of `block_size`; inside a block each column's error updates the
block's later columns at once, and the block's errors reach the remaining columns lazily in
one matrix product. The updates use the upper Cholesky factor of the dampened inverse Hessian.
With act-order, columns go in order of decreasing Hessian diagonal; with static groups every
group's grid is fitted up front on the original weights in natural column order, so the
quantized layer needs no permutation or group index at inference. Without static groups a
group's grid is fitted when the walk reaches its first column, on the error-updated weights.
Weights that are exactly zero (a pruned layer) stay zero: their error is compensated, never
re-grown.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peakc.passes.calibration import damped_inverse_factor
from peakc.passes.quantize.grid import (
    GridSpec,
    dequantize_ints,
    fit_grid,
    fit_groups,
    quantize_ints,
)


@dataclass
class QuantizedWeight:
    """Integer codes [rows, cols] in natural column order, grids [rows, n_groups], the group
    of each column (None when it is col // group_size) and the dequantized weight."""

    ints: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    dequantized: torch.Tensor


def rtn_quantize(weight: torch.Tensor, spec: GridSpec) -> QuantizedWeight:
    """Round to nearest on each group's min-max grid; zeros stay zeros."""
    w = weight.detach().float()
    scales, zeros = fit_groups(w, spec)
    col_group = torch.arange(w.shape[1], device=w.device) // spec.group_size
    s, z = scales[:, col_group], zeros[:, col_group]
    ints = torch.where(w != 0, quantize_ints(w, s, z, spec.maxq), z)
    return QuantizedWeight(ints, scales, zeros, None, dequantize_ints(ints, s, z))


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, layer: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹; damping grows tenfold (with a
    warning naming the layer) while H is not positive definite."""
    return damped_inverse_factor(hessian, damp, layer, "quantize")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: GridSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = True,
    layer: str = "layer",
) -> QuantizedWeight:
    """GPTQ for `weight` [rows, cols] given H = 2·XᵀX/n [cols, cols] of the layer's inputs."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    keep = w != 0
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = spec.group_size
    if static_groups:
        static_scales, static_zeros = fit_groups(w, spec)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h, keep = w[:, perm], h[perm][:, perm], keep[:, perm]
    else:
        perm = torch.arange(cols, device=w.device)
    factor = inverse_hessian_factor(h, damp, layer)
    del h
    ints = torch.zeros_like(w)
    deq = torch.zeros_like(w)
    n_groups = -(-cols // gs)
    dyn_scales = torch.zeros(rows, n_groups, device=w.device)
    dyn_zeros = torch.zeros(rows, n_groups, device=w.device)
    if static_groups:
        col_scale = static_scales[:, perm // gs]
        col_zero = static_zeros[:, perm // gs]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        errs = torch.zeros(rows, i2 - i1, device=w.device)
        for j in range(i1, i2):
            if static_groups:
                s, z = col_scale[:, j], col_zero[:, j]
            else:
                if j % gs == 0:
                    s, z = fit_grid(w[:, j : j + gs], spec)
                    dyn_scales[:, j // gs], dyn_zeros[:, j // gs] = s, z
            col = w[:, j]
            q = torch.where(keep[:, j], quantize_ints(col, s, z, spec.maxq), z)
            dq = dequantize_ints(q, s, z)
            ints[:, j], deq[:, j] = q, dq
            err = (col - dq) / factor[j, j]
            w[:, j + 1 : i2] -= err.unsqueeze(1) * factor[j, j + 1 : i2].unsqueeze(0)
            errs[:, j - i1] = err
        w[:, i2:] -= errs @ factor[i1:i2, i2:]
    inverse = torch.argsort(perm)
    ints, deq = ints[:, inverse], deq[:, inverse]
    if static_groups:
        return QuantizedWeight(ints, static_scales, static_zeros, None, deq)
    g_idx = None
    if act_order:
        g_idx = (inverse // gs).to(torch.int32)
    return QuantizedWeight(ints, dyn_scales, dyn_zeros, g_idx, deq)
