"""grouped_mm_compressed on linear_compressed's Triton kernels (one launch per expert with
tokens): the fused dictionary decoder (the triton lowering) and the eager CUDA form (the
stacked stream transcoded once to sliced ELL, or the decoder when experts' rows do not fill
whole slices), against the op's reference on CPU under TRITON_INTERPRET=1 (a subprocess: the
interpreter is chosen before kernels are decorated)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# (experts, rows per expert, cols, segment, tokens per expert, dtype)
CASES = [
    (4, 6, 40, 16, [3, 0, 4, 2], "float32"),  # an expert without tokens, partial segment
    (3, 8, 96, 32, [1, 1, 1], "bfloat16"),  # decode: one token per routed expert
    (2, 16, 64, 64, [0, 0], "float32"),  # nothing routed: zeros
    (4, 16, 72, 32, [5, 1, 0, 9], "float16"),  # whole ELL slices per expert, several tokens
]

COMPARE = """
import json, sys, torch
from peakc.ir.dictionary_code import encode, tunstall
from peakc.ir.ops import GROUPED_MM_COMPRESSED
from peakc.backends.triton.kernels import grouped_mm_compressed as g

out = []
for i, (experts, n, k, seg, counts, dtype) in enumerate(json.loads(sys.argv[1])):
    gen = torch.Generator().manual_seed(i)
    dtype = getattr(torch, dtype)
    levels = torch.randint(-1, 2, (experts * n, k), generator=gen)
    levels[torch.rand(experts * n, k, generator=gen) < 0.7] = 0
    code = encode(levels, tunstall({-1: 1, 0: 6, 1: 1}, size=128), seg)
    scales = (torch.rand(experts * n, generator=gen) + 0.1).to(dtype)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    x = torch.randn(sum(counts) + 1, k, generator=gen).to(dtype)  # a row past the last offset
    args = (x, code.words, code.offsets, code.table, code.checksum, scales, offsets, k, seg,
            code.max_words)
    ref = GROUPED_MM_COMPRESSED.reference(*args).float()
    for path, fn in (("decoder", g.grouped_mm_compressed_triton),
                     ("cuda", g.grouped_mm_compressed_cuda)):
        y = fn(*args)
        err = float((y.float() - ref).norm() / ref.norm().clamp(min=1e-6))
        out.append(dict(case=i, path=path, err=err, shape=list(y.shape), dtype=str(y.dtype),
                        last_row_zero=bool((y[-1] == 0).all())))
    out[-1]["transcoded"] = code.words in g._TRANSCODED
print(json.dumps(out))
"""


def test_grouped_kernel_matches_the_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", COMPARE, json.dumps(CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(CASES)
    for r in results:
        experts, n, k, seg, counts, dtype = CASES[r["case"]]
        assert r["shape"] == [sum(counts) + 1, n] and r["dtype"] == f"torch.{dtype}", r
        assert r["err"] < (1e-5 if dtype == "float32" else 1.5e-2), r
        assert r["last_row_zero"], r
        if r["path"] == "cuda":  # sliced ELL when every expert fills whole slices of 8 rows
            assert r["transcoded"] == (n % 8 == 0), r


def test_grouped_kernel_is_the_triton_lowering():
    import peakc.backends.triton.kernels  # noqa: F401  (registers the triton lowerings)
    from peakc.ir.ops import lowering_for

    lowering = lowering_for("grouped_mm_compressed", "triton")
    assert lowering is not None and lowering.label == "triton/linear_compressed per expert"
    from peakc.backends.triton.kernels.linear_compressed import linear_compressed_triton

    assert lowering.fn.kernels == linear_compressed_triton.kernels  # the dictionary decoder

    class Node:
        args = (None,) * 9 + (5000,)

    assert "5000 codewords" in lowering.why_not(Node, None, None)
    Node.args = (None,) * 9 + (40,)
    assert lowering.why_not(Node, None, None) is None
