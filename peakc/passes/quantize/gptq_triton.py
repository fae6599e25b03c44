"""Triton kernel for one GPTQ column block: one launch walks the block's columns for a tile of
rows (rows are independent in GPTQ once the inverse-Hessian factor is fixed).

Each program keeps the errors of the columns it has quantized, E [width, BLOCK_R], in
registers and computes column j as it stands after the in-block updates, left-looking:
w_j - Σ_{k<j} F[k, j]·E_k (the torch solver subtracts the same terms one column at a time, so
the two agree up to float rounding). The column is rounded on its grid (half to even, as
torch.round), pruned weights keep the zero code, and the code, the dequantized value and the
error (w_j - dq_j) / F[j, j] are written out. The lazy update of the remaining columns stays a
matrix product in the caller. Runs under TRITON_INTERPRET=1 on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 32


@triton.jit
def _round_half_even(x):
    """torch.round's rounding: to nearest, ties to the even integer."""
    low = tl.floor(x)
    frac = x - low
    odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, low + 1.0, low)


@triton.jit
def gptq_block_kernel(
    w_ptr,
    ft_ptr,
    keep_ptr,
    scale_ptr,
    zero_ptr,
    ints_ptr,
    deq_ptr,
    err_ptr,
    rows,
    width,
    ft_stride,
    grid_stride,
    maxq,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """w, keep, ints, deq, err: [width, rows] contiguous; ft: the factor block transposed
    (ft[j, k] = F[k, j]), row stride ft_stride; scale, zero: [width, rows] with row stride
    grid_stride (0 when every column shares one grid)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = r < rows
    c = tl.arange(0, BLOCK_C)
    errs = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
    for j in range(0, width):
        f = tl.load(ft_ptr + j * ft_stride + c, mask=c < j, other=0.0)
        w = tl.load(w_ptr + j * rows + r, mask=in_rows, other=0.0)
        col = w - tl.sum(errs * f[:, None], axis=0)
        s = tl.load(scale_ptr + j * grid_stride + r, mask=in_rows, other=1.0)
        z = tl.load(zero_ptr + j * grid_stride + r, mask=in_rows, other=0.0)
        keep = tl.load(keep_ptr + j * rows + r, mask=in_rows, other=0)
        q = _round_half_even(tl.math.div_rn(col, s)) + z
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        q = tl.where(keep != 0, q, z)
        dq = (q - z) * s
        d = tl.load(ft_ptr + j * ft_stride + j)
        err = tl.math.div_rn(col - dq, d)
        tl.store(ints_ptr + j * rows + r, q, mask=in_rows)
        tl.store(deq_ptr + j * rows + r, dq, mask=in_rows)
        tl.store(err_ptr + j * rows + r, err, mask=in_rows)
        errs = tl.where(c[:, None] == j, err[None, :], errs)


def solve_block_triton(
    wb: torch.Tensor,
    fb: torch.Tensor,
    keep: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    ints: torch.Tensor,
    deq: torch.Tensor,
) -> torch.Tensor:
    """Same contract as gptq.solve_block_torch, except that `wb` is left as it was."""
    width, rows = wb.shape
    assert wb.is_contiguous() and keep.is_contiguous() and ints.is_contiguous()
    assert deq.is_contiguous() and scale.stride(1) == 1 and scale.stride() == zero.stride()
    ft = fb.T.contiguous()
    errs = torch.empty_like(wb)
    grid = (triton.cdiv(rows, BLOCK_R),)
    gptq_block_kernel[grid](
        wb,
        ft,
        keep.view(torch.uint8),
        scale,
        zero,
        ints,
        deq,
        errs,
        rows,
        width,
        ft.stride(0),
        scale.stride(0),
        float(maxq),
        BLOCK_R=BLOCK_R,
        BLOCK_C=max(16, triton.next_power_of_2(width)),
    )
    return errs
