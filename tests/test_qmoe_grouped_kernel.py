"""grouped_mm_compressed on the grouped sliced-ELL kernel (every expert of a layer in one
launch): the launcher and the eager CUDA form against the op's reference on CPU under
TRITON_INTERPRET=1 (a subprocess: the interpreter is chosen before kernels are decorated), the
grouped layout's round trip, and the triton lowerings' registration."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# (experts, rows per expert, cols, segment, tokens per expert, dtype, config index into
# ELL_CONFIGS or None for the default)
CASES = [
    (4, 6, 40, 16, [3, 0, 1, 2], "float32", None),  # partial slices, an expert without tokens
    (3, 8, 96, 32, [1, 1, 1], "bfloat16", None),  # decode: one token per routed expert
    (2, 16, 64, 64, [0, 0], "float32", None),  # nothing routed: zeros
    (4, 16, 72, 32, [3, 1, 0, 3], "float16", 3),  # block_m fitted: xᵀ blocks per expert
    (5, 9, 50, 16, [0, 3, 1, 0, 3], "bfloat16", 0),  # block_m 1 for several tokens: a loop
    (3, 24, 40, 16, [2, 0, 3], "float16", 4),  # block_j 16
    (6, 8, 33, 16, [1, 0, 3, 0, 1, 3], "float32", 2),  # no prefetch
]
LIMITS = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}

COMPARE = """
import json, sys, torch
from peakc.ir.dictionary_code import encode, tunstall
from peakc.ir.ops import GROUPED_MM_COMPRESSED
from peakc.backends.triton.kernels import grouped_mm_compressed as g
from peakc.backends.triton.kernels.linear_compressed import ELL_CONFIGS

out = []
for i, (experts, n, k, seg, counts, dtype, cfg) in enumerate(json.loads(sys.argv[1])):
    gen = torch.Generator().manual_seed(i)
    dtype = getattr(torch, dtype)
    levels = torch.randint(-1, 2, (experts * n, k), generator=gen)
    levels[torch.rand(experts * n, k, generator=gen) < 0.7] = 0
    code = encode(levels, tunstall({-1: 1, 0: 6, 1: 1}, size=128), seg)
    stream = (code.words, code.offsets, code.table, code.checksum)
    scales = (torch.rand(experts * n, generator=gen) + 0.1).to(dtype)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    x = torch.randn(sum(counts) + 1, k, generator=gen).to(dtype)  # a row past the last offset
    ref = GROUPED_MM_COMPRESSED.reference(x, *stream, scales, offsets, k, seg,
                                          code.max_words).float()
    ell = g.transcode_experts(*stream, experts, experts * n, k, seg, code.max_words)
    config = None if cfg is None else ELL_CONFIGS[cfg]
    y = g.grouped_mm_ell_triton(x, ell.entries, ell.blocks, scales, offsets, k, ell.part,
                                config)
    eager = g.grouped_mm_compressed_cuda(x, *stream, scales, offsets, k, seg, code.max_words)
    errs = [float((t.float() - ref).norm() / ref.norm().clamp(min=1e-6)) for t in (y, eager)]
    out.append(dict(case=i, err=max(errs), shape=list(y.shape), dtype=str(y.dtype),
                    last_row_zero=bool((y[-1] == 0).all()),
                    transcoded_once=code.words in g._TRANSCODED))
print("RESULT " + json.dumps(out))
"""


def test_grouped_kernel_matches_the_reference(interpreted):
    results = interpreted(COMPARE, json.dumps(CASES), timeout=300)
    assert len(results) == len(CASES)
    for r in results:
        experts, n, k, seg, counts, dtype, _ = CASES[r["case"]]
        assert r["shape"] == [sum(counts) + 1, n] and r["dtype"] == f"torch.{dtype}", r
        assert r["err"] < LIMITS[dtype], r
        assert r["last_row_zero"] and r["transcoded_once"], r


@pytest.mark.parametrize("rows", [8, 6, 13])
def test_grouped_layout_round_trips_on_whole_slices_per_expert(rows):
    from peakc.backends.triton.kernels import grouped_mm_compressed as g
    from peakc.backends.triton.kernels import linear_compressed as lc
    from peakc.ir.dictionary_code import encode, tunstall

    experts, k = 3, 40
    levels = torch.randint(-1, 2, (experts * rows, k), generator=torch.Generator().manual_seed(5))
    code = encode(levels, tunstall({-1: 1, 0: 2, 1: 1}, size=64), 16)
    stream = (code.words, code.offsets, code.table, code.checksum)
    ell = g.transcode_experts(*stream, experts, experts * rows, k, 16, code.max_words)
    slices = -(-rows // lc.ELL_ROWS)
    assert ell.rows == experts * slices * lc.ELL_ROWS
    assert ell.blocks.numel() == experts * slices + 1  # one part: K <= MAX_PART
    back = g.grouped_ell_levels(ell.entries, ell.blocks, experts, rows, k, ell.part)
    assert torch.equal(back, levels.to(torch.int8))


def test_grouped_lowerings_are_a_rewrite_and_one_launch():
    import peakc.backends.triton.kernels  # noqa: F401  (registers the triton lowerings)
    from peakc.backends.triton.kernels import grouped_mm_compressed as g
    from peakc.backends.triton.kernels.linear_compressed import ELL_CONFIGS
    from peakc.ir.ops import lowering_for

    rewrite = lowering_for("grouped_mm_compressed", "triton")
    assert rewrite.stage == "rewrite" and rewrite.label == "triton/grouped_mm_compressed"
    emit = lowering_for("grouped_mm_compressed_ell", "triton")
    assert emit.stage == "emit" and emit.fn.kernels == (g._grouped_ell_kernel,)
    assert emit.fn.configs == ELL_CONFIGS
