"""`peakc::grouped_mm_compressed` on the sliced-ELL kernel: the routed experts of one MoE layer,
their weights kept compressed on the GPU, in one kernel launch per layer.

Expert e's weight is rows e*N..(e+1)*N of one coded matrix. `transcode_experts` decodes the
stacked stream (checked) and lays each expert out in sliced ELL (linear_compressed.py) on its
own whole slices of ELL_ROWS rows (an N that is not a multiple of 8 is padded per expert), one
after the other: expert e, slice s, part p is block (e * slices + s) * parts + p.

`grouped_mm_ell_triton` launches one program grid over (slice of an expert, expert). The
group offsets stay on the device (no sync): each program reads its expert's token rows from
them and loops over them in blocks of `block_m` (at decode, usually one block of one token);
an expert without tokens reads none of its weight. For block_m > 1, x is laid out beforehand
(on the device) as xᵀ blocks [K, block_m] per expert, so one gather reads a column of every
token in the block, as linear_compressed's kernel does.

- Triton backend: a rewrite lowering (compressed_linear.py) stores the transcoded layout as
  the layer's weights and turns the node into the backend op `grouped_mm_compressed_ell`,
  whose emit lowering is this launcher.
- Eager programs on CUDA (`register_cuda_kernel()`, called by peakc.use_cuda_kernels): the
  stream is transcoded once, on first use (cached per stream tensor), then the same launcher.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from peakc.backends.triton.kernels import linear_compressed as lc
from peakc.backends.triton.kernels.linear_compressed import (
    _ell_slice_products,
)
from peakc.backends.triton.kernels.operands import as_rows
from peakc.ir.dictionary_code import decode
from peakc.ir.ops import GROUPED_MM_COMPRESSED

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernel multiplies


def transcode_experts(
    words: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    checksum: torch.Tensor,
    experts: int,
    rows: int,
    cols: int,
    segment: int,
    max_words: int,
) -> lc.EllWeight:
    """The stacked dictionary-coded experts (`rows` = all experts' rows) in the grouped
    sliced-ELL layout (module docstring), on the stream's device; decoded with its checks
    (damaged bytes are a PeakcError). Its `rows` counts the padded rows it holds."""
    levels = decode(words, offsets, table, checksum, rows, cols, segment, max_words)
    per_expert = rows // experts
    entries, blocks, start = [], [], 0
    for e in range(experts):  # one expert at a time: the transcode's scratch stays small
        ell = lc.ell_from_levels(levels[e * per_expert : (e + 1) * per_expert])
        entries.append(ell.entries)
        blocks.append(ell.blocks[:-1] + start)
        start += int(ell.blocks[-1])
    blocks.append(torch.tensor([start], dtype=torch.int32, device=levels.device))
    padded = -(-per_expert // lc.ELL_ROWS) * lc.ELL_ROWS
    return lc.EllWeight(
        torch.cat(entries), torch.cat(blocks), experts * padded, cols, min(cols, lc.MAX_PART)
    )


def grouped_ell_levels(
    entries: torch.Tensor, blocks: torch.Tensor, experts: int, rows: int, cols: int, part: int
) -> torch.Tensor:
    """The int8 levels [experts * rows, cols] of a grouped sliced-ELL weight (the inverse of
    `transcode_experts`'s layout; `rows` per expert)."""
    padded = -(-rows // lc.ELL_ROWS) * lc.ELL_ROWS
    levels = lc.ell_levels(entries, blocks, experts * padded, cols, part)
    return levels.view(experts, padded, cols)[:, :rows].reshape(experts * rows, cols)


@triton.jit
def _grouped_ell_kernel(
    x_ptr,
    entries_ptr,
    blocks_ptr,
    scales_ptr,
    y_ptr,
    first_ptr,
    count_ptr,
    base_ptr,
    N,
    K,
    n_parts,
    part,
    slices,
    x_block_stride,
    stride_ym,
    G: tl.constexpr,
    BJ: tl.constexpr,
    BM: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One program: slice s of expert e (G rows), for every token routed to e, BM at a time.
    Expert e's tokens are rows first[e]..first[e] + count[e] of y; its blocks of x start at
    block base[e] (BM == 1: rows of x; else xᵀ blocks [K, BM])."""
    slice_id = tl.program_id(0)
    expert = tl.program_id(1)
    rows = slice_id * G + tl.arange(0, G)
    row_ok = rows < N
    scale = tl.load(scales_ptr + expert * N + rows, mask=row_ok, other=0.0).to(tl.float32)
    first = tl.load(first_ptr + expert)
    count = tl.load(count_ptr + expert)
    base = tl.load(base_ptr + expert)
    block0 = (expert * slices + slice_id) * n_parts
    for m_block in range(tl.cdiv(count, BM)):
        x_base = x_ptr + (base + m_block) * x_block_stride
        acc = _ell_slice_products(
            entries_ptr, blocks_ptr, block0, n_parts, part, K, x_base, G, BJ, BM, PREFETCH
        )
        if BM == 1:
            out = tl.sum(acc, axis=0) * scale
            y_at = y_ptr + (first + m_block) * stride_ym + rows
            tl.store(y_at, out.to(y_ptr.dtype.element_ty), mask=row_ok)
        else:
            ms = m_block * BM + tl.arange(0, BM)
            out = tl.sum(acc, axis=0) * scale[:, None]
            y_at = y_ptr + (first + ms)[None, :] * stride_ym + rows[:, None]
            tl.store(
                y_at, out.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (ms < count)[None, :]
            )


def _xt_blocks(
    x: torch.Tensor, ends: torch.Tensor, first: torch.Tensor, counts: torch.Tensor, bm: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x's routed rows as xᵀ blocks [blocks, K, bm], each expert's tokens in blocks of their
    own (zero-padded), and each expert's first block; built on the device without a sync
    (the block count bounded by T / bm + experts, one spare block taking unrouted rows)."""
    t, k = x.shape
    experts = ends.shape[0]
    per_expert = (counts + bm - 1) // bm
    base = torch.cumsum(per_expert, 0) - per_expert
    spare = -(-t // bm) + experts
    token = torch.arange(t, device=x.device)
    expert = torch.searchsorted(ends, token, right=True)  # `experts` past the last offset
    routed = expert < experts
    expert = expert.clamp(max=experts - 1)
    local = token - first[expert]
    block = torch.where(routed, base[expert] + local // bm, spare)
    xt = x.new_zeros((spare + 1, k, bm))
    xt[block, :, local % bm] = x
    return xt, base


def choose_grouped_config(tokens: int, experts: int, rows: int) -> dict:
    """The default config: linear_compressed's at the mean tokens per expert (decode: one)."""
    return lc.choose_ell_config(max(1, -(-tokens // max(experts, 1))), rows)


def grouped_mm_ell_triton(
    x: torch.Tensor,
    entries: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    group_offsets: torch.Tensor,
    in_features: int,
    part: int,
    config: dict | None = None,
) -> torch.Tensor:
    """x [T, K] sorted by expert @ each expert's weightᵀ (W = levels * scales[:, None], the
    levels in `transcode_experts`'s layout), every expert in one launch; rows past the last
    offset stay zero (as the reference's). `config` one of ELL_CONFIGS (None:
    `choose_grouped_config`)."""
    experts = group_offsets.shape[0]
    rows = scales.shape[0] // max(experts, 1)
    x = as_rows(x)
    t = x.shape[0]
    out = x.new_zeros((t, rows))
    if t == 0 or experts == 0 or rows == 0:
        return out
    config = config or choose_grouped_config(t, experts, rows)
    bm = config["block_m"] or min(triton.next_power_of_2(-(-t // experts)), lc.MAX_BLOCK_M)
    ends = group_offsets.to(device=x.device, dtype=torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    first = ends - counts
    if bm == 1:
        xs, base, x_block_stride = x, first, x.stride(0)
    else:
        xs, base = _xt_blocks(x, ends, first, counts, bm)
        x_block_stride = in_features * bm
    slices = -(-rows // lc.ELL_ROWS)
    as_int32 = [v.to(torch.int32) for v in (first, counts, base)]
    _grouped_ell_kernel[(slices, experts)](
        xs,
        entries,
        blocks,
        scales,
        out,
        *as_int32,
        rows,
        in_features,
        -(-in_features // part),
        part,
        slices,
        x_block_stride,
        out.stride(0),
        G=lc.ELL_ROWS,
        BJ=config["block_j"],
        BM=bm,
        PREFETCH=config["prefetch"],
        num_warps=config["num_warps"],
    )
    return out


grouped_mm_ell_triton.kernels = (_grouped_ell_kernel,)
grouped_mm_ell_triton.configs = lc.ELL_CONFIGS


_TRANSCODED = WeakIdKeyDictionary()  # code words tensor (by identity) -> (version, EllWeight)


def _transcoded(words: torch.Tensor, build: Callable[[], lc.EllWeight]) -> lc.EllWeight:
    """The sliced-ELL form of a stream, built once per words tensor (its version checked)."""
    entry = _TRANSCODED.get(words)
    if entry is None or entry[0] != words._version:
        entry = (words._version, build())
        _TRANSCODED[words] = entry
    return entry[1]


def grouped_mm_compressed_cuda(
    x, words, offsets, table, checksum, scales, group_offsets, in_features, segment, max_words
) -> torch.Tensor:
    """grouped_mm_compressed as eager programs run it on CUDA: the stream transcoded on first
    use, then every expert in one launch of the grouped sliced-ELL kernel; activations the
    kernel does not multiply take the reference."""
    stream = (words, offsets, table, checksum)
    rest = (in_features, segment, max_words)
    if x.dtype not in X_DTYPES:
        return GROUPED_MM_COMPRESSED.reference(x, *stream, scales, group_offsets, *rest)
    experts = group_offsets.shape[0]
    ell = _transcoded(words, lambda: transcode_experts(*stream, experts, scales.shape[0], *rest))
    return grouped_mm_ell_triton(
        x, ell.entries, ell.blocks, scales, group_offsets, in_features, ell.part
    )


@functools.cache
def register_cuda_kernel() -> None:
    """Make `grouped_mm_compressed_cuda` the CUDA implementation of grouped_mm_compressed;
    once per process."""
    torch.library.register_kernel(
        f"{GROUPED_MM_COMPRESSED.namespace}::{GROUPED_MM_COMPRESSED.name}",
        "cuda",
        grouped_mm_compressed_cuda,
    )
