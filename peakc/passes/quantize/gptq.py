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

The weight is walked transposed ([cols, rows]) so that a column is contiguous. A column block
is solved by `solve_block_torch` (CPU, or when triton is missing) or by the Triton kernel in
gptq_triton.py (CUDA), one launch per block; the lazy update is a matrix product either way.
Without static groups, blocks are also split at group starts and the grid is fitted in torch
at the block's start, on weights that carry the updates of every earlier column. (The
earlier per-column loop fitted a group running past its block's end on columns still
missing that block's updates; the two differ only when group and block boundaries do not
line up, e.g. block_size 48 with group_size 32.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from peakc.errors import PeakcError
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
    kernel: str = "torch"  # what solved GPTQ's column blocks: "torch" or "triton" (RTN: "torch")

    def __getitem__(self, rows: slice) -> QuantizedWeight:
        """The quantized rows `rows` (the group index is per column: shared)."""
        return QuantizedWeight(
            self.ints[rows],
            self.scales[rows],
            self.zeros[rows],
            self.g_idx,
            self.dequantized[rows],
            self.kernel,
        )


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


Kernel = Literal["auto", "torch", "triton"]
BlockSolver = Callable[..., torch.Tensor]


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
    kernel: Kernel = "auto",
) -> QuantizedWeight:
    """GPTQ for `weight` [rows, cols] given H = 2·XᵀX/n [cols, cols] of the layer's inputs.

    `kernel` picks the column-block solver: "auto" is Triton for a CUDA weight when triton
    imports, else torch; the result says which ran.
    """
    w = weight.detach().float()
    rows, cols = w.shape
    keep = w != 0
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w = w.masked_fill(dead, 0.0)
    gs = spec.group_size
    n_groups = -(-cols // gs)
    if static_groups:
        static_scales, static_zeros = fit_groups(w, spec)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        h = h[perm][:, perm]
    else:
        perm = torch.arange(cols, device=w.device)
    factor = inverse_hessian_factor(h, damp, layer)
    del h
    name, solve = block_solver(kernel, w.device)
    wt = w.T[perm].contiguous()  # row j: column j of the (permuted) weight
    keep_t = keep.T[perm].contiguous()
    ints_t = torch.empty_like(wt)
    deq_t = torch.empty_like(wt)
    if static_groups:  # each (permuted) column's grid, [cols, rows]
        scale_t = static_scales.T[perm // gs].contiguous()
        zero_t = static_zeros.T[perm // gs].contiguous()
    dyn_scales = torch.zeros(rows, n_groups, device=w.device)
    dyn_zeros = torch.zeros(rows, n_groups, device=w.device)
    for i1, i2 in column_blocks(cols, block_size, None if static_groups else gs):
        width = i2 - i1
        if static_groups:
            s, z = scale_t[i1:i2], zero_t[i1:i2]
        else:
            if i1 % gs == 0:  # a block never spans two groups here (column_blocks)
                grid = fit_grid(wt[i1 : i1 + gs].T, spec)
                dyn_scales[:, i1 // gs], dyn_zeros[:, i1 // gs] = grid
            s, z = grid[0].expand(width, rows), grid[1].expand(width, rows)
        errs = solve(
            wt[i1:i2],
            factor[i1:i2, i1:i2],
            keep_t[i1:i2],
            s,
            z,
            spec.maxq,
            ints_t[i1:i2],
            deq_t[i1:i2],
        )
        if i2 < cols:
            wt[i2:].addmm_(factor[i1:i2, i2:].T, errs, alpha=-1)
    inverse = torch.argsort(perm)
    ints = ints_t[inverse].T.contiguous()
    deq = deq_t[inverse].T.contiguous()
    if static_groups:
        return QuantizedWeight(ints, static_scales, static_zeros, None, deq, name)
    g_idx = (inverse // gs).to(torch.int32) if act_order else None
    return QuantizedWeight(ints, dyn_scales, dyn_zeros, g_idx, deq, name)


def column_blocks(cols: int, block_size: int, group_size: int | None) -> list[tuple[int, int]]:
    """[start, stop) of each column block: every `block_size` columns, and also at every group
    start when grids are fitted during the walk (`group_size` given)."""
    starts = set(range(0, cols, block_size))
    if group_size is not None:
        starts |= set(range(0, cols, group_size))
    bounds = sorted(starts) + [cols]
    return list(zip(bounds[:-1], bounds[1:]))


def block_solver(kernel: Kernel, device: torch.device) -> tuple[str, BlockSolver]:
    """The column-block solver `kernel` asks for ("auto": Triton on CUDA when triton imports)."""
    if kernel == "torch" or (kernel == "auto" and device.type != "cuda"):
        return "torch", solve_block_torch
    try:
        from peakc.passes.quantize.gptq_triton import solve_block_triton
    except ImportError:
        if kernel == "triton":
            raise PeakcError(
                "quantize: kernel 'triton' asked for but triton does not import"
            ) from None
        return "torch", solve_block_torch
    return "triton", solve_block_triton


def solve_block_torch(
    wb: torch.Tensor,
    fb: torch.Tensor,
    keep: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    ints: torch.Tensor,
    deq: torch.Tensor,
) -> torch.Tensor:
    """Quantize a block's columns in order (rows of `wb` [width, rows], updated in place):
    write codes and dequantized values into `ints` and `deq`, push each column's scaled error
    onto the block's later columns through the factor block `fb` [width, width], and return
    the errors [width, rows] for the lazy update of the remaining columns."""
    width = wb.shape[0]
    errs = torch.empty_like(wb)
    diag = fb.diagonal().tolist()
    for j in range(width):
        col, s, z = wb[j], scale[j], zero[j]
        q = torch.where(keep[j], quantize_ints(col, s, z, maxq), z)
        ints[j] = q
        dq = torch.mul(q - z, s, out=deq[j])
        err = torch.sub(col, dq, out=errs[j]).div_(diag[j])
        if j + 1 < width:
            wb[j + 1 :].addmm_(fb[j, j + 1 :, None], err[None], alpha=-1)
    return errs
