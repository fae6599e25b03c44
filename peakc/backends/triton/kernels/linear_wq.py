"""W4A16 / W8A16 weight-only linear (`peakc::linear_wq`) in Triton: repack once, then one fused
kernel that feeds the tensor cores with weights converted in registers (split-K for
decode-sized batches), or dequantize + cuBLAS for large batches; chosen by M.

Repacked layout (`RepackedLinear`):
  qweight int16 [k_padded / B, N, S]: the weight in blocks of B = S * 16 / bits columns. Element
          (b, n, i) holds 16 / bits codes: code c (bits [c * bits, (c + 1) * bits)) is column
          b * B + c * S + i. Code c of a block's [N, S] tile is thus one run of S contiguous
          columns (one tl.dot with S columns of x), and every 16-bit element converts on its own,
          an elementwise op, so Triton keeps the tile in the tensor cores' register layout.
          S = 32 columns, or the group when that is smaller (16 at least for linear_wq; 2:4's
          kept values, read one by one, take smaller groups).
  scales  [rows, N] (the scales' dtype) and zeros uint8 [rows, N], row = column // group:
          W = (q - z) * s; per channel, one row and group = k_padded.
  perm    int32 [K] or None: act-order columns are sorted by group at pack time, so groups are
          contiguous runs of G columns; the kernels read x[perm[j]] for packed column j.
  K is padded with zero codes (and scale rows with zero scales) to whole blocks; x is masked
  beyond K, so the padding contributes nothing.

Conversion: a 4-bit field OR-ed under the exponent of 128 (bf16 0x4300; fp16 1024, 0x6400)
reads off + q exactly: one `lop3` for two weights (`tl.inline_asm_elementwise`, two 16-bit
elements per 32-bit register), and one shift more for each field above the lowest. An 8-bit
code is two such fields, the high one under 16x the exponent (2048 + 16 q), so both products go
into the same sum. The tensor cores multiply these with x (fp32 sums); per group the kernel
subtracts (off + z) times x's sum over the group's columns and applies the scale:
out = s * (Σ (off + q) x - (off + z) Σ x); or (`affine`, for large batches) it dequantizes in
registers before the dot, (off + q - (off + z)) * s. The Triton interpreter cannot run PTX:
there the same fields are cut out with plain shifts and masks. The artifact stores this layout
(the Triton backend repacks at compile time); `unpack_linear_wq` inverts it.
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
SLOT = 32  # columns per code slot of a block (the group, when that is smaller)
MIN_GROUP = 16  # the fused kernel's slots (one tl.dot each) hold at least 16 columns


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

    @property
    def slot(self) -> int:
        """Columns per code slot of a block (S)."""
        return self.qweight.shape[2]

    @property
    def block_columns(self) -> int:
        return self.slot * 16 // self.bits

    def nbytes(self) -> int:
        parts = [self.qweight, self.scales, self.zeros]
        if self.perm is not None:
            parts.append(self.perm)
        return sum(t.numel() * t.element_size() for t in parts)


def slot_columns(group: int) -> int:
    """S for a group of `group` columns: 32, or the group when it is smaller."""
    return min(SLOT, group)


def repack_linear_wq(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    name: str = "linear_wq",
    min_group: int = MIN_GROUP,
) -> RepackedLinear:
    """Repack peakc's linear_wq weights (ops.py layout) into the kernels' layout, on their device.
    Raises PeakcError, naming `name`, for a layout the kernels do not cover (groups smaller
    than `min_group`: the fused kernel's dots need slots of 16 columns; the 2:4 kernel, which
    gathers codes one by one, takes smaller ones)."""
    if bits not in BITS:
        raise PeakcError(f"{name}: {bits}-bit weights have no Triton kernel (bits 4 and 8 do)")
    out_features, n_groups = scales.shape
    k = in_features
    if n_groups > 1 and (group_size & (group_size - 1) or group_size < min_group):
        raise PeakcError(f"{name}: group size {group_size} is not a power of two >= {min_group}")
    slot = SLOT if n_groups == 1 else slot_columns(group_size)
    per_element = 16 // bits
    block = slot * per_element
    k_padded = -(-k // block) * block
    group = k_padded if n_groups == 1 else group_size
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
    codes = torch.nn.functional.pad(codes, (0, k_padded - k)).to(torch.int32)
    # [N, blocks, codes per element, S] -> [blocks, N, S, codes per element], fields OR-ed
    slots = codes.view(out_features, k_padded // block, per_element, slot).permute(1, 0, 3, 2)
    shifts = torch.arange(per_element, device=codes.device, dtype=torch.int32) * bits
    elements = (slots << shifts).sum(-1)
    elements = torch.where(elements >= 2**15, elements - 2**16, elements).to(torch.int16)
    rows = -(-k_padded // group)
    return RepackedLinear(
        qweight=elements.contiguous(),
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
    bits, per_element = packed.bits, 16 // packed.bits
    elements = packed.qweight.to(torch.int32) & 0xFFFF
    shifts = torch.arange(per_element, device=elements.device, dtype=torch.int32) * bits
    slots = (elements[..., None] >> shifts) & ((1 << bits) - 1)  # [blocks, N, S, codes]
    codes = slots.permute(1, 0, 3, 2).reshape(packed.out_features, packed.k_padded)
    codes = codes[:, : packed.in_features]
    g_idx = None
    if packed.perm is not None:
        inverse = torch.argsort(packed.perm.long())
        codes = codes[:, inverse]
        g_idx = (inverse // packed.group_size).to(torch.int32)
    scales = packed.scales[: packed.groups].T.contiguous()
    zeros = packed.zeros[: packed.groups].T.to(torch.int64)
    return pack_bits(codes, bits), scales, pack_bits(zeros, bits), g_idx


# --- kernels ---------------------------------------------------------------------------------


@triton.constexpr_function
def _field_asm(field, magic):
    """PTX for two 16-bit elements in one register: 4-bit field `field` of each, OR-ed under
    `magic` (`lop3` (a & b) | c), shifted down first unless it is the lowest."""
    halves = hex(magic * 0x10001)
    if field == 0:
        return f"lop3.b32 $0, $1, 0x000F000F, {halves}, 0xEA;"
    return (
        f"{{.reg .b32 t; shr.u32 t, $1, {4 * field}; lop3.b32 $0, t, 0x000F000F, {halves}, 0xEA;}}"
    )


@triton.jit
def _field_float(e, like, FIELD: tl.constexpr, MAGIC: tl.constexpr, INTERPRETED: tl.constexpr):
    """4-bit field FIELD of each int16 in e, OR-ed under MAGIC: magic + q (or 16 q), exactly, as
    like's dtype: one PTX op per two elements on CUDA, plain shifts in the interpreter."""
    if INTERPRETED:
        bits = ((e >> (4 * FIELD)) & 15) | MAGIC
        return bits.to(tl.int16).to(like.dtype, bitcast=True)
    return tl.inline_asm_elementwise(
        _field_asm(FIELD, MAGIC), "=r,r", [e], dtype=like.dtype, is_pure=True, pack=2
    )


@triton.jit
def _affine(w, offset, scale, high, HIGH_OFFSET: tl.constexpr, INTERPRETED: tl.constexpr):
    """((w - offset) [+ (high - HIGH_OFFSET)]) * scale in w's dtype, offset and scale [R] per
    row (fp32); high (an 8-bit code's high field, or None) makes the code exactly before the one
    rounding by the scale. The interpreter computes 16-bit floats on their bit patterns (triton
    3.9), so there it goes through fp32."""
    if INTERPRETED:
        q = w.to(tl.float32) - offset[:, None]
        if high is not None:
            q += high.to(tl.float32) - HIGH_OFFSET
        return (q * scale[:, None]).to(w.dtype)
    q = w - offset.to(w.dtype)[:, None]
    if high is not None:
        q += high - HIGH_OFFSET
    return q * scale.to(w.dtype)[:, None]


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a @ b (fp32 sums)."""
    if INTERPRETED:  # the interpreter multiplies bf16 bit patterns (triton 3.9)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _x_columns(x_ptr, perm_ptr, cols, offs_m, mask_m, stride_xm, K,
               HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr, ROWS_FIRST: tl.constexpr):  # fmt: skip
    """x at packed columns `cols` for rows offs_m: [cols, rows] for tl.dot, or [rows, cols]
    (ROWS_FIRST) for row sums; zero beyond K."""
    in_k = cols < K
    if HAS_PERM:
        cols = tl.load(perm_ptr + cols, mask=in_k, other=0)
    if ROWS_FIRST:
        ptrs = x_ptr + offs_m[:, None] * stride_xm + cols[None, :]
        mask = mask_m[:, None] if EVEN_K else mask_m[:, None] & in_k[None, :]
    else:
        ptrs = x_ptr + offs_m[None, :] * stride_xm + cols[:, None]
        mask = mask_m[None, :] if EVEN_K else mask_m[None, :] & in_k[:, None]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _block_terms(s_ptr, z_ptr, x_ptr, perm_ptr, b, offs_n, mask_n, offs_m, mask_m, N, K, group,
                 stride_xm, BLOCK_COLS: tl.constexpr, GROUPS: tl.constexpr,
                 HAS_PERM: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                 X_SUMS: tl.constexpr):  # fmt: skip
    """Block b's per-group terms: scales and zero points [BLOCK_N, GROUPS] (fp32) and, if
    X_SUMS, x's sums over each group's columns [BLOCK_M, GROUPS]."""
    columns: tl.constexpr = BLOCK_COLS // GROUPS
    rows = (b * BLOCK_COLS + tl.arange(0, GROUPS) * columns) // group
    cell = rows[None, :] * N + offs_n[:, None]
    if EVEN_N:
        scale = tl.load(s_ptr + cell).to(tl.float32)
        zero = tl.load(z_ptr + cell).to(tl.float32)
    else:
        scale = tl.load(s_ptr + cell, mask=mask_n[:, None], other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + cell, mask=mask_n[:, None], other=0).to(tl.float32)
    if X_SUMS:
        cols = b * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        xr = _x_columns(x_ptr, perm_ptr, cols, offs_m, mask_m, stride_xm, K, HAS_PERM, EVEN_K,
                        True).to(tl.float32)  # fmt: skip
        x_sums = tl.sum(tl.reshape(xr, [xr.shape[0], GROUPS, columns]), axis=2)
    else:
        x_sums = tl.zeros([offs_m.shape[0], GROUPS], dtype=tl.float32)
    return scale, zero, x_sums


@triton.jit
def _group_column(t, g: tl.constexpr):
    """Column g of t [R, GROUPS] as [R]."""
    return tl.sum(tl.where(tl.arange(0, t.shape[1])[None, :] == g, t, 0.0), axis=1)


@triton.jit
def linear_wq_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    blocks,
    per_split,
    splits,
    group,
    stride_xm,
    BITS: tl.constexpr,
    S: tl.constexpr,
    GROUP_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    X_BF16: tl.constexpr,
    AFFINE: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
    REDUCTION: tl.constexpr,
):
    """Program (n, m, s) computes out[m-tile, n-tile] over the blocks of split s: per block one
    tl.dot per code field, weights [BLOCK_N, S] converted in registers times x [S, BLOCK_M].
    AFFINE: the weights are dequantized in registers ((off + q) - (off + z)) * s before the dot
    (cheaper per output for large BLOCK_M); else per group the sums are corrected afterwards
    (module docstring). GROUP_SLOTS: code slots per group (16 / BITS when a group holds whole
    blocks). Each block's scales, zero points and x sums are loaded one block ahead: the
    compiler pipelines only the dot operands' loads, and these loads' latency showed in the
    first measurements (two blocks ahead, carried through the loop, stops the compiler from
    pipelining the weights' loads at all: triton 3.6). INTERPRETED: the Triton interpreter (no
    PTX; 16-bit float math in fp32). REDUCTION 0: store out (+ bias);
    1: store fp32 partials [split, M, N]; 2: atomic add into a zeroed fp32 [M, N];
    3: store partials, and the last split of a tile to arrive (count_ptr, zeroed, left zeroed)
    sums them into out."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    PER_ELEMENT: tl.constexpr = 16 // BITS
    BLOCK_COLS: tl.constexpr = PER_ELEMENT * S
    GROUPS: tl.constexpr = PER_ELEMENT // GROUP_SLOTS
    MAGIC_LO: tl.constexpr = 0x4300 if X_BF16 else 0x6400  # 128 + q (fp16: 1024 + q)
    MAGIC_HI: tl.constexpr = 0x4500 if X_BF16 else 0x7400  # 2048 + 16 q (fp16: 16384 + 16 q)
    BASE: tl.constexpr = 128.0 if X_BF16 else 1024.0
    OFFSET: tl.constexpr = BASE if BITS == 4 else 17.0 * BASE
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_i = tl.arange(0, S)
    first = pid_s * per_split
    last = tl.minimum(first + per_split, blocks)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    scale, zero, x_sums = _block_terms(
        s_ptr, z_ptr, x_ptr, perm_ptr, first, offs_n, mask_n, offs_m, mask_m, N, K, group,
        stride_xm, BLOCK_COLS, GROUPS, HAS_PERM, EVEN_N, EVEN_K, not AFFINE,
    )  # fmt: skip
    for b in range(first, last):
        next_terms = _block_terms(
            s_ptr, z_ptr, x_ptr, perm_ptr, tl.minimum(b + 1, last - 1), offs_n, mask_n, offs_m,
            mask_m, N, K, group, stride_xm, BLOCK_COLS, GROUPS, HAS_PERM, EVEN_N, EVEN_K,
            not AFFINE,
        )  # fmt: skip
        tile = qw_ptr + b * N * S + offs_n[:, None] * S + offs_i[None, :]
        if EVEN_N:
            e = tl.load(tile)
        else:
            e = tl.load(tile, mask=mask_n[:, None], other=0)
        for g in tl.static_range(GROUPS):
            group_scale = _group_column(scale, g)
            group_zero = _group_column(zero, g)
            d = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for j in tl.static_range(GROUP_SLOTS):  # code slot g * GROUP_SLOTS + j
                cols = b * BLOCK_COLS + (g * GROUP_SLOTS + j) * S + offs_i
                xc = _x_columns(x_ptr, perm_ptr, cols, offs_m, mask_m, stride_xm, K,
                                HAS_PERM, EVEN_K, False)  # fmt: skip
                if BITS == 4:
                    w = _field_float(e, xc, g * GROUP_SLOTS + j, MAGIC_LO, INTERPRETED)
                    if AFFINE:
                        w = _affine(w, group_zero + BASE, group_scale, None, 0.0, INTERPRETED)
                    d = _dot(w, xc, d, INTERPRETED)
                else:  # the code's low field (off + lo), then its high field (16 off + 16 hi)
                    w = _field_float(e, xc, 2 * (g * GROUP_SLOTS + j), MAGIC_LO, INTERPRETED)
                    high = _field_float(e, xc, 2 * (g * GROUP_SLOTS + j) + 1, MAGIC_HI,
                                        INTERPRETED)  # fmt: skip
                    if AFFINE:  # (lo - z) + 16 hi = q - z exactly, then one rounding by s
                        w = _affine(w, group_zero + BASE, group_scale, high, 16.0 * BASE,
                                    INTERPRETED)  # fmt: skip
                        d = _dot(w, xc, d, INTERPRETED)
                    else:
                        d = _dot(high, xc, _dot(w, xc, d, INTERPRETED), INTERPRETED)
            if AFFINE:
                acc += d
            else:
                x_sum = _group_column(x_sums, g)
                acc += group_scale[:, None] * (d - (group_zero + OFFSET)[:, None] * x_sum[None, :])
        scale, zero, x_sums = next_terms
    cell = offs_m[None, :] * N + offs_n[:, None]
    mask = mask_n[:, None] & mask_m[None, :]
    if REDUCTION == 0:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + cell, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif REDUCTION == 2:
        tl.atomic_add(part_ptr + cell, acc, mask=mask, sem="relaxed")
    else:
        tl.store(part_ptr + pid_s * M * N + cell, acc, mask=mask)
        if REDUCTION == 3:
            tl.debug_barrier()  # every thread's partials written before the release below
            counter = count_ptr + pid_m * tl.num_programs(0) + pid_n
            if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
                total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for split in range(0, splits):
                    total += tl.load(part_ptr + split * M * N + cell, mask=mask, other=0.0,
                                     cache_modifier=".cg")  # fmt: skip
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
                    total += bias.to(tl.float32)[:, None]
                tl.store(out_ptr + cell, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(counter, 0, sem="relaxed")


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
def dequantize_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    group,
    BITS: tl.constexpr,
    S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Writes the float weight in packed column order, W [N, K] in out's dtype, tile (n, block)
    per program: for large batches, where a library GEMM on it beats the fused kernel."""
    PER_ELEMENT: tl.constexpr = 16 // BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    b = tl.program_id(1)
    offs_i = tl.arange(0, S)
    e = tl.load(qw_ptr + b * N * S + offs_n[:, None] * S + offs_i[None, :], mask=mask_n[:, None],
                other=0).to(tl.int32)  # fmt: skip
    for c in tl.static_range(PER_ELEMENT):
        cols = b * PER_ELEMENT * S + c * S + offs_i
        q = ((e >> (c * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        cell = (cols // group)[None, :] * N + offs_n[:, None]
        scale = tl.load(s_ptr + cell, mask=mask_n[:, None], other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + cell, mask=mask_n[:, None], other=0).to(tl.float32)
        mask = mask_n[:, None] & (cols < K)[None, :]
        ptrs = out_ptr + offs_n[:, None] * K + cols[None, :]
        tl.store(ptrs, ((q - zero) * scale).to(out_ptr.dtype.element_ty), mask=mask)


# --- choosing and launching ------------------------------------------------------------------

REDUCTIONS = {"partials": 1, "atomic": 2, "serial": 3}


@dataclass(frozen=True)
class KernelConfig:
    """One launch's shape. kernel "fused": `linear_wq_kernel` with out tiles [block_n, block_m],
    K split into split_k parts (0: enough programs for `waves` per multiprocessor), the parts
    summed as `reduction` says (REDUCTIONS); "dequant": the weight dequantized into a scratch W
    (tiles of block_n rows), then cuBLAS."""

    kernel: Literal["fused", "dequant"]
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    waves: float = 4.0
    reduction: Literal["partials", "atomic", "serial"] = "serial"
    affine: bool = False  # dequantize in registers before the dot (large block_m)


# M bucket (upper bound) -> configuration per bits; the first bucket that holds M wins.
# Measured on an H200 (benchmarks/lowbit_kernels.py --sweep-out): from M = 128 on, dequantize +
# cuBLAS beats every fused configuration tried.
CONFIGS: list[tuple[int, dict[int, KernelConfig]]] = [
    (8, {4: KernelConfig("fused", 8, 128), 8: KernelConfig("fused", 8, 256)}),
    (16, {4: KernelConfig("fused", 16, 128), 8: KernelConfig("fused", 16, 128)}),
    (64, {4: KernelConfig("fused", 64, 128, waves=2.0), 8: KernelConfig("fused", 64, 128)}),
    (1 << 62, {4: KernelConfig("dequant", 1, 64), 8: KernelConfig("dequant", 1, 64)}),
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


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """`count` zeroed int32 counters for the serial reduction. The kernel leaves them zeroed, so
    one buffer per device serves every launch (no memset per call; launches on one device are
    assumed to run in stream order, as the backends issue them). None is made while a CUDA
    graph is captured (its zeroing would run only at replay): then, if the device has no buffer
    large enough yet, the call gets a fresh one and the graph its memset."""
    buffer = _COUNTERS.get(device)
    if buffer is not None and buffer.numel() >= count:
        return buffer
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, dtype=torch.int32, device=device)
    buffer = torch.zeros(max(count, 1 << 14), dtype=torch.int32, device=device)
    _COUNTERS[device] = buffer
    return buffer


def split_count(programs: int, blocks: int, config: KernelConfig, device: torch.device) -> int:
    """How many parts K is split into: config.split_k, or enough for config.waves programs per
    multiprocessor (whole blocks per part, no empty part)."""
    want = config.split_k or round(config.waves * _multiprocessors(device) / programs)
    per_split = -(-blocks // max(1, min(blocks, want)))
    return -(-blocks // per_split)


def dequantize_weight_rows(packed: RepackedLinear, dtype: torch.dtype, block_n: int = 64):
    """The float weight in packed column order, W [N, K] in `dtype`."""
    k, n = packed.in_features, packed.out_features
    out = torch.empty(n, k, dtype=dtype, device=packed.qweight.device)
    grid = (triton.cdiv(n, block_n), packed.k_padded // packed.block_columns)
    dequantize_kernel[grid](
        packed.qweight, packed.scales, packed.zeros, out, n, k, packed.group,
        BITS=packed.bits, S=packed.slot, BLOCK_N=block_n,
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
    if config.kernel == "dequant":
        w = dequantize_weight_rows(packed, x.dtype, config.block_n)
        xp = x2 if packed.perm is None else x2.index_select(1, packed.perm)
        return torch.nn.functional.linear(xp, w, bias).reshape(*lead, n)
    blocks = packed.k_padded // packed.block_columns
    tiles = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    splits = split_count(tiles[0] * tiles[1], blocks, config, x.device)
    per_split = -(-blocks // splits)
    reduction = 0 if splits == 1 else REDUCTIONS[config.reduction]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if reduction == 2:
        part = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    elif reduction:
        part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    else:
        part = out
    count = arrival_counters(x.device, tiles[0] * tiles[1]) if reduction == 3 else out
    group_slots = min(16 // packed.bits, max(1, packed.group // packed.slot))
    perm = packed.perm if packed.perm is not None else packed.qweight
    bias_arg = bias if bias is not None else out
    linear_wq_kernel[(*tiles, splits)](
        x2, packed.qweight, packed.scales, packed.zeros, perm, bias_arg, out, part, count,
        m, n, k, blocks, per_split, splits, packed.group, x2.stride(0),
        BITS=packed.bits, S=packed.slot, GROUP_SLOTS=group_slots, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, X_BF16=x.dtype == torch.bfloat16, AFFINE=config.affine,
        HAS_PERM=packed.perm is not None,
        HAS_BIAS=bias is not None, EVEN_N=n % config.block_n == 0, EVEN_K=k == packed.k_padded,
        INTERPRETED=x.device.type != "cuda", REDUCTION=reduction,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if reduction in (1, 2):
        block = 1024
        sum_splits_kernel[(triton.cdiv(m * n, block),)](
            part, bias_arg, out, m * n, n, splits if reduction == 1 else 1,
            HAS_BIAS=bias is not None, BLOCK=block,
        )  # fmt: skip
    return out.reshape(*lead, n)


def dequantize_repacked(packed: RepackedLinear) -> torch.Tensor:
    """The float weight [N, K] (scales' dtype, original column order), for checks."""
    from peakc.ir.ops import dequantize_weight

    qweight, scales, qzeros, g_idx = unpack_linear_wq(packed)
    return dequantize_weight(
        qweight, scales, qzeros, g_idx, packed.bits, packed.group_size, packed.in_features
    )
