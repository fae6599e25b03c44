"""`peakc::grouped_mm` (the routed experts of an uncompressed MoE layer: x [T, K] sorted by
expert, weight [E, K, N], offsets [E] cumulative token counts) as one Triton grouped GEMM.

One program per (block of N columns, expert): it reads its expert's token rows from the
offsets on the device (no host sync, so a decode step with MoE layers replays as a CUDA graph)
and walks them in blocks of `block_m`, each block's product over K accumulated in fp32 with
tl.dot and stored once. An expert without tokens reads none of its weight. Rows past the last
offset stay zero, as in the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from peakc.backends.triton.kernels.attention import _dot, _dot_precision
from peakc.backends.triton.kernels.operands import dtype_reason, node_arguments, same_dtype_reason
from peakc.ir.ops import register_lowering

if TYPE_CHECKING:
    from torch import fx

GROUPED_MM_CONFIGS = [
    {"block_m": 16, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 2},
    {"block_m": 16, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 128, "block_n": 128, "block_k": 32, "num_warps": 8, "num_stages": 3},
]


@triton.jit
def grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, offsets_ptr, K, N,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """out[rows of expert e, block of N] = x[rows] @ weight[e][:, block]."""
    pid_n = tl.program_id(0)
    expert = tl.program_id(1)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int32)
    end = tl.load(offsets_ptr + expert).to(tl.int32)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(
                x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                w_base + ks.to(tl.int64)[:, None] * stride_wk + cols[None, :] * stride_wn,
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            acc += _dot(a, b, PRECISION)
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def why_not_grouped_mm(node: fx.Node, graph: object, context: object) -> str | None:
    """Declines non-float or mixed dtypes, shapes other than x [T, K], weight [E, K, N] and
    offsets [E] of integers."""
    x, weight, offsets = node_arguments(node)
    reason = dtype_reason("x", x) or dtype_reason("weight", weight)
    reason = reason or same_dtype_reason("x and weight", x, weight)
    if reason is None and (x.dim() != 2 or weight.dim() != 3 or weight.shape[1] != x.shape[1]):
        reason = f"x {list(x.shape)} and weight {list(weight.shape)} are not [T, K], [E, K, N]"
    if reason is None and not isinstance(offsets, torch.Tensor):
        reason = "offsets has no recorded tensor value"
    if reason is None and (offsets.dtype not in (torch.int32, torch.int64) or offsets.dim() != 1):
        reason = "offsets are not a vector of int32/int64"
    if reason is None and offsets.shape[0] != weight.shape[0]:
        reason = f"{offsets.shape[0]} offsets for {weight.shape[0]} experts"
    return reason


@register_lowering("grouped_mm", "triton", label="triton/grouped_mm", why_not=why_not_grouped_mm)
def grouped_mm(x, weight, offsets, *, config=None):
    """peakc::grouped_mm: the routed tokens' rows times their experts' weights."""
    config = config or GROUPED_MM_CONFIGS[0]
    experts, k, n = weight.shape
    out = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config["block_n"]), experts)
    grouped_mm_kernel[grid](
        x, weight, out, offsets, k, n,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        out.stride(0),
        BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], BLOCK_K=config["block_k"],
        PRECISION=_dot_precision(x), num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )  # fmt: skip
    return out


grouped_mm.kernels = (grouped_mm_kernel, _dot)
grouped_mm.configs = GROUPED_MM_CONFIGS
