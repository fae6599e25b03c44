"""`peakc::linear_compressed` in Triton: decode the dictionary code and multiply in one pass.

The weight never exists decompressed, not even in a tile: a program owns one output row and a
few of its segments at a time. It loads the segments' codewords [S, W], looks each up in the
code table (its length, and up to 7 non-zero levels with their positions), finds where each
word starts by a prefix sum of the lengths, and multiplies every non-zero level with the
input column it lands on, gathered from x. Zeros, most of a ternary expert, cost nothing.
For M > 1 (the tokens routed to one expert) a program decodes once and applies the row to
`block_m` rows of x. Layout: peakc/ir/dictionary_code.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peakc.backends.triton.kernels.operands import as_rows
from peakc.ir.dictionary_code import MAX_NONZEROS, segments_per_row
from peakc.ir.ops import register_lowering

TABLE_WIDTH = 1 + MAX_NONZEROS  # 8: a power of two, so a table row is one tile axis
MAX_TILE_WORDS = 1024  # segments holding more words than this are left to the reference
# Config dicts the launcher accepts: `tile` bounds the elements a program decodes at once
# (segments per step = tile // (8 * words per segment)), `block_m` the rows of x it applies
# them to. The first is the decode GEMV default.
CONFIGS = [
    {"tile": 2048, "block_m": 1, "num_warps": 4},
    {"tile": 4096, "block_m": 1, "num_warps": 8},
    {"tile": 1024, "block_m": 1, "num_warps": 2},
    {"tile": 2048, "block_m": 4, "num_warps": 4},
    {"tile": 2048, "block_m": 16, "num_warps": 8},
]


@triton.jit
def _linear_compressed_kernel(
    x_ptr,
    words_ptr,
    offsets_ptr,
    table_ptr,
    scales_ptr,
    bias_ptr,
    y_ptr,
    M,
    K,
    D,
    n_seg,
    stride_xm,
    stride_ym,
    SEGMENT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    rows_m = m0 + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    slot = tl.arange(0, WIDTH)
    for s0 in range(0, n_seg, BLOCK_S):
        segs = s0 + tl.arange(0, BLOCK_S)
        seg_ok = segs < n_seg
        start = tl.load(offsets_ptr + row * n_seg + segs, mask=seg_ok, other=0)
        end = tl.load(offsets_ptr + row * n_seg + segs + 1, mask=seg_ok, other=0)
        idx = start[:, None] + tl.arange(0, BLOCK_W)[None, :]
        word_ok = (idx < end[:, None]) & seg_ok[:, None]
        code = tl.load(words_ptr + idx, mask=word_ok, other=0).to(tl.int32) & 0xFFFF
        code = tl.where(code < D, code, 0)  # a damaged codeword reads a real row, never past
        length = tl.load(table_ptr + code * WIDTH, mask=word_ok, other=0).to(tl.int32)
        pos = tl.cumsum(length, axis=1) - length
        entry_ok = word_ok[:, :, None] & (slot[None, None, :] > 0)
        entry = tl.load(
            table_ptr + code[:, :, None] * WIDTH + slot[None, None, :], mask=entry_ok, other=0
        ).to(tl.int32)
        kind = entry & 3
        level = tl.where(kind == 1, 1.0, tl.where(kind == 2, -2.0, tl.where(kind == 3, -1.0, 0.0)))
        at = pos[:, :, None] + (entry >> 2)
        seg_len = tl.minimum(K - segs * SEGMENT, SEGMENT)
        hit = (kind != 0) & (at < seg_len[:, None, None])
        col = segs[:, None, None] * SEGMENT + at
        for i in tl.static_range(BLOCK_M):
            m = m0 + i
            x_row = tl.minimum(m, M - 1)  # rows past M are computed, never stored
            xv = tl.load(x_ptr + x_row * stride_xm + col, mask=hit, other=0.0)
            part = tl.sum(tl.sum(tl.sum(xv.to(tl.float32) * level, axis=2), axis=1), axis=0)
            acc = tl.where(rows_m == m, acc + part, acc)
    out = acc * tl.load(scales_ptr + row).to(tl.float32)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + row).to(tl.float32)
    tl.store(y_ptr + rows_m * stride_ym + row, out.to(y_ptr.dtype.element_ty), mask=rows_m < M)


def why_not_linear_compressed(node, graph, context) -> str | None:
    """Decline segments too long for one tile of codewords."""
    max_words = node.args[9]
    if max_words > MAX_TILE_WORDS:
        return (
            f"linear_compressed: {max_words} codewords in a segment "
            f"(kernel tiles hold {MAX_TILE_WORDS})"
        )
    return None


@register_lowering(
    "linear_compressed",
    "triton",
    label="triton/linear_compressed",
    why_not=why_not_linear_compressed,
)
def linear_compressed_triton(
    x: torch.Tensor,
    words: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    checksum: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    segment: int,
    max_words: int,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] @ decoded Wᵀ (+ bias) in one kernel; `config` one of CONFIGS (None: the
    first, with `block_m` fitted to the rows of x). The checksum is verified where the
    stream is loaded (artifact) or decoded by the reference, not per launch."""
    rows = scales.shape[0]
    x2 = as_rows(x)
    m = x2.shape[0]
    if config is None:
        config = dict(CONFIGS[0], block_m=min(triton.next_power_of_2(max(m, 1)), 8))
    y = torch.empty(m, rows, dtype=x.dtype, device=x.device)
    block_w = triton.next_power_of_2(max(max_words, 1))
    n_seg = segments_per_row(in_features, segment)
    block_s = min(triton.next_power_of_2(n_seg), max(1, config["tile"] // (TABLE_WIDTH * block_w)))
    grid = (rows, triton.cdiv(m, config["block_m"]))
    _linear_compressed_kernel[grid](
        x2,
        words,
        offsets,
        table,
        scales,
        bias if bias is not None else scales,
        y,
        m,
        in_features,
        table.shape[0],
        n_seg,
        x2.stride(0),
        y.stride(0),
        SEGMENT=segment,
        BLOCK_S=block_s,
        BLOCK_W=block_w,
        BLOCK_M=config["block_m"],
        WIDTH=TABLE_WIDTH,
        HAS_BIAS=bias is not None,
        num_warps=config["num_warps"],
    )
    return y.reshape(*x.shape[:-1], rows)


linear_compressed_triton.kernels = (_linear_compressed_kernel,)
linear_compressed_triton.configs = CONFIGS
