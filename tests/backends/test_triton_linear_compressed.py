"""The Triton linear_compressed kernel against the op's reference on CPU under
TRITON_INTERPRET=1 (one subprocess: the interpreter is chosen before kernels are decorated),
and its registration as the triton lowering."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# (rows, cols, segment, M, zero probability, dtype, bias, config index or None)
CASES = [
    (8, 40, 16, 1, 0.8, "float32", False, None),  # decode GEMV, partial last segment
    (6, 100, 32, 3, 0.5, "bfloat16", True, None),  # a few tokens routed to one expert
    (5, 64, 64, 17, 0.95, "float16", False, 4),  # batched variant, block_m 16: two programs
    (4, 300, 32, 1, 0.9, "float32", True, 2),  # many segments per program step
    (3, 48, 16, 2, 1.0, "float32", False, 1),  # an all-zero expert
]

COMPARE = """
import json, sys, torch
from peakc.ir.dictionary_code import ParseTree, encode, tunstall
from peakc.ir.ops import _linear_compressed_reference
from peakc.backends.triton.kernels.linear_compressed import CONFIGS, linear_compressed_triton

out = []
for i, (n, k, seg, m, p0, dtype, bias, cfg) in enumerate(json.loads(sys.argv[1])):
    gen = torch.Generator().manual_seed(i)
    dtype = getattr(torch, dtype)
    probs = torch.tensor([(1 - p0) / 2, p0 + 1e-9, (1 - p0) / 2])
    levels = (torch.multinomial(probs, n * k, True, generator=gen) - 1).view(n, k)
    d = tunstall({a: int((levels == a).sum()) for a in (-1, 0, 1)}, size=512)
    c = encode(levels, d, seg)
    scales = (torch.rand(n, generator=gen) + 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    args = (x, c.words, c.offsets, c.table, c.checksum, scales, b, k, seg, c.max_words)
    ref = _linear_compressed_reference(x.float(), c.words, c.offsets, c.table, c.checksum,
                                       scales.float(), None if b is None else b.float(),
                                       k, seg, c.max_words)
    y = linear_compressed_triton(*args, config=None if cfg is None else CONFIGS[cfg])
    err = float((y.float() - ref).norm() / ref.norm().clamp(min=1e-6))
    out.append(dict(case=i, err=err, shape=list(y.shape), dtype=str(y.dtype)))
# a damaged codeword (beyond the table) reads a real table row: no crash, no stray memory
n, k, seg = 4, 64, 32
levels = torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(9))
c = encode(levels, tunstall({-1: 1, 0: 1, 1: 1}, size=64), seg)
words = c.words.clone()
words[0] = 32767
y = linear_compressed_triton(torch.randn(1, k), words, c.offsets, c.table, c.checksum,
                             torch.ones(n), None, k, seg, c.max_words)
out.append(dict(case="damaged", finite=bool(torch.isfinite(y).all()), shape=list(y.shape)))
print(json.dumps(out))
"""


def test_kernel_matches_the_reference():
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
    assert len(results) == len(CASES) + 1
    for r in results[:-1]:
        n, k, seg, m, p0, dtype, bias, cfg = CASES[r["case"]]
        assert r["shape"] == [m, n] and r["dtype"] == f"torch.{dtype}", r
        limit = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}[dtype]
        assert r["err"] < limit, (CASES[r["case"]], r)
    assert results[-1] == {"case": "damaged", "finite": True, "shape": [1, 4]}


def test_kernel_is_the_triton_lowering_with_its_kernels_and_configs():
    import peakc.backends.triton.kernels  # noqa: F401  (registers the triton lowerings)
    from peakc.ir.ops import lowering_for

    lowering = lowering_for("linear_compressed", "triton")
    assert lowering is not None and lowering.label == "triton/linear_compressed"
    fn = lowering.fn
    assert len(fn.kernels) == 1 and "tl.cumsum" in fn.kernels[0].src
    assert fn.configs[0] == {"tile": 2048, "block_m": 1, "num_warps": 4}

    class Node:
        args = (None,) * 9 + (5000,)

    assert "5000 codewords" in lowering.why_not(Node, None, None)
    Node.args = (None,) * 9 + (40,)
    assert lowering.why_not(Node, None, None) is None
    assert torch.ops.peakc.linear_compressed.default is not None
