"""W4A16 / W8A16 weight-only linear (`peakc::linear_wq`) in Triton: repack once, then a split-K
kernel for decode-sized batches and a tensor-core GEMM for prefill, chosen by M.

Repacked layout (`RepackedLinear`), read by both kernels:
  qweight int32 [k_padded * bits / 32, N]: E = 32 / bits codes per word along K (column
          E*i + j in bits [j*b, (j+1)*b) of word row i), N contiguous, so a program reads
          whole K-tiles for a run of N in coalesced rows and never shuffles codes: slot j of a
          tile's words is one slice of the weight, multiplied with the matching columns of x.
  scales  [groups, N] (the scales' dtype) and zeros uint8 [groups, N]: W = (q - z) * s.
  perm    int32 [K] or None: act-order columns are sorted by group at pack time, so groups are
          contiguous runs of G columns; the kernels read x[perm[j]] for packed column j.
  K is padded with zero codes (and groups with zero scales) to whole tiles; x is masked beyond
  K, so the padding contributes nothing.

A code becomes a float without an int-to-float conversion: placed at the top of the mantissa of
1.0 it reads 1 + q / 2^b, and one fused multiply-add with per-group constants gives (q - z) * s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from peakc.backends.triton.kernels.operands import as_rows
from peakc.errors import PeakcError
from peakc.ir.ops import pack_bits, unpack_bits

BITS = (4, 8)
MAX_TILE_WORDS = 32  # K is padded to whole tiles of this many word rows


@dataclass
class RepackedLinear:
    """A linear_wq weight in the kernels' layout (module docstring), built by `repack_linear_wq`."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group_size: int  # the op's G (round trips)
    group: int  # columns per scale row in the packed layout (G, or k_padded per channel)
    groups: int  # scale rows holding real groups (the rest is padding)
    in_features: int
    out_features: int
    k_padded: int

    def nbytes(self) -> int:
        parts = [self.qweight, self.scales, self.zeros]
        if self.perm is not None:
            parts.append(self.perm)
        return sum(t.numel() * t.element_size() for t in parts)


def repack_linear_wq(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    name: str = "linear_wq",
) -> RepackedLinear:
    """Repack peakc's linear_wq weights (ops.py layout) into the kernels' layout, on their device.
    Raises PeakcError, naming `name`, for a layout the kernels do not cover."""
    if bits not in BITS:
        raise PeakcError(f"{name}: {bits}-bit weights have no Triton kernel (bits 4 and 8 do)")
    out_features, n_groups = scales.shape
    k = in_features
    per_word = 32 // bits
    tile = MAX_TILE_WORDS * per_word
    k_padded = -(-k // tile) * tile
    if n_groups == 1:
        group = k_padded
    elif group_size & (group_size - 1) or group_size < per_word:
        raise PeakcError(f"{name}: group size {group_size} is not a power of two >= {per_word}")
    else:
        group = group_size
    codes = unpack_bits(qweight, bits, k)
    zeros = unpack_bits(qzeros, bits, n_groups)
    natural = torch.arange(k, device=codes.device) // group_size
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), natural):
        perm = torch.argsort(g_idx.long(), stable=True)
        if not torch.equal(g_idx.long()[perm], natural):
            raise PeakcError(
                f"{name}: act-order groups are not {group_size} columns each, so they cannot "
                "be made contiguous by a column permutation"
            )
        codes = codes[:, perm]
    codes = torch.nn.functional.pad(codes, (0, k_padded - k)).to(torch.int64)
    slots = codes.view(out_features, k_padded // per_word, per_word)
    shifts = torch.arange(per_word, device=codes.device) * bits
    words = (slots << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    rows = k_padded // group
    return RepackedLinear(
        qweight=words.T.contiguous(),
        scales=torch.nn.functional.pad(scales.T, (0, 0, 0, rows - n_groups)).contiguous(),
        zeros=torch.nn.functional.pad(zeros.T, (0, 0, 0, rows - n_groups))
        .to(torch.uint8)
        .contiguous(),
        perm=None if perm is None else perm.to(torch.int32),
        bits=bits,
        group_size=group_size,
        group=group,
        groups=n_groups,
        in_features=k,
        out_features=out_features,
        k_padded=k_padded,
    )


def unpack_linear_wq(
    packed: RepackedLinear,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of `repack_linear_wq`: (qweight, scales, qzeros, g_idx) in peakc's layout
    (g_idx is None when the columns were not permuted)."""
    bits, per_word = packed.bits, 32 // packed.bits
    words = packed.qweight.T.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=words.device) * bits
    slots = (words[..., None] >> shifts) & ((1 << bits) - 1)
    codes = slots.reshape(packed.out_features, packed.k_padded)[:, : packed.in_features]
    g_idx = None
    if packed.perm is not None:
        inverse = torch.argsort(packed.perm.long())
        codes = codes[:, inverse]
        g_idx = (inverse // packed.group_size).to(torch.int32)
    scales = packed.scales[: packed.groups].T.contiguous()
    zeros = packed.zeros[: packed.groups].T.to(torch.int64)
    return pack_bits(codes, bits), scales, pack_bits(zeros, bits), g_idx


# --- kernels ---------------------------------------------------------------------------------


@triton.jit
def _tile_product(
    acc,
    x_ptr,
    perm_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    t,
    offs_m,
    mask_m,
    offs_n,
    mask_n,
    N,
    K,
    stride_xm,
    group_words,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    WORDS: tl.constexpr,
    FINE_GROUPS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """acc + the product of x's K-tile t with the weight's K-tile t for columns offs_n.

    The tile is WORDS rows of words [BLOCK_N, WORDS]; slot j of every word is one [BLOCK_N,
    WORDS] slice of the weight (columns PER_WORD*i + j), multiplied with the matching (strided)
    columns of x.
    BLOCK_M == 1: acc [BLOCK_N, WORDS] of elementwise products (summed by the caller); else acc
    [BLOCK_N, BLOCK_M] += tl.dot(weight slice, x slice)."""
    PER_WORD: tl.constexpr = 32 // BITS
    LEVELS: tl.constexpr = 1 << BITS
    TOP: tl.constexpr = 23 - BITS
    rows = t * WORDS + tl.arange(0, WORDS)
    words = tl.load(qw_ptr + rows[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0)
    if FINE_GROUPS:
        cell = (rows // group_words)[None, :] * N + offs_n[:, None]
        scale = tl.load(s_ptr + cell, mask=mask_n[:, None], other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + cell, mask=mask_n[:, None], other=0).to(tl.float32)
    else:
        cell = (t * WORDS) // group_words * N + offs_n
        scale = tl.load(s_ptr + cell, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(z_ptr + cell, mask=mask_n, other=0).to(tl.float32)[:, None]
    # a code q placed at the top of a float's mantissa reads 1 + q / LEVELS, so
    # (q - z) * s = that * (LEVELS * s) - (LEVELS + z) * s: one fused multiply-add per weight
    slope = scale * LEVELS
    offset = -(zero + LEVELS) * scale
    for j in tl.static_range(PER_WORD):
        if BITS * j >= TOP:
            moved = words >> (BITS * j - TOP)
        else:
            moved = words << (TOP - BITS * j)
        mantissa = (moved & ((LEVELS - 1) << TOP)) | 0x3F800000
        w = mantissa.to(tl.float32, bitcast=True) * slope + offset
        kk = t * (WORDS * PER_WORD) + tl.arange(0, WORDS) * PER_WORD + j
        in_k = kk < K
        if HAS_PERM:
            kk = tl.load(perm_ptr + kk, mask=in_k, other=0)
        if BLOCK_M == 1:
            xv = tl.load(x_ptr + offs_m * stride_xm + kk, mask=in_k, other=0.0)
            acc += w * xv.to(tl.float32)[None, :]
        else:
            ptrs = x_ptr + offs_m[None, :] * stride_xm + kk[:, None]
            xt = tl.load(ptrs, mask=in_k[:, None] & mask_m[None, :], other=0.0)
            if DOT_F32:  # the CPU interpreter multiplies bf16 bit patterns (triton 3.9)
                acc = tl.dot(w.to(xt.dtype).to(tl.float32), xt.to(tl.float32), acc,
                             input_precision="ieee")  # fmt: skip
            else:
                acc = tl.dot(w.to(xt.dtype), xt, acc)
    return acc


@triton.jit
def _tile_row_factored(
    x_ptr,
    perm_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    t,
    row,
    offs_n,
    mask_n,
    N,
    K,
    group_words,
    BITS: tl.constexpr,
    WORDS: tl.constexpr,
    HAS_PERM: tl.constexpr,
):
    """One row of x times K-tile t [BLOCK_N] when the tile lies inside one group: the codes
    enter as f = 1 + q / 2^b straight from the words' bits, and scale and zero point apply once
    per column and tile, (q - z) s = 2^b s f - (2^b + z) s: one multiply-add per weight fewer
    than dequantizing each weight."""
    PER_WORD: tl.constexpr = 32 // BITS
    LEVELS: tl.constexpr = 1 << BITS
    TOP: tl.constexpr = 23 - BITS
    rows = t * WORDS + tl.arange(0, WORDS)
    words = tl.load(qw_ptr + rows[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0)
    lanes = tl.zeros(words.shape, dtype=tl.float32)
    x_sum = tl.zeros([WORDS], dtype=tl.float32)
    for j in tl.static_range(PER_WORD):
        if BITS * j >= TOP:
            moved = words >> (BITS * j - TOP)
        else:
            moved = words << (TOP - BITS * j)
        f = ((moved & ((LEVELS - 1) << TOP)) | 0x3F800000).to(tl.float32, bitcast=True)
        kk = t * (WORDS * PER_WORD) + tl.arange(0, WORDS) * PER_WORD + j
        in_k = kk < K
        if HAS_PERM:
            kk = tl.load(perm_ptr + kk, mask=in_k, other=0)
        xv = tl.load(x_ptr + row + kk, mask=in_k, other=0.0).to(tl.float32)
        lanes += f * xv[None, :]
        x_sum += xv
    cell = (t * WORDS) // group_words * N + offs_n
    scale = tl.load(s_ptr + cell, mask=mask_n, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + cell, mask=mask_n, other=0).to(tl.float32)
    return (
        tl.sum(lanes, axis=1) * (scale * LEVELS) - tl.sum(x_sum, axis=0) * (zero + LEVELS) * scale
    )


@triton.jit
def linear_wq_splitk_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_tiles,
    tiles_per_split,
    group_words,
    stride_xm,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS: tl.constexpr,
    FINE_GROUPS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    FACTORED: tl.constexpr,
    REDUCTION: tl.constexpr,
):
    """Decode GEMV: program (n, m, s) computes out[m-tile, n-tile] over the K-tiles of split s,
    on the CUDA cores when BLOCK_M == 1 (one row; FACTORED: scales applied per tile, which
    needs tiles inside groups), else with tl.dot. REDUCTION 0: store out;
    1: store fp32 partials [split, M, N]; 2: atomic add into a zeroed fp32 [M, N]."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    if BLOCK_M == 1 and FACTORED:
        row_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t in range(first, last):
            row_acc += _tile_row_factored(
                x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, t, pid_m * stride_xm, offs_n, mask_n, N,
                K, group_words, BITS, WORDS, HAS_PERM,
            )  # fmt: skip
        acc = row_acc[:, None]
        offs_m = pid_m + tl.arange(0, 1)
    elif BLOCK_M == 1:
        offs_m = pid_m
        mask_m = pid_m < M
        lanes = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        for t in range(first, last):
            lanes = _tile_product(
                lanes, x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, t, offs_m, mask_m, offs_n, mask_n,
                N, K, stride_xm, group_words, BITS, BLOCK_M, WORDS, FINE_GROUPS, HAS_PERM,
                DOT_F32,
            )  # fmt: skip
        acc = tl.sum(lanes, axis=1)[:, None]
        offs_m = pid_m + tl.arange(0, 1)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for t in range(first, last):
            acc = _tile_product(
                acc, x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, t, offs_m, mask_m, offs_n, mask_n,
                N, K, stride_xm, group_words, BITS, BLOCK_M, WORDS, FINE_GROUPS, HAS_PERM,
                DOT_F32,
            )  # fmt: skip
    mask = mask_n[:, None] & (offs_m < M)[None, :]
    cell = offs_m[None, :] * N + offs_n[:, None]
    if REDUCTION == 0:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + cell, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif REDUCTION == 1:
        tl.store(out_ptr + pid_s * M * N + cell, acc, mask=mask)
    else:
        tl.atomic_add(out_ptr + cell, acc, mask=mask, sem="relaxed")


@triton.jit
def sum_splits_kernel(
    part_ptr,
    bias_ptr,
    out_ptr,
    MN,
    N,
    splits,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = Σ_s partials[s] (+ bias), cast to out's dtype; partials fp32 [splits, M, N]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantized_tile(
    qw_ptr,
    s_ptr,
    z_ptr,
    t,
    offs_n,
    mask_n,
    N,
    group_words,
    BITS: tl.constexpr,
    WORDS: tl.constexpr,
    FINE_GROUPS: tl.constexpr,
):
    """K-tile t of the weight for columns offs_n as floats [WORDS * 32 / BITS, BLOCK_N] in
    column order: each word row is loaded once and spread over its slots in registers.

    A code q under the exponent of 2^23 reads 2^23 + q exactly, so (q - z) * s is one add and
    one multiply on the loaded word, without an int-to-float conversion."""
    PER_WORD: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = WORDS * PER_WORD
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    rows = t * WORDS + tl.arange(0, WORDS)
    words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    shifts = tl.arange(0, PER_WORD) * BITS
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    codes = tl.reshape(codes, [BLOCK_K, BLOCK_N])
    magic = (codes | 0x4B000000).to(tl.float32, bitcast=True)
    if FINE_GROUPS:
        group_rows = (t * BLOCK_K + tl.arange(0, BLOCK_K)) // (group_words * PER_WORD)
        cell = group_rows[:, None] * N + offs_n[None, :]
        scale = tl.load(s_ptr + cell, mask=mask_n[None, :], other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + cell, mask=mask_n[None, :], other=0).to(tl.float32)
    else:
        cell = (t * WORDS) // group_words * N + offs_n
        scale = tl.load(s_ptr + cell, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        zero = tl.load(z_ptr + cell, mask=mask_n, other=0).to(tl.float32)[None, :]
    return (magic - (zero + 8388608.0)) * scale


@triton.jit
def linear_wq_gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_tiles,
    group_words,
    stride_xm,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS: tl.constexpr,
    FINE_GROUPS: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Prefill GEMM (x in packed column order: permuted when act-order): each program owns an
    out tile [BLOCK_M, BLOCK_N] and walks K in tiles, dequantizing a whole weight tile in
    registers for one tl.dot; programs go in bands of GROUP_M m-tiles so that neighbours share
    weight tiles in L2."""
    BLOCK_K: tl.constexpr = WORDS * (32 // BITS)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, k_tiles):
        w = _dequantized_tile(
            qw_ptr, s_ptr, z_ptr, t, offs_n, mask_n, N, group_words, BITS, WORDS, FINE_GROUPS
        )
        kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        ptrs = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
        xt = tl.load(ptrs, mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
        if DOT_F32:  # the CPU interpreter multiplies bf16 bit patterns (triton 3.9)
            acc = tl.dot(xt.to(tl.float32), w.to(xt.dtype).to(tl.float32), acc,
                         input_precision="ieee")  # fmt: skip
        else:
            acc = tl.dot(xt, w.to(xt.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    cell = offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + cell, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequantize_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    group_words,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS: tl.constexpr,
    FINE_GROUPS: tl.constexpr,
):
    """Writes the float weight transposed in packed column order, Wᵀ [K, N] in out's dtype,
    tile (n, t) per program: for large batches, where a library GEMM on it beats
    dequantizing per output tile."""
    BLOCK_K: tl.constexpr = WORDS * (32 // BITS)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = tl.program_id(1)
    w = _dequantized_tile(
        qw_ptr, s_ptr, z_ptr, t, offs_n, mask_n, N, group_words, BITS, WORDS, FINE_GROUPS
    )
    kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (kk < K)[:, None] & mask_n[None, :]
    tl.store(out_ptr + kk[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# --- choosing and launching ------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """One launch's shape: block_k columns per K-tile (a multiple of 16 words for the split-K
    kernel's tl.dot); split_k = 0 picks the split from the multiprocessor count. kernel
    "dequant": the weight dequantized into a scratch Wᵀ (tiles block_k x block_n), then
    torch.matmul (cuBLAS)."""

    kernel: Literal["splitk", "gemm", "dequant"]
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    reduction: Literal["partials", "atomic"] = "partials"
    factored: bool = True  # block_m 1: scales per tile when a tile lies inside one group


# M bucket (upper bound) -> configuration per bits; the first bucket that holds M wins.
# Measured on an H200 (benchmarks/lowbit_kernels.py --sweep-out): the factored GEMV wins for
# int4 and loses for int8; from M = 128 on, dequantize + cuBLAS beats every fused GEMM tried.
CONFIGS: list[tuple[int, dict[int, KernelConfig]]] = [
    (
        1,
        {
            4: KernelConfig("splitk", 1, 256, 128),
            8: KernelConfig("splitk", 1, 256, 64, factored=False),
        },
    ),
    (16, {4: KernelConfig("splitk", 16, 128, 128), 8: KernelConfig("splitk", 16, 128, 128)}),
    (64, {4: KernelConfig("splitk", 64, 128, 128), 8: KernelConfig("splitk", 64, 128, 64)}),
    (
        1 << 62,
        {4: KernelConfig("dequant", 1, 64, 256), 8: KernelConfig("dequant", 1, 64, 128)},
    ),
]
# (bits, N, K, M bucket) -> configuration measured better than the bucket's for that shape.
SHAPE_CONFIGS: dict[tuple[int, int, int, int], KernelConfig] = {}


def choose_config(m: int, packed: RepackedLinear) -> KernelConfig:
    """The configuration for M rows: the shape's own entry if measured, else the M bucket's."""
    bucket, configs = next((b, c) for b, c in CONFIGS if m <= b)
    key = (packed.bits, packed.out_features, packed.in_features, bucket)
    return SHAPE_CONFIGS.get(key, configs[packed.bits])


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(programs: int, k_tiles: int, multiprocessors: int) -> tuple[int, int]:
    """(splits, K-tiles per split) giving about four waves of programs (measured better than
    two on an H200 for decode batches)."""
    want = max(1, min(k_tiles, -(-4 * multiprocessors // programs)))
    per_split = -(-k_tiles // want)
    return -(-k_tiles // per_split), per_split


def dequantize_transposed(
    packed: RepackedLinear, dtype: torch.dtype, config: KernelConfig
) -> torch.Tensor:
    """The float weight transposed in packed column order, Wᵀ [K, N] in `dtype`."""
    k, n = packed.in_features, packed.out_features
    per_word = 32 // packed.bits
    words = config.block_k // per_word
    out = torch.empty(k, n, dtype=dtype, device=packed.qweight.device)
    grid = (triton.cdiv(n, config.block_n), packed.k_padded // config.block_k)
    dequantize_kernel[grid](
        packed.qweight, packed.scales, packed.zeros, out, n, k, packed.group // per_word,
        BITS=packed.bits, BLOCK_N=config.block_n, WORDS=words,
        FINE_GROUPS=packed.group // per_word < words, num_warps=config.num_warps,
    )  # fmt: skip
    return out


def linear_wq_triton(
    x: torch.Tensor,
    packed: RepackedLinear,
    bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequantized(packed)ᵀ + bias -> [..., N] in x's dtype (fp16 or bf16)."""
    k, n = packed.in_features, packed.out_features
    lead = x.shape[:-1]
    x2 = as_rows(x)
    m = x2.shape[0]
    config = config or choose_config(m, packed)
    per_word = 32 // packed.bits
    words = config.block_k // per_word
    if config.block_k % per_word or packed.k_padded % config.block_k:
        raise ValueError(f"block_k {config.block_k} does not tile {packed.k_padded} columns")
    if config.kernel == "splitk" and config.block_m > 1 and words < 16:
        raise ValueError(f"tl.dot needs block_k >= {16 * per_word} for {packed.bits}-bit codes")
    k_tiles = packed.k_padded // config.block_k
    group_words = packed.group // per_word
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else packed.scales
    common = dict(
        BITS=packed.bits,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        WORDS=words,
        FINE_GROUPS=group_words < words,
        HAS_BIAS=bias is not None,
        DOT_F32=x.device.type != "cuda",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if config.kernel == "dequant":
        wt = dequantize_transposed(packed, x.dtype, config)
        xp = x2 if packed.perm is None else x2.index_select(1, packed.perm)
        out = xp @ wt if bias is None else torch.addmm(bias.to(x.dtype), xp, wt)
        return out.reshape(*lead, n)
    if config.kernel == "gemm":
        xp = x2 if packed.perm is None else x2.index_select(1, packed.perm)
        programs = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
        linear_wq_gemm_kernel[(programs,)](
            xp, packed.qweight, packed.scales, packed.zeros, bias_arg, out,
            m, n, k, k_tiles, group_words, xp.stride(0), GROUP_M=8, **common,
        )  # fmt: skip
        return out.reshape(*lead, n)
    tiles = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    if config.split_k:
        per_split = -(-k_tiles // config.split_k)
        splits = -(-k_tiles // per_split)
    else:
        splits, per_split = split_count(tiles[0] * tiles[1], k_tiles, _multiprocessors(x.device))
    perm = packed.perm if packed.perm is not None else packed.qweight
    weights = (packed.qweight, packed.scales, packed.zeros, perm, bias_arg)
    scalars = (m, n, k, k_tiles, per_split, group_words, x2.stride(0))
    common["HAS_PERM"] = packed.perm is not None
    common["FACTORED"] = config.factored and not common["FINE_GROUPS"]
    grid = (*tiles, splits)
    if splits == 1:
        linear_wq_splitk_kernel[grid](x2, *weights, out, *scalars, REDUCTION=0, **common)
        return out.reshape(*lead, n)
    common["HAS_BIAS"] = False
    if config.reduction == "atomic":
        partial = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        splits_summed, reduction = 1, 2
    else:
        partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        splits_summed, reduction = splits, 1
    linear_wq_splitk_kernel[grid](x2, *weights, partial, *scalars, REDUCTION=reduction, **common)
    block = 1024
    sum_splits_kernel[(triton.cdiv(m * n, block),)](
        partial, bias_arg, out, m * n, n, splits_summed, HAS_BIAS=bias is not None, BLOCK=block
    )
    return out.reshape(*lead, n)


def dequantize_repacked(packed: RepackedLinear) -> torch.Tensor:
    """The float weight [N, K] (scales' dtype, original column order), for checks."""
    from peakc.ir.ops import dequantize_weight

    qweight, scales, qzeros, g_idx = unpack_linear_wq(packed)
    return dequantize_weight(
        qweight, scales, qzeros, g_idx, packed.bits, packed.group_size, packed.in_features
    )
