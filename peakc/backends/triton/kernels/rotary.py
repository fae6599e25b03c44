"""Rotary position embedding (`peakc::rotary_embedding`) as a Triton lowering, both layouts.

One program takes one token (b, s) and a block of heads: the token's cos/sin rows are read
once and applied to every head in the block. Rotate-half pairs channel i with i + R/2 (two
contiguous half-rows per head); interleaved pairs 2i with 2i + 1 (two stride-2 reads of the
same cache lines). Channels past the rotated width R are copied. x may have any strides (q/k
usually are transposed views of a [B, S, H, D] projection); the output is laid out like x, as
the reference's `laid_out_like` leaves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from peakc.backends.triton.kernels.operands import dtype_reason, node_arguments, same_dtype_reason
from peakc.ir.ops import register_lowering

if TYPE_CHECKING:
    from torch import fx

# block_h: heads per program (sharing one token's cos/sin).
ROTARY_CONFIGS = [
    {"block_h": 4, "num_warps": 4},
    {"block_h": 1, "num_warps": 2},
    {"block_h": 8, "num_warps": 4},
    {"block_h": 16, "num_warps": 8},
]


@triton.jit
def rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    heads, seq, half, dim,
    xs_b, xs_h, xs_s, xs_d, os_b, os_h, os_s, os_d, cs_b, cs_s, cs_i, ss_b, ss_s, ss_i,
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):  # fmt: skip
    """Rotate the pairs of one token's block of heads: (a, b) -> (a*cos - b*sin, b*cos + a*sin)."""
    token = tl.program_id(0)
    b = token // seq
    s = token % seq
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    pair_mask = i < half
    c = tl.load(cos_ptr + b * cs_b + s * cs_s + i * cs_i, mask=pair_mask, other=0.0)
    sn = tl.load(sin_ptr + b * ss_b + s * ss_s + i * ss_i, mask=pair_mask, other=0.0)
    c, sn = c.to(tl.float32), sn.to(tl.float32)
    x_row = x_ptr + b.to(tl.int64) * xs_b + s * xs_s + h[:, None] * xs_h
    o_row = out_ptr + b.to(tl.int64) * os_b + s * os_s + h[:, None] * os_h
    mask = (h[:, None] < heads) & pair_mask[None, :]
    if INTERLEAVED:
        first, second = 2 * i[None, :], 2 * i[None, :] + 1
    else:
        first, second = i[None, :], i[None, :] + half
    a = tl.load(x_row + first * xs_d, mask=mask, other=0.0).to(tl.float32)
    bb = tl.load(x_row + second * xs_d, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(o_row + first * os_d, (a * c[None, :] - bb * sn[None, :]).to(out_dtype), mask=mask)
    tl.store(o_row + second * os_d, (bb * c[None, :] + a * sn[None, :]).to(out_dtype), mask=mask)
    if BLOCK_REST > 0:
        rest = 2 * half + tl.arange(0, BLOCK_REST)
        rest_mask = (h[:, None] < heads) & (rest[None, :] < dim)
        kept = tl.load(x_row + rest[None, :] * xs_d, mask=rest_mask)
        tl.store(o_row + rest[None, :] * os_d, kept, mask=rest_mask)


def why_not_rotary(node: fx.Node, graph: object, context: object) -> str | None:
    """Declines what the kernel does not cover: non-float or mixed dtypes (the reference would
    promote x to the tables' dtype), tables not [1|B, S, R/2] with R <= D."""
    x, cos, sin, interleaved = node_arguments(node)
    reason = dtype_reason("x", x) or dtype_reason("cos", cos) or dtype_reason("sin", sin)
    if reason:
        return reason
    reason = same_dtype_reason("x, cos and sin", x, cos, sin)
    if reason:
        return reason
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return "x is not [B, H, S, D] or cos/sin are not matching [B, S, R/2] tables"
    if cos.shape[0] not in (1, x.shape[0]) or cos.shape[1] != x.shape[2]:
        return "cos/sin rows do not match x's batch and sequence"
    if 2 * cos.shape[2] > x.shape[3]:
        return "rotary width 2 * cos.shape[-1] exceeds the head dim"
    if not isinstance(interleaved, bool):
        return "interleaved is not a constant"
    return None


def _table_strides(table: torch.Tensor) -> tuple[int, int, int]:
    """A [1|B, S, R/2] table's strides, batch stride 0 when one row set serves every sequence."""
    return (table.stride(0) if table.shape[0] > 1 else 0, table.stride(1), table.stride(2))


@register_lowering(
    "rotary_embedding", "triton", label="triton/rotary_embedding", why_not=why_not_rotary
)
def rotary_embedding(x, cos, sin, interleaved, *, config=None):
    """peakc::rotary_embedding on x [B, H, S, D] with tables [1|B, S, R/2]."""
    config = config or ROTARY_CONFIGS[0]
    batch, heads, seq, dim = x.shape
    half = cos.shape[-1]
    out = torch.empty_like(x)
    block_h = min(config["block_h"], triton.next_power_of_2(heads))
    rest = dim - 2 * half
    rotary_kernel[(batch * seq, triton.cdiv(heads, block_h))](
        x, cos, sin, out, heads, seq, half, dim, *x.stride(), *out.stride(),
        *_table_strides(cos), *_table_strides(sin),
        INTERLEAVED=interleaved, BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        num_warps=config["num_warps"],
    )  # fmt: skip
    return out


rotary_embedding.kernels = (rotary_kernel,)
rotary_embedding.configs = ROTARY_CONFIGS
