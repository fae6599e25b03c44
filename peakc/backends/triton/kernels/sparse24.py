"""2:4-sparse linears (`peakc::linear_sparse24`, float values) and 2:4 + int4/int8
(`peakc::linear_sparse24_wq`) in Triton: one kernel reads the compressed weight and either
gathers x at the kept columns (one row of x) or expands each K-tile in registers for tl.dot.

Repacked layout (`RepackedSparse24`), N contiguous everywhere so a program reads rows:
  values  float [K/2, N] (linear_sparse24), or the kept values' codes as linear_wq's repacked
          words (`repack_linear_wq` over the compressed K/2 columns, groups of G/2).
  meta    int32 [ceil(K/32), N]: group of 4 columns g holds nibble g % 8 of word row g // 8, its
          two kept columns i0 | i1 << 2 (i0 < i1 unless the group kept zeros).
Bytes per dense weight: 4-bit codes 2 + meta 1 bit (+ scales); bf16 values 8 + 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from peakc.backends.triton.kernels.operands import as_rows
from peakc.errors import PeakcError
from peakc.ir.ops import sparse24_values_weight, unpack_bits

from .linear_wq import (
    RepackedLinear,
    _multiprocessors,
    dequantize_repacked,
    repack_linear_wq,
    sum_splits_kernel,
)


@dataclass
class RepackedSparse24:
    """A 2:4-compressed linear weight in the kernel's layout (module docstring)."""

    values: torch.Tensor | RepackedLinear
    meta: torch.Tensor
    in_features: int
    out_features: int
    semi: torch.Tensor | None = None  # torch's semi-structured form, built on first use

    @property
    def quantized(self) -> bool:
        return isinstance(self.values, RepackedLinear)

    def nbytes(self) -> int:
        values = self.values
        size = values.nbytes() if isinstance(values, RepackedLinear) else _bytes(values)
        return size + _bytes(self.meta)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _meta_words(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The op's meta (2 bits per kept value, [N, K/8] bytes) as int32 words [ceil(K/32), N]."""
    rows, groups = meta.shape[0], in_features // 4
    nibbles = unpack_bits(meta, 4, groups).to(torch.int64)
    nibbles = torch.nn.functional.pad(nibbles, (0, -groups % 8)).view(rows, -1, 8)
    words = (nibbles << (torch.arange(8, device=meta.device) * 4)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.T.contiguous()


def _check_in_features(in_features: int, name: str) -> None:
    if in_features % 4:
        raise PeakcError(
            f"{name}: 2:4 sparsity needs in_features divisible by 4, got {in_features}"
        )


def repack_sparse24(
    values: torch.Tensor, meta: torch.Tensor, in_features: int, name: str = "linear_sparse24"
) -> RepackedSparse24:
    """linear_sparse24's (values, meta) in the kernel's layout, on their device."""
    _check_in_features(in_features, name)
    return RepackedSparse24(
        values.T.contiguous(), _meta_words(meta, in_features), in_features, values.shape[0]
    )


def repack_sparse24_wq(
    qvalues: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    meta: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    name: str = "linear_sparse24_wq",
) -> RepackedSparse24:
    """linear_sparse24_wq's weight in the kernel's layout: the kept values' codes repacked as a
    linear_wq of K/2 columns (so `repack_linear_wq`'s refusals apply, naming `name`)."""
    _check_in_features(in_features, name)
    if scales.shape[1] > 1 and group_size % 4:
        raise PeakcError(f"{name}: 2:4 needs groups of a multiple of 4 columns, got {group_size}")
    kept = sparse24_values_weight(qvalues, scales, qzeros, bits, group_size, in_features)
    values = repack_linear_wq(*kept.tensors().values(), None, *kept.layout(), name=name,
                              min_group=2)  # fmt: skip
    return RepackedSparse24(values, _meta_words(meta, in_features), in_features, scales.shape[0])


def dense_weight(packed: RepackedSparse24) -> torch.Tensor:
    """The dense W [N, K] of a repacked 2:4 weight (float values dequantized), in plain torch:
    the reference the kernel must equal."""
    k, n = packed.in_features, packed.out_features
    if isinstance(packed.values, RepackedLinear):
        values = dequantize_repacked(packed.values)
    else:
        values = packed.values.T
    words = packed.meta.T.to(torch.int64)
    nibbles = (words[..., None] >> (torch.arange(8, device=words.device) * 4)) & 15
    nibbles = nibbles.reshape(n, -1)[:, : k // 4]
    kept = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
    dense = values.new_zeros(n, k // 4, 4)
    dense.scatter_(-1, kept, values.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


# --- kernel ----------------------------------------------------------------------------------


@triton.jit
def _kept_values(
    v_ptr,
    s_ptr,
    z_ptr,
    rows,
    in_rows,
    offs_n,
    mask_n,
    N,
    group_rows,
    BITS: tl.constexpr,
    S: tl.constexpr,
):
    """Kept values at compressed rows `rows` [R] for columns offs_n, as float32 [R, BLOCK_N]:
    loaded (BITS == 0) or dequantized from repacked linear_wq elements (int16 [blocks, N, S],
    code c of element i of block b is row b * B + c * S + i)."""
    mask = in_rows[:, None] & mask_n[None, :]
    if BITS == 0:
        values = tl.load(v_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        values = values.to(tl.float32)
    else:
        BLOCK_ROWS: tl.constexpr = S * 16 // BITS
        element = (rows // BLOCK_ROWS * N)[:, None] * S + offs_n[None, :] * S + (rows % S)[:, None]
        elements = tl.load(v_ptr + element, mask=mask, other=0).to(tl.int32)
        codes = (elements >> (rows % BLOCK_ROWS // S * BITS)[:, None]) & ((1 << BITS) - 1)
        cell = (rows // group_rows)[:, None] * N + offs_n[None, :]
        scale = tl.load(s_ptr + cell, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + cell, mask=mask, other=0).to(tl.float32)
        values = (codes.to(tl.float32) - zero) * scale
    return values


@triton.jit
def _kept_tile(
    v_ptr,
    meta_ptr,
    s_ptr,
    z_ptr,
    t,
    offs_n,
    mask_n,
    N,
    K,
    group_rows,
    BITS: tl.constexpr,
    S: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """K-tile t's groups g [BLOCK_G], in range, and per column their kept values v0, v1 and
    the columns (0-3) they sit at, each [BLOCK_G, BLOCK_N]."""
    g = t * BLOCK_G + tl.arange(0, BLOCK_G)
    in_g = g < K // 4
    mask = in_g[:, None] & mask_n[None, :]
    word = tl.load(meta_ptr + (g // 8)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    nibble = (word >> ((g % 8) * 4)[:, None]) & 15
    v0 = _kept_values(v_ptr, s_ptr, z_ptr, 2 * g, in_g, offs_n, mask_n, N, group_rows, BITS, S)
    v1 = _kept_values(v_ptr, s_ptr, z_ptr, 2 * g + 1, in_g, offs_n, mask_n, N, group_rows, BITS,
                      S)  # fmt: skip
    return g, in_g, v0, v1, nibble & 3, nibble >> 2


@triton.jit
def _dense_tile(v0, v1, first_col, second_col, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """The kept values put back at their columns: the dense tile [4 * BLOCK_G, BLOCK_N]."""
    column = tl.arange(0, 4)[None, :, None]
    dense = tl.where(column == first_col[:, None, :], v0[:, None, :], 0.0)
    dense = tl.where(column == second_col[:, None, :], v1[:, None, :], dense)
    return tl.reshape(dense, [4 * BLOCK_G, BLOCK_N])


@triton.jit
def linear_sparse24_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_tiles,
    tiles_per_split,
    group_rows,
    stride_xm,
    BITS: tl.constexpr,
    S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Program (n, m, s) computes out[m-tile, n-tile] over the K-tiles (BLOCK_G groups of 4
    columns each) of split s. BLOCK_M == 1: each kept value meets x at its own column (two
    gathers per group, half the dense work); else the tile is expanded to [4 * BLOCK_G, BLOCK_N]
    for tl.dot. ATOMIC: add fp32 into a zeroed [M, N] (split K) instead of storing out."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    if BLOCK_M == 1:
        offs_m = pid_m + tl.arange(0, 1)
        lanes = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        for t in range(first, last):
            g, in_g, v0, v1, first_col, second_col = _kept_tile(
                v_ptr, meta_ptr, s_ptr, z_ptr, t, offs_n, mask_n, N, K, group_rows, BITS, S, BLOCK_G
            )
            mask = in_g[:, None] & mask_n[None, :]
            base = x_ptr + pid_m * stride_xm + 4 * g[:, None]
            x0 = tl.load(base + first_col, mask=mask, other=0.0).to(tl.float32)
            x1 = tl.load(base + second_col, mask=mask, other=0.0).to(tl.float32)
            lanes += v0 * x0 + v1 * x1
        acc = tl.sum(lanes, axis=0)[None, :]
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in range(first, last):
            g, in_g, v0, v1, first_col, second_col = _kept_tile(
                v_ptr, meta_ptr, s_ptr, z_ptr, t, offs_n, mask_n, N, K, group_rows, BITS, S, BLOCK_G
            )
            w = _dense_tile(v0, v1, first_col, second_col, BLOCK_G, BLOCK_N)
            kk = 4 * t * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
            ptrs = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
            xt = tl.load(ptrs, mask=(offs_m < M)[:, None] & (kk < K)[None, :], other=0.0)
            if DOT_F32:  # the CPU interpreter multiplies bf16 bit patterns (triton 3.9)
                acc = tl.dot(xt.to(tl.float32), w.to(xt.dtype).to(tl.float32), acc,
                             input_precision="ieee")  # fmt: skip
            else:
                acc = tl.dot(xt, w.to(xt.dtype), acc)
    cell = offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + cell, acc, mask=mask, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + cell, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sparse24_dense_kernel(
    v_ptr,
    meta_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    group_rows,
    BITS: tl.constexpr,
    S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Writes the dense weight transposed, Wᵀ [K, N] in out's dtype, tile (n, t) per program:
    for large batches, where a library GEMM on it beats expanding tiles per output tile."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = tl.program_id(1)
    g, in_g, v0, v1, first_col, second_col = _kept_tile(
        v_ptr, meta_ptr, s_ptr, z_ptr, t, offs_n, mask_n, N, K, group_rows, BITS, S, BLOCK_G
    )
    w = _dense_tile(v0, v1, first_col, second_col, BLOCK_G, BLOCK_N)
    kk = 4 * t * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
    mask = (kk < K)[:, None] & mask_n[None, :]
    tl.store(out_ptr + kk[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# --- choosing and launching ------------------------------------------------------------------


@dataclass(frozen=True)
class Sparse24Config:
    """One launch's shape. kernel "fused": `linear_sparse24_kernel`, block_k dense columns per
    K-tile (4 per group), split_k splits of K (0: from the multiprocessor count); "dense": the
    weight expanded once into a scratch Wᵀ, then torch.matmul (cuBLAS); "semi": torch's
    semi-structured 2:4 (cuSPARSELt or CUTLASS; float values on CUDA only)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    kernel: Literal["fused", "dense", "semi"] = "fused"


# M bucket (upper bound) -> configuration for (float values, quantized values). Measured on an
# H200 (benchmarks/lowbit_kernels.py): the fused kernel for decode batches; from M = 17 on the
# dense expansion + cuBLAS beats it; from M = 257 on torch's semi-structured 2:4 (cuSPARSELt)
# beats dense cuBLAS for float values.
SPARSE24_CONFIGS: list[tuple[int, tuple[Sparse24Config, Sparse24Config]]] = [
    (1, (Sparse24Config(1, 64, 128), Sparse24Config(1, 64, 128))),
    (16, (Sparse24Config(16, 128, 64), Sparse24Config(16, 128, 64))),
    (256, (Sparse24Config(1, 64, 64, kernel="dense"), Sparse24Config(1, 64, 64, kernel="dense"))),
    (
        1 << 62,
        (Sparse24Config(1, 64, 64, kernel="semi"), Sparse24Config(1, 64, 64, kernel="dense")),
    ),
]


def choose_sparse24_config(m: int, packed: RepackedSparse24) -> Sparse24Config:
    configs = next(c for bound, c in SPARSE24_CONFIGS if m <= bound)
    config = configs[packed.quantized]
    if config.kernel == "semi" and packed.values.device.type != "cuda":
        return Sparse24Config(1, 64, 64, kernel="dense")
    return config


def dense_transposed(packed: RepackedSparse24, dtype: torch.dtype, block_n: int = 64,
                     block_k: int = 64) -> torch.Tensor:  # fmt: skip
    """The dense weight transposed, Wᵀ [K, N] in `dtype`, written by `sparse24_dense_kernel`."""
    k, n = packed.in_features, packed.out_features
    weights, bits, group_rows, slot = _kernel_weights(packed)
    out = torch.empty(k, n, dtype=dtype, device=packed.meta.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    sparse24_dense_kernel[grid](
        *weights, out, n, k, group_rows, BITS=bits, S=slot, BLOCK_N=block_n, BLOCK_G=block_k // 4
    )
    return out


def _kernel_weights(packed: RepackedSparse24) -> tuple[tuple, int, int, int]:
    """(values, meta, scales, zeros) pointers, bits (0: float values), rows per group and the
    codes' slot width (linear_wq's S; 1 for float values)."""
    values = packed.values
    if isinstance(values, RepackedLinear):
        pointers = (values.qweight, packed.meta, values.scales, values.zeros)
        return pointers, values.bits, values.group, values.slot
    return (values, packed.meta, values, values), 0, 1, 1


def _semi_structured(packed: RepackedSparse24, dtype: torch.dtype) -> torch.Tensor:
    """torch's semi-structured form of the weight, built on first use and kept with it."""
    if packed.semi is None or packed.semi.dtype != dtype:
        from torch.sparse import to_sparse_semi_structured

        dense = dense_transposed(packed, dtype).T.contiguous()
        packed.semi = to_sparse_semi_structured(dense)
    return packed.semi


def linear_sparse24_triton(
    x: torch.Tensor,
    packed: RepackedSparse24,
    bias: torch.Tensor | None = None,
    config: Sparse24Config | None = None,
) -> torch.Tensor:
    """x [..., K] @ decompressed(packed)ᵀ + bias -> [..., N] in x's dtype (fp16 or bf16)."""
    k, n = packed.in_features, packed.out_features
    lead = x.shape[:-1]
    x2 = as_rows(x)
    m = x2.shape[0]
    config = config or choose_sparse24_config(m, packed)
    if config.kernel == "semi":
        return torch.nn.functional.linear(x2, _semi_structured(packed, x.dtype), bias).reshape(
            *lead, n
        )
    if config.kernel == "dense":
        wt = dense_transposed(packed, x.dtype, config.block_n, config.block_k)
        out = x2 @ wt if bias is None else torch.addmm(bias.to(x.dtype), x2, wt)
        return out.reshape(*lead, n)
    if config.block_k % 32:
        raise ValueError(f"block_k {config.block_k} is not a multiple of 32 columns")
    k_tiles = triton.cdiv(k, config.block_k)
    tiles = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    splits = config.split_k or max(1, min(k_tiles, -(-4 * _multiprocessors(x.device)
                                                      // (tiles[0] * tiles[1]))))  # fmt: skip
    per_split = -(-k_tiles // splits)
    splits = -(-k_tiles // per_split)
    weights, bits, group_rows, slot = _kernel_weights(packed)
    bias_arg = bias if bias is not None else packed.meta
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = out if splits == 1 else torch.zeros(m, n, dtype=torch.float32, device=x.device)
    linear_sparse24_kernel[(*tiles, splits)](
        x2, *weights, bias_arg, target, m, n, k, k_tiles, per_split, group_rows, x2.stride(0),
        BITS=bits, S=slot, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_G=config.block_k // 4, HAS_BIAS=bias is not None, DOT_F32=x.device.type != "cuda",
        ATOMIC=splits > 1,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if splits > 1:
        block = 1024
        sum_splits_kernel[(triton.cdiv(m * n, block),)](
            target, bias_arg, out, m * n, n, 1, HAS_BIAS=bias is not None, BLOCK=block
        )
    return out.reshape(*lead, n)
