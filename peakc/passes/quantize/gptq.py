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

`gptq_quantize_batched` solves B layers of one shape with their own Hessians at once (the
experts of a MoE layer, compress_moe): every step above as one batched torch operation over
an experts dimension, equal to B calls of the torch solver.
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


def gptq_quantize_batched(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    spec: GridSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = True,
    layers: list[str] | None = None,
    owner: str = "quantize",
) -> list[QuantizedWeight]:
    """GPTQ for B layers of one shape at once (the experts of a MoE layer): `weights` [B, rows,
    cols], `hessians` [B, cols, cols], each layer with its own Hessian (and so its own
    act-order permutation). Every step of `gptq_quantize` runs as one batched torch operation
    over B: the Cholesky factors, the column walk inside a block and the lazy update (bmm), so
    B experts cost about one expert's kernel launches. Results equal B `gptq_quantize` calls
    with kernel="torch" up to float summation order; a Hessian that is not positive definite
    is retried alone with growing damping, as `gptq_quantize` does. Returns one
    QuantizedWeight per layer (kernel "batched")."""
    w = weights.detach().float()
    batch, rows, cols = w.shape
    names = layers or [f"layer {b}" for b in range(batch)]
    keep = w != 0
    h = hessians.detach().float().clone()
    dead = h.diagonal(dim1=1, dim2=2) == 0  # [B, cols]
    h.diagonal(dim1=1, dim2=2).masked_fill_(dead, 1.0)
    w = w.masked_fill(dead[:, None, :], 0.0)
    gs = spec.group_size
    n_groups = -(-cols // gs)
    if static_groups:
        static_scales, static_zeros = (
            t.view(batch, rows, n_groups) for t in fit_groups(w.reshape(batch * rows, cols), spec)
        )
    if act_order:
        perm = torch.argsort(h.diagonal(dim1=1, dim2=2), dim=1, descending=True)
        h = torch.take_along_dim(h, perm[:, :, None], dim=1)
        h = torch.take_along_dim(h, perm[:, None, :], dim=2)
    else:
        perm = torch.arange(cols, device=w.device).expand(batch, cols)
    factor = inverse_hessian_factors(h, damp, names, owner)
    del h
    by_col = perm[:, :, None]  # gathers [B, cols, rows] in the walk's column order
    wt = torch.take_along_dim(w.transpose(1, 2), by_col, dim=1)
    keep_t = torch.take_along_dim(keep.transpose(1, 2), by_col, dim=1)
    ints_t = torch.empty_like(wt)
    deq_t = torch.empty_like(wt)
    if static_groups:  # each (permuted) column's grid, [B, cols, rows]
        if n_groups == 1:  # one grid per row: a view, not B x cols x rows floats
            scale_t = static_scales.transpose(1, 2).expand(batch, cols, rows)
            zero_t = static_zeros.transpose(1, 2).expand(batch, cols, rows)
        else:
            group_of = (perm // gs)[:, :, None]
            scale_t = torch.take_along_dim(static_scales.transpose(1, 2), group_of, dim=1)
            zero_t = torch.take_along_dim(static_zeros.transpose(1, 2), group_of, dim=1)
    dyn_scales = torch.zeros(batch, rows, n_groups, device=w.device)
    dyn_zeros = torch.zeros(batch, rows, n_groups, device=w.device)
    for i1, i2 in column_blocks(cols, block_size, None if static_groups else gs):
        width = i2 - i1
        if static_groups:
            s, z = scale_t[:, i1:i2], zero_t[:, i1:i2]
        else:
            if i1 % gs == 0:  # a block never spans two groups here (column_blocks)
                group = wt[:, i1 : i1 + gs].transpose(1, 2).reshape(batch * rows, -1)
                grid = [t.view(batch, rows) for t in fit_grid(group, spec)]
                dyn_scales[:, :, i1 // gs], dyn_zeros[:, :, i1 // gs] = grid
            s = grid[0][:, None, :].expand(batch, width, rows)
            z = grid[1][:, None, :].expand(batch, width, rows)
        errs = solve_block_batched(
            wt[:, i1:i2],
            factor[:, i1:i2, i1:i2],
            keep_t[:, i1:i2],
            s,
            z,
            spec.maxq,
            ints_t[:, i1:i2],
            deq_t[:, i1:i2],
        )
        if i2 < cols:
            wt[:, i2:].baddbmm_(factor[:, i1:i2, i2:].transpose(1, 2), errs, alpha=-1)
    inverse = torch.argsort(perm, dim=1)[:, :, None]
    ints = torch.take_along_dim(ints_t, inverse, dim=1).transpose(1, 2)
    deq = torch.take_along_dim(deq_t, inverse, dim=1).transpose(1, 2)
    out = []
    for b in range(batch):
        if static_groups:
            scales, zeros, g_idx = static_scales[b], static_zeros[b], None
        else:
            scales, zeros = dyn_scales[b], dyn_zeros[b]
            g_idx = (inverse[b, :, 0] // gs).to(torch.int32) if act_order else None
        out.append(
            QuantizedWeight(
                ints[b].contiguous(), scales, zeros, g_idx, deq[b].contiguous(), "batched"
            )
        )
    return out


def inverse_hessian_factors(
    hessians: torch.Tensor, damp: float, layers: list[str], owner: str
) -> torch.Tensor:
    """`damped_inverse_factor` of each Hessian of a batch [B, cols, cols], batched; a Hessian
    that is not positive definite at `damp` is retried alone with growing damping (warning
    and error name its layer)."""
    mean_diag = hessians.diagonal(dim1=1, dim2=2).mean(dim=1)
    eye = torch.eye(hessians.shape[1], device=hessians.device)
    damped = hessians + (damp * mean_diag)[:, None, None] * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    factor, info_inv = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    finite = torch.isfinite(factor).flatten(1).all(dim=1)
    failed = ((info != 0) | (info_inv != 0) | ~finite).nonzero().flatten().tolist()
    for b in failed:
        factor[b] = damped_inverse_factor(hessians[b], damp, layers[b], owner)
    return factor


def solve_block_batched(
    wb: torch.Tensor,
    fb: torch.Tensor,
    keep: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    ints: torch.Tensor,
    deq: torch.Tensor,
) -> torch.Tensor:
    """`solve_block_torch` over a batch of layers: `wb` [B, width, rows] (updated in place),
    each layer's factor block `fb` [B, width, width]; codes and dequantized values go into
    `ints` and `deq`; returns the errors [B, width, rows]."""
    width = wb.shape[1]
    errs = torch.empty_like(wb)
    diag = fb.diagonal(dim1=1, dim2=2)  # [B, width]
    for j in range(width):
        col, s, z = wb[:, j], scale[:, j], zero[:, j]
        q = torch.where(keep[:, j], quantize_ints(col, s, z, maxq), z)
        ints[:, j] = q
        dq = torch.mul(q - z, s)
        deq[:, j] = dq
        err = torch.sub(col, dq).div_(diag[:, j, None])
        errs[:, j] = err
        if j + 1 < width:
            wb[:, j + 1 :].baddbmm_(fb[:, j, j + 1 :, None], err[:, None, :], alpha=-1)
    return errs


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
