"""`peakc::linear_compressed` in Triton: the weight stays compressed on the GPU.

Two kernels read it:

- the sliced-ELL kernel (`linear_compressed_ell_triton`, what the op runs on the GPU): the
  dictionary code is transcoded once, at lowering (the Triton backend stores the result as the
  layer's weights) or on first use (eager programs on CUDA), into fixed-width blocks of
  non-zeros. Each entry holds one non-zero's column and level, so a program needs no prefix
  sum and no table: it loads a tile of entries (16-byte vectors: one entry of 8 rows), gathers
  the x value each one lands on, and multiplies; zeros cost nothing. For M > 1 x is
  transposed so one gather brings a column of all `block_m` rows. Layout below.
- the fused dictionary decoder (`linear_compressed_triton`): decodes the stored code
  directly (one program per output row: code table lookups and a prefix sum of word lengths
  per segment). Kept for callers that pass the stream itself; slower, bound by its table walk.

Sliced ELL (`EllWeight`): rows in slices of ELL_ROWS = 8, columns in parts of `part` columns
(at most MAX_PART, so a column fits in 14 bits). Slice s, part p is a block [width, 8] of
int16 entries in `entries`, row-major: entry (j, g) is the j-th non-zero (in column order) of
row 8s + g within part p, as (column in part << 2) | level code (1: +1, 2: -2, 3: -1), and 0
past that row's last non-zero (width is the most non-zeros of the slice's rows in the part).
`blocks` int32 [S * P + 1]: block (s, p) starts at entry 8 * blocks[s * P + p]; the values
are absolute, so a view of `blocks` reads a range of slices. At 90 % zeros this is ~1.7 bits
per parameter (the code itself: ~0.64; bf16: 16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from peakc.backends.triton.kernels.operands import as_rows
from peakc.errors import PeakcError
from peakc.ir.dictionary_code import MAX_NONZEROS, decode, segments_per_row

TABLE_WIDTH = 1 + MAX_NONZEROS  # 8: a power of two, so a table row is one tile axis
MAX_TILE_WORDS = 1024  # segments holding more words than this are left to the reference
# Config dicts the dictionary decoder's launcher accepts: `tile` bounds the elements a program
# decodes at once (segments per step = tile // (8 * words per segment)), `block_m` the rows of
# x it applies them to. The first is the decode GEMV default.
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


# --- sliced ELL: the layout the fast kernel reads (module docstring) --------------------------

ELL_ROWS = 8  # rows per slice: one 16-byte vector of int16 entries
MAX_PART = 1 << 14  # columns per part: a column in its part fits an entry's 14 bits
MAX_BLOCK_M = 32  # rows of x one program multiplies (more rows: more programs)
_LEVEL_OF_CODE = (0, 1, -2, -1)
# Config dicts `linear_compressed_ell_triton` accepts: `block_j` entries per slice row in one
# tile, `block_m` rows of x per program (None: fitted to M, at most MAX_BLOCK_M), `prefetch`
# loads the next tile's entries before the current tile's gathers.
ELL_CONFIGS = [
    {"block_j": 128, "block_m": 1, "num_warps": 4, "prefetch": True},
    {"block_j": 256, "block_m": 1, "num_warps": 8, "prefetch": True},
    {"block_j": 128, "block_m": 1, "num_warps": 4, "prefetch": False},
    {"block_j": 32, "block_m": None, "num_warps": 4, "prefetch": True},
    {"block_j": 16, "block_m": None, "num_warps": 4, "prefetch": True},
    {"block_j": 32, "block_m": None, "num_warps": 8, "prefetch": False},
]


@dataclass
class EllWeight:
    """A weight in the sliced-ELL layout (module docstring), from `ell_from_levels` or
    `transcode`."""

    entries: torch.Tensor  # int16 [ELL_ROWS * blocks[-1]]
    blocks: torch.Tensor  # int32 [slices * parts + 1]
    rows: int
    cols: int
    part: int

    def nbytes(self) -> int:
        """Bytes the kernel reads besides x and the scales (entries and block offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.entries, self.blocks))


def ell_from_levels(levels: torch.Tensor, part: int | None = None) -> EllWeight:
    """The sliced-ELL layout of integer levels [rows, cols] in {-2, -1, 0, 1}, built on their
    device; `part` columns per part (default: all columns, up to MAX_PART)."""
    rows, cols = levels.shape
    part = part or min(cols, MAX_PART)
    if not 0 < part <= MAX_PART:
        raise PeakcError(f"linear_compressed: part of {part} columns (1 to {MAX_PART} allowed)")
    if levels.numel() and (int(levels.min()) < -2 or int(levels.max()) > 1):
        raise PeakcError("linear_compressed: levels outside -2..1 have no 2-bit code")
    n_parts, n_slices = -(-cols // part), -(-rows // ELL_ROWS)
    padded = torch.nn.functional.pad(
        levels.to(torch.int8), (0, n_parts * part - cols, 0, n_slices * ELL_ROWS - rows)
    )
    blocked = padded.view(n_slices, ELL_ROWS, n_parts, part)
    nonzero = blocked != 0
    width = nonzero.sum(-1, dtype=torch.int64).amax(1)  # [slices, parts]
    blocks = torch.zeros(n_slices * n_parts + 1, dtype=torch.int64, device=levels.device)
    blocks[1:] = torch.cumsum(width.flatten(), 0)
    rank = torch.cumsum(nonzero, -1, dtype=torch.int32) - 1  # a non-zero's place in its row
    s, g, p, c = nonzero.nonzero(as_tuple=True)
    at = (blocks[s * n_parts + p] + rank[s, g, p, c]) * ELL_ROWS + g
    entries = torch.zeros(int(blocks[-1]) * ELL_ROWS, dtype=torch.int64, device=levels.device)
    entries[at] = (c << 2) | (blocked[s, g, p, c].to(torch.int64) & 3)
    entries = torch.where(entries >= 1 << 15, entries - (1 << 16), entries).to(torch.int16)
    return EllWeight(entries, blocks.to(torch.int32), rows, cols, part)


def ell_levels(
    entries: torch.Tensor, blocks: torch.Tensor, rows: int, cols: int, part: int
) -> torch.Tensor:
    """The int8 levels [rows, cols] a sliced-ELL weight holds (the inverse of
    `ell_from_levels`; `blocks` may be a view of a range of slices)."""
    n_parts = -(-cols // part)
    start = blocks.to(torch.int64) * ELL_ROWS
    counts = start[1:] - start[:-1]
    block = torch.repeat_interleave(torch.arange(counts.numel(), device=blocks.device), counts)
    at = torch.arange(int(start[0]), int(start[-1]), device=blocks.device)
    code = entries[at].to(torch.int64) & 0xFFFF
    g = (at - start[block]) % ELL_ROWS
    row = (block // n_parts) * ELL_ROWS + g
    col = (block % n_parts) * part + (code >> 2)
    keep = (code & 3 != 0) & (row < rows) & (col < cols)
    out = torch.zeros(rows, cols, dtype=torch.int8, device=entries.device)
    level = torch.tensor(_LEVEL_OF_CODE, dtype=torch.int8, device=entries.device)[code & 3]
    out[row[keep], col[keep]] = level[keep]
    return out


def transcode(
    words: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    checksum: torch.Tensor,
    rows: int,
    cols: int,
    segment: int,
    max_words: int,
    part: int | None = None,
) -> EllWeight:
    """A dictionary-coded weight (peakc/ir/dictionary_code.py) in the sliced-ELL layout, on the
    stream's device. The stream is decoded with its checks: damaged bytes are a PeakcError."""
    levels = decode(words, offsets, table, checksum, rows, cols, segment, max_words)
    return ell_from_levels(levels, part)


@triton.jit
def _ell_tile(base, t, width, BJ: tl.constexpr, G: tl.constexpr):
    """Tile t of a block: its entries [BJ, G] as int32 (0 past the block's width)."""
    j = t * BJ + tl.arange(0, BJ)
    ptrs = base + j[:, None] * G + tl.arange(0, G)[None, :]
    return tl.load(ptrs, mask=(j < width)[:, None], other=0).to(tl.int32) & 0xFFFF


@triton.jit
def _ell_level(e):
    """An entry's level as float32 without an int-to-float: (code ^ 2) in the low mantissa
    bits of 2^23 reads 2^23 + level + 2 (code 1, 2, 3 -> +1, -2, -1; 0, padding, -> 0)."""
    return (((e & 3) ^ 2) | 0x4B000000).to(tl.float32, bitcast=True) - 8388610.0


@triton.jit
def _ell_slice_products(
    entries_ptr, blocks_ptr, block0, n_parts, part, K, x_base,
    G: tl.constexpr, BJ: tl.constexpr, BM: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """One slice's non-zeros times the x values they point at, over every part of K (blocks
    block0 .. block0 + n_parts): [BJ, G] (BM == 1, x a row) or [BJ, G, BM] (x an xᵀ block),
    summed over BJ by the caller."""
    if BM == 1:
        acc = tl.zeros([BJ, G], dtype=tl.float32)
    else:
        acc = tl.zeros([BJ, G, BM], dtype=tl.float32)
    for p in range(n_parts):
        b0 = tl.load(blocks_ptr + block0 + p)
        width = tl.load(blocks_ptr + block0 + p + 1) - b0
        base = entries_ptr + tl.multiple_of(b0 * G, G)
        tiles = tl.cdiv(width, BJ)
        if PREFETCH:
            upcoming = _ell_tile(base, 0, width, BJ, G)
        for t in range(tiles):
            if PREFETCH:
                e = upcoming
                upcoming = _ell_tile(base, t + 1, width, BJ, G)
            else:
                e = _ell_tile(base, t, width, BJ, G)
            col = tl.minimum(p * part + (e >> 2), K - 1)  # damaged entries stay inside x
            level = _ell_level(e)
            if BM == 1:
                xv = tl.load(x_base + col)
                acc += xv.to(tl.float32) * level
            else:
                xv = tl.load(x_base + col[:, :, None] * BM + tl.arange(0, BM)[None, None, :])
                acc += xv.to(tl.float32) * level[:, :, None]
    return acc


@triton.jit
def _linear_ell_kernel(
    x_ptr,
    entries_ptr,
    blocks_ptr,
    scales_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    n_parts,
    part,
    x_block_stride,
    stride_ym,
    G: tl.constexpr,
    BJ: tl.constexpr,
    BM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One program: one slice of G rows, for BM rows of x (BM == 1: a row of x; else a block
    [K, BM] of xᵀ, so one gather reads a column of all BM rows)."""
    slice_id = tl.program_id(0)
    m_block = tl.program_id(1)
    rows = slice_id * G + tl.arange(0, G)
    ms = m_block * BM + tl.arange(0, BM)
    x_base = x_ptr + m_block * x_block_stride
    acc = _ell_slice_products(
        entries_ptr, blocks_ptr, slice_id * n_parts, n_parts, part, K, x_base, G, BJ, BM, PREFETCH
    )
    row_ok = rows < N
    scale = tl.load(scales_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if BM == 1:
        out = tl.sum(acc, axis=0) * scale
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m_block * stride_ym + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)
    else:
        out = tl.sum(acc, axis=0) * scale[:, None]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(
            y_ptr + ms[None, :] * stride_ym + rows[:, None],
            out.to(y_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (ms < M)[None, :],
        )


def choose_ell_config(m: int, rows: int) -> dict:
    """The default config for M rows of x and a weight of `rows` rows (measured on an H200,
    Mixtral expert shapes: benchmarks/qmoe.py): at M = 1 few slices want more warps each."""
    if m == 1:
        return ELL_CONFIGS[0] if -(-rows // ELL_ROWS) >= 1024 else ELL_CONFIGS[1]
    return ELL_CONFIGS[3] if m <= 16 else ELL_CONFIGS[4]


def linear_compressed_ell_triton(
    x: torch.Tensor,
    entries: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    part: int,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] @ Wᵀ (+ bias) for W [N, K] = levels * scales[:, None] held in the sliced-ELL
    layout; `config` one of ELL_CONFIGS (None: `choose_ell_config`)."""
    rows, k = scales.shape[0], in_features
    x2 = as_rows(x)
    m = x2.shape[0]
    y = torch.empty(m, rows, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], rows)
    config = config or choose_ell_config(m, rows)
    bm = config["block_m"] or min(triton.next_power_of_2(m), MAX_BLOCK_M)
    m_blocks = triton.cdiv(m, bm)
    if bm == 1:
        xs, x_block_stride = x2, x2.stride(0)
    else:  # xᵀ in blocks [m_blocks, K, bm]: a gather reads bm rows' values in one vector
        padded = torch.nn.functional.pad(x2, (0, 0, 0, m_blocks * bm - m))
        xs = padded.view(m_blocks, bm, k).transpose(1, 2).contiguous()
        x_block_stride = k * bm
    _linear_ell_kernel[(triton.cdiv(rows, ELL_ROWS), m_blocks)](
        xs,
        entries,
        blocks,
        scales,
        bias if bias is not None else scales,
        y,
        m,
        rows,
        k,
        -(-k // part),
        part,
        x_block_stride,
        y.stride(0),
        G=ELL_ROWS,
        BJ=config["block_j"],
        BM=bm,
        HAS_BIAS=bias is not None,
        PREFETCH=config["prefetch"],
        num_warps=config["num_warps"],
    )
    return y.reshape(*x.shape[:-1], rows)


linear_compressed_ell_triton.kernels = (_linear_ell_kernel,)
linear_compressed_ell_triton.configs = ELL_CONFIGS
