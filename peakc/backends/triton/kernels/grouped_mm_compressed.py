"""`peakc::grouped_mm_compressed` on linear_compressed's Triton kernels: the routed experts of
one MoE layer with their weights kept compressed on the GPU.

Expert e's weight is rows e*N..(e+1)*N of one coded matrix. Both layouts linear_compressed.py
reads keep absolute positions in their offsets (the dictionary code's segment offsets, the
sliced-ELL block offsets), so a kernel reads expert e through views of the offsets and of the
scales, with no copy. Each expert that received tokens is one kernel launch on its rows of x
(the tokens routed to one expert); experts without tokens are never read. The token counts
are read on the host (one sync per call, as the reference's grouped matmul does).

- Eager programs on CUDA (`register_cuda_kernel()`, called by peakc.load): the stacked stream
  is transcoded once, on first use, into the sliced-ELL layout (checked decode; cached per
  stream tensor) and each expert runs the ELL kernel on its slices (N a multiple of ELL_ROWS;
  otherwise the fused dictionary decoder per expert).
- Triton backend: the op's lowering runs the fused dictionary decoder per expert on the
  stored stream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from peakc.backends.triton.kernels import linear_compressed as lc
from peakc.ir.dictionary_code import segments_per_row
from peakc.ir.ops import GROUPED_MM_COMPRESSED, register_lowering

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels multiply


def why_not_grouped_mm_compressed(node, graph, context) -> str | None:
    """Decline segments too long for one tile of codewords (linear_compressed's limit)."""
    max_words = node.args[9]
    if max_words > lc.MAX_TILE_WORDS:
        return (
            f"grouped_mm_compressed: {max_words} codewords in a segment "
            f"(kernel tiles hold {lc.MAX_TILE_WORDS})"
        )
    return None


@register_lowering(
    "grouped_mm_compressed",
    "triton",
    label="triton/linear_compressed per expert",
    why_not=why_not_grouped_mm_compressed,
)
def grouped_mm_compressed_triton(
    x: torch.Tensor,
    words: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    checksum: torch.Tensor,
    scales: torch.Tensor,
    group_offsets: torch.Tensor,
    in_features: int,
    segment: int,
    max_words: int,
    config: dict | None = None,
) -> torch.Tensor:
    """x [T, K] sorted by expert @ each expert's decoded weightᵀ, one kernel launch per expert
    with tokens; rows past the last offset stay zero (as the reference's)."""
    experts = group_offsets.shape[0]
    rows = scales.shape[0] // experts
    per_expert = rows * segments_per_row(in_features, segment)
    out = x.new_zeros((x.shape[0], rows))
    start = 0
    for e, end in enumerate(group_offsets.tolist()):
        end = int(end)
        if end > start:
            out[start:end] = lc.linear_compressed_triton(
                x[start:end],
                words,
                offsets[e * per_expert : (e + 1) * per_expert + 1],
                table,
                checksum,
                scales[e * rows : (e + 1) * rows],
                None,
                in_features,
                segment,
                max_words,
                config=config,
            )
        start = end
    return out


grouped_mm_compressed_triton.kernels = lc.linear_compressed_triton.kernels
grouped_mm_compressed_triton.configs = lc.CONFIGS


def grouped_mm_compressed_ell(
    x: torch.Tensor,
    ell: lc.EllWeight,
    scales: torch.Tensor,
    group_offsets: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """x [T, K] sorted by expert @ each expert's weightᵀ, every expert's rows held in one
    sliced-ELL weight (each expert a whole number of slices): the ELL kernel once per expert
    with tokens, on views of the block offsets and scales."""
    experts = group_offsets.shape[0]
    rows = scales.shape[0] // experts
    per_expert = rows // lc.ELL_ROWS * -(-ell.cols // ell.part)  # blocks of one expert
    out = x.new_zeros((x.shape[0], rows))
    start = 0
    for e, end in enumerate(group_offsets.tolist()):
        end = int(end)
        if end > start:
            out[start:end] = lc.linear_compressed_ell_triton(
                x[start:end],
                ell.entries,
                ell.blocks[e * per_expert : (e + 1) * per_expert + 1],
                scales[e * rows : (e + 1) * rows],
                None,
                ell.cols,
                ell.part,
                config,
            )
        start = end
    return out


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
    """grouped_mm_compressed as eager programs run it on CUDA: the sliced-ELL kernel per
    expert (the stream transcoded on first use); experts of rows not a multiple of ELL_ROWS
    take the fused dictionary decoder, activations the kernels do not multiply or segments
    too long for its tiles the reference."""
    stream = (words, offsets, table, checksum)
    rest = (in_features, segment, max_words)
    rows = scales.shape[0] // group_offsets.shape[0]
    if x.dtype not in X_DTYPES or (rows % lc.ELL_ROWS and max_words > lc.MAX_TILE_WORDS):
        return GROUPED_MM_COMPRESSED.reference(x, *stream, scales, group_offsets, *rest)
    if rows % lc.ELL_ROWS:
        return grouped_mm_compressed_triton(x, *stream, scales, group_offsets, *rest)
    ell = _transcoded(words, lambda: lc.transcode(*stream, scales.shape[0], *rest))
    return grouped_mm_compressed_ell(x, ell, scales, group_offsets)


@functools.cache
def register_cuda_kernel() -> None:
    """Make `grouped_mm_compressed_cuda` the CUDA implementation of grouped_mm_compressed;
    once per process."""
    torch.library.register_kernel(
        f"{GROUPED_MM_COMPRESSED.namespace}::{GROUPED_MM_COMPRESSED.name}",
        "cuda",
        grouped_mm_compressed_cuda,
    )
