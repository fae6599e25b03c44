"""The Triton linear_compressed kernels (the sliced-ELL kernel the op runs, and the dictionary
decoder) against the op's reference on CPU under TRITON_INTERPRET=1 (one subprocess: the
interpreter is chosen before kernels are decorated), the Triton backend's rewrite into the
transcoded layout (artifact round trip), the layout's own round trip, and the registrations."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from peakc.backends.triton.kernels import linear_compressed as lc  # noqa: E402
from peakc.errors import PeakcError  # noqa: E402
from peakc.ir.dictionary_code import decode, encode, tunstall  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# dictionary decoder: (rows, cols, segment, M, zero probability, dtype, bias, config or None)
CASES = [
    (8, 40, 16, 1, 0.8, "float32", False, None),  # decode GEMV, partial last segment
    (6, 100, 32, 3, 0.5, "bfloat16", True, None),  # a few tokens routed to one expert
    (5, 64, 64, 17, 0.95, "float16", False, 4),  # batched variant, block_m 16: two programs
    (3, 48, 16, 2, 1.0, "float32", False, 1),  # an all-zero expert
]
# sliced-ELL kernel: (rows, cols, M, zero probability, dtype, bias, part or None, config index
# into ELL_CONFIGS or None for the default)
ELL_CASES = [
    (13, 40, 1, 0.8, "bfloat16", False, None, None),  # GEMV, a partial slice of rows
    (20, 300, 1, 0.9, "float16", True, 128, None),  # three parts, the last partial
    (6, 100, 3, 0.5, "bfloat16", True, 32, None),  # xᵀ blocks of 4 rows
    (16, 50, 17, 0.7, "float16", False, None, None),  # block_m 32
    (9, 64, 40, 0.9, "bfloat16", True, None, None),  # two programs along M (32 + 8 rows)
    (24, 70, 1, 0.6, "float32", False, None, 1),
    (24, 70, 1, 0.6, "float16", False, 16, 2),  # no prefetch
    (9, 48, 2, 1.0, "bfloat16", False, None, 4),  # an all-zero expert
    (10, 33, 5, 0.7, "float16", False, None, 5),
    (8, 40, 3, 0.8, "bfloat16", False, None, 0),  # block_m 1 for M > 1: a program per row
]

COMPARE = """
import json, sys, tempfile
from pathlib import Path
import torch
import peakc
from peakc.ir.dictionary_code import decode, encode, tunstall
from peakc.ir.ops import _linear_compressed_reference
from peakc.backends.triton.kernels import compressed_linear, linear_compressed as lc

cases, ell_cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])


def coded(n, k, seg, p0, gen):
    probs = torch.tensor([(1 - p0) / 2, p0 + 1e-9, (1 - p0) / 2])
    levels = (torch.multinomial(probs, n * k, True, generator=gen) - 1).view(n, k)
    d = tunstall({a: int((levels == a).sum()) for a in (-1, 0, 1)}, size=512)
    return encode(levels, d, seg)


def reference(x, c, scales, b, k, seg):
    return _linear_compressed_reference(
        x.float(), c.words, c.offsets, c.table, c.checksum, scales.float(),
        None if b is None else b.float(), k, seg, c.max_words)


def err(y, ref):
    return float((y.float() - ref).norm() / ref.norm().clamp(min=1e-6))


out = {"dictionary": [], "ell": []}
for i, (n, k, seg, m, p0, dtype, bias, cfg) in enumerate(cases):
    gen = torch.Generator().manual_seed(i)
    dtype = getattr(torch, dtype)
    c = coded(n, k, seg, p0, gen)
    scales = (torch.rand(n, generator=gen) + 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    config = None if cfg is None else lc.CONFIGS[cfg]
    y = lc.linear_compressed_triton(x, c.words, c.offsets, c.table, c.checksum, scales, b, k,
                                    seg, c.max_words, config=config)
    out["dictionary"].append(dict(err=err(y, reference(x, c, scales, b, k, seg)),
                                  shape=list(y.shape), dtype=str(y.dtype)))
for i, (n, k, m, p0, dtype, bias, part, cfg) in enumerate(ell_cases):
    gen = torch.Generator().manual_seed(100 + i)
    dtype = getattr(torch, dtype)
    c = coded(n, k, 16, p0, gen)
    stream = (c.words, c.offsets, c.table, c.checksum)
    ell = lc.transcode(*stream, n, k, 16, c.max_words, part)
    exact = torch.equal(lc.ell_levels(ell.entries, ell.blocks, n, k, ell.part),
                        decode(*stream, n, k, 16, c.max_words))
    scales = (torch.rand(n, generator=gen) + 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    config = None if cfg is None else lc.ELL_CONFIGS[cfg]
    y = lc.linear_compressed_ell_triton(x, ell.entries, ell.blocks, scales, b, k, ell.part, config)
    out["ell"].append(dict(err=err(y, reference(x, c, scales, b, k, 16)), exact=exact,
                           shape=list(y.shape), dtype=str(y.dtype)))

# the eager CUDA implementation (run here on CPU tensors): transcoded once per weight
c = coded(16, 48, 16, 0.8, torch.Generator().manual_seed(7))
x, scales = torch.randn(2, 48), torch.rand(16) + 0.1
args = (c.words, c.offsets, c.table, c.checksum, scales, None, 48, 16, c.max_words)
first = compressed_linear._cuda_linear_compressed(x, *args)
cached = len(compressed_linear._REPACKED)
again = compressed_linear._cuda_linear_compressed(x, *args)
out["eager"] = dict(err=err(first, reference(x, c, scales, None, 48, 16)),
                    cached=cached == len(compressed_linear._REPACKED) and torch.equal(first, again))

# damaged inputs read real memory: a codeword beyond the table, an entry beyond K
words = c.words.clone()
words[0] = 32767
y = lc.linear_compressed_triton(torch.randn(1, 48), words, c.offsets, c.table, c.checksum,
                                scales, None, 48, 16, c.max_words)
ell = lc.transcode(c.words, c.offsets, c.table, c.checksum, 16, 48, 16, c.max_words)
entries = ell.entries.clone()
entries[0] = (1000 << 2) | 1
z = lc.linear_compressed_ell_triton(torch.randn(1, 48), entries, ell.blocks, scales, None, 48,
                                    ell.part)
out["damaged"] = [bool(torch.isfinite(t).all()) and list(t.shape) == [1, 16] for t in (y, z)]


# the Triton backend: compiled, saved with the transcoded layout, loaded
class Expert(torch.nn.Module):
    def __init__(self, n, k, gen):
        super().__init__()
        c = coded(n, k, 16, 0.8, gen)
        self.k, self.max_words = k, c.max_words
        for name in ("words", "offsets", "table", "checksum"):
            self.register_buffer(name, getattr(c, name))
        self.register_buffer("scales", torch.rand(n, generator=gen) + 0.1)

    def forward(self, x):
        return torch.ops.peakc.linear_compressed(x, self.words, self.offsets, self.table,
                                                 self.checksum, self.scales, None, self.k, 16,
                                                 self.max_words)


class TwoExperts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.up, self.down = Expert(24, 40, gen), Expert(40, 24, gen)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


model = TwoExperts()
x = torch.randn(3, 40)
compiled = peakc.compile(model, (x,), backend="triton", pipeline="none")
path = compiled.save(Path(tempfile.mkdtemp()) / "art")
from safetensors.torch import load_file

stored = load_file(str(path / "weights.safetensors"))
out["backend"] = dict(
    ops=compiled.contents.report["ops"],
    stored=sorted(stored),
    err=err(peakc.load(path)(x)[0], model(x)),
)
print(json.dumps(out))
"""

LIMITS = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", COMPARE, json.dumps(CASES), json.dumps(ELL_CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ell_kernel_matches_the_reference_and_the_transcode_is_exact(results):
    assert len(results["ell"]) == len(ELL_CASES)
    for case, r in zip(ELL_CASES, results["ell"], strict=True):
        n, k, m, _, dtype, *_ = case
        assert r["exact"], case
        assert r["shape"] == [m, n] and r["dtype"] == f"torch.{dtype}", (case, r)
        assert r["err"] < LIMITS[dtype], (case, r)


def test_dictionary_kernel_matches_the_reference(results):
    for case, r in zip(CASES, results["dictionary"], strict=True):
        n, k, seg, m, p0, dtype, *_ = case
        assert r["shape"] == [m, n] and r["dtype"] == f"torch.{dtype}", r
        assert r["err"] < LIMITS[dtype], (case, r)


def test_eager_cuda_path_transcodes_once_and_damaged_inputs_stay_in_bounds(results):
    assert results["eager"]["err"] < 1e-5 and results["eager"]["cached"]
    assert results["damaged"] == [True, True]


def test_triton_backend_stores_the_transcoded_layout(results):
    backend = results["backend"]
    assert backend["ops"] == {"linear_compressed": "triton/linear_compressed"}
    assert "up.ell_entries" in backend["stored"] and "down.ell_blocks" in backend["stored"]
    assert not any(name.endswith(".words") for name in backend["stored"])
    assert backend["err"] < 1e-5


def test_rewrite_refuses_a_damaged_stream_naming_the_layer():
    import peakc.ir.ops  # noqa: F401  (defines torch.ops.peakc)
    from peakc.backends.triton.lower import apply_rewrites
    from peakc.ir.capture import capture

    levels = torch.randint(-1, 2, (12, 32), generator=torch.Generator().manual_seed(4))
    c = encode(levels, tunstall({-1: 1, 0: 2, 1: 1}, size=64), 16)

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("words", "offsets", "table", "checksum"):
                self.register_buffer(name, getattr(c, name).clone())
            self.register_buffer("scales", torch.rand(12) + 0.1)

        def forward(self, x):
            return torch.ops.peakc.linear_compressed(x, self.words, self.offsets, self.table,
                                                     self.checksum, self.scales, None, 32, 16,
                                                     c.max_words)  # fmt: skip

    model = torch.nn.Sequential(Expert())
    graph = capture(model, (torch.randn(2, 32),))
    rewritten = apply_rewrites(graph)
    targets = [str(n.target) for n in rewritten.call_nodes()]
    assert any("linear_compressed_ell" in t for t in targets)
    torch.testing.assert_close(rewritten.run()[0], graph.run()[0])
    graph.get_weight("0.words")[0] ^= 1
    with pytest.raises(PeakcError, match=r"^0: compressed weight: checksum mismatch"):
        apply_rewrites(graph)


def test_lowerings_are_registered_with_kernels_and_configs():
    import peakc.backends.triton.kernels  # noqa: F401  (registers the triton lowerings)
    from peakc.ir.ops import lowering_for

    rewrite = lowering_for("linear_compressed", "triton")
    assert rewrite.stage == "rewrite" and rewrite.label == "triton/linear_compressed"
    emit = lowering_for("linear_compressed_ell", "triton")
    assert emit.stage == "emit" and emit.fn.kernels == (lc._linear_ell_kernel,)
    assert emit.fn.configs == lc.ELL_CONFIGS and len(lc.ELL_CONFIGS) >= 3
    assert torch.ops.peakc.linear_compressed.default is not None


@pytest.mark.parametrize(
    "levels",
    [
        torch.zeros(5, 30, dtype=torch.int8),  # all zeros: empty blocks
        torch.ones(9, 17, dtype=torch.int8),  # no zeros: full blocks
        torch.full((3, 40), -2, dtype=torch.int8),  # one value, 2-bit
        torch.randint(-2, 2, (19, 70), generator=torch.Generator().manual_seed(0)),
    ],
)
@pytest.mark.parametrize("part", [None, 16, 7])
def test_ell_layout_round_trips(levels, part):
    ell = lc.ell_from_levels(levels, part)
    assert ell.blocks.dtype == torch.int32 and ell.entries.dtype == torch.int16
    assert ell.entries.numel() == lc.ELL_ROWS * int(ell.blocks[-1])
    back = lc.ell_levels(ell.entries, ell.blocks, *levels.shape, ell.part)
    assert torch.equal(back, levels.to(torch.int8))


def test_ell_blocks_view_reads_a_range_of_slices():
    levels = torch.randint(-1, 2, (24, 50), generator=torch.Generator().manual_seed(1))
    ell = lc.ell_from_levels(levels)
    tail = lc.ell_levels(ell.entries, ell.blocks[1:], 16, 50, ell.part)  # slices 1 and 2
    assert torch.equal(tail, levels[8:].to(torch.int8))


def test_ell_layout_refusals():
    with pytest.raises(PeakcError, match="part of 20000 columns"):
        lc.ell_from_levels(torch.zeros(2, 30000, dtype=torch.int8), 20000)
    with pytest.raises(PeakcError, match="levels outside -2..1"):
        lc.ell_from_levels(torch.full((2, 4), 2, dtype=torch.int8))
    levels = torch.randint(-1, 2, (4, 32), generator=torch.Generator().manual_seed(2))
    c = encode(levels, tunstall({-1: 1, 0: 1, 1: 1}, size=64), 16)
    assert torch.equal(decode(c.words, c.offsets, c.table, c.checksum, 4, 32, 16, c.max_words),
                       levels.to(torch.int8))  # fmt: skip
    words = c.words.clone()
    words[0] ^= 1
    with pytest.raises(PeakcError, match="checksum mismatch"):
        lc.transcode(words, c.offsets, c.table, c.checksum, 4, 32, 16, c.max_words)
