"""The templated Triton kernels (norms, rotary, glu/gelu, attention, attention_cache) against
their ops' references on CPU under TRITON_INTERPRET=1, and their registry entries and
per-node declines in this process.

TRITON_INTERPRET must be set before a kernel is decorated, so every kernel comparison runs in
one fresh interpreter subprocess that prints its measurements; this process only asserts. The
interpreter is slow (about 50 ms per program), so shapes are small but odd: hidden 101, seq
5/7/33, head dims 16/32/64, grids of a few programs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx

pytest.importorskip("triton")

import peakc.backends.triton.kernels  # noqa: E402, F401  (registers the lowerings)
from peakc.ir.ops import lowering_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

COMPARE = r"""
import json, torch
from peakc.ir import ops
from peakc.backends.triton.kernels import attention as A, glu as G, norms as N, rotary as R
from peakc.backends.triton.kernels.grouped_mm import GROUPED_MM_CONFIGS, grouped_mm
from peakc.backends.triton.kernels.linear_act import linear_act

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CHUNKED = {"max_block": 32, "num_warps": 2}  # rows of 101 walked in chunks of 32
SMALL = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
gen = torch.Generator().manual_seed(0)
results = []


def randn(*shape, dtype=F32):
    return torch.randn(*shape, generator=gen).to(dtype)


def record(name, dtype, outs, refs, ok=True):
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = refs if isinstance(refs, tuple) else (refs,)
    err = max(float((o.float() - r.float()).norm() / r.float().norm()) for o, r in zip(outs, refs))
    same = all(o.shape == r.shape and o.dtype == r.dtype and o.stride() == r.stride()
               for o, r in zip(outs, refs))
    results.append(dict(name=name, dtype=str(dtype), err=err, layout=same, ok=bool(ok)))


# norms: hidden 101, plain and chunked rows, a strided row pitch, Gemma's fp32 weight
for dtype in (F32, F16, BF16):
    x, skip = randn(2, 101, dtype=dtype), randn(2, 101, dtype=dtype)
    w, b = randn(101, dtype=dtype), randn(101, dtype=dtype)
    for tag, cfg in (("", None), (" chunked", CHUNKED)):
        record("rms_norm" + tag, dtype, N.rms_norm(x, w, 1e-6, config=cfg),
               ops._rms_norm_reference(x, w, 1e-6))
        record("skip_rms_norm" + tag, dtype, N.skip_rms_norm(x, skip, w, 1e-6, config=cfg),
               ops._skip_rms_norm_reference(x, skip, w, 1e-6))
        record("layer_norm" + tag, dtype, N.layer_norm(x, w, b, 1e-5, config=cfg),
               ops._layer_norm_reference(x, w, b, 1e-5))
        record("skip_layer_norm" + tag, dtype,
               N.skip_layer_norm(x, skip, None, b, 1e-5, config=cfg),
               ops._skip_layer_norm_reference(x, skip, None, b, 1e-5))
wide = randn(2, 3, 128, dtype=BF16)[..., :101]
for w in (randn(101, dtype=BF16), randn(101)):
    record(f"rms_norm strided rows {w.dtype} weight", BF16, N.rms_norm(wide, w, 1e-6),
           ops._rms_norm_reference(wide, w, 1e-6))
permuted = randn(3, 2, 101, dtype=F16).transpose(0, 1)  # no row view: a buffer, copied back
record("skip_rms_norm permuted rows", F16, N.skip_rms_norm(permuted, permuted, w, 1e-6),
       ops._skip_rms_norm_reference(permuted, permuted, w, 1e-6))

# rotary: both layouts, full and partial width, per-sequence and shared tables, x transposed
for i, dtype in enumerate((F32, F16, BF16)):
    for interleaved in (False, True):
        dim, half, tables = ((32, 16, 1), (64, 16, 2))[i % 2]
        x = randn(2, 5, 3, dim, dtype=dtype).transpose(1, 2)
        cos, sin = randn(tables, 5, half, dtype=dtype), randn(tables, 5, half, dtype=dtype)
        cfg = R.ROTARY_CONFIGS[1] if interleaved else None
        record(f"rotary interleaved={interleaved} D={dim}", dtype,
               R.rotary_embedding(x, cos, sin, interleaved, config=cfg),
               ops._rotary_embedding_reference(x, cos, sin, interleaved))

# glu over slices of one fused projection; gelu with and without bias, both forms
for i, activation in enumerate(ops.ACTIVATIONS):
    dtype = (F32, F16, BF16)[i % 3]
    fused = randn(3, 202, dtype=dtype) * 3
    gate, up = fused[:, :101], fused[:, 101:]
    cfg = G.ELEMENTWISE_CONFIGS[i % 4]
    record(f"glu {activation}", dtype, G.glu(gate, up, activation, config=cfg),
           ops._glu_reference(gate, up, activation))
for i, (approximate, with_bias) in enumerate([("none", True), ("tanh", True), ("none", False),
                                              ("tanh", False)]):
    dtype = (F16, BF16, F32, BF16)[i]
    x = randn(3, 101, dtype=dtype) * 3
    bias = randn(101, dtype=dtype) if with_bias else None
    record(f"gelu {approximate} bias={with_bias}", dtype, G.gelu(x, bias, approximate),
           ops._gelu_reference(x, bias, approximate))

# linear_act: cuBLAS GEMM then the activation in place; odd K and N, 3-D x, with and without bias
for i, activation in enumerate(ops.ACTIVATIONS):
    dtype = (F32, F16, BF16)[i % 3]
    x, w = randn(2, 3, 37, dtype=dtype), randn(53, 37, dtype=dtype) / 6
    bias = randn(53, dtype=dtype) if i % 2 == 0 else None
    record(f"linear_act {activation} bias={bias is not None}", dtype,
           linear_act(x, w, bias, activation, config=G.ELEMENTWISE_CONFIGS[i % 4]),
           ops._linear_act_reference(x, w, bias, activation))

# grouped_mm: 3 experts (one without tokens), odd K and N, 2 rows past the last offset, the
# stacked weight as a transposed view (transformers' [E, N, K] parameter), every config
for i, dtype in enumerate((F32, F16, BF16, BF16)):
    x, w = randn(23, 37, dtype=dtype), randn(3, 53, 37, dtype=dtype).transpose(1, 2) / 6
    offsets = torch.tensor([2, 2, 21], dtype=(torch.int32, torch.int64)[i % 2])
    record(f"grouped_mm config {i}", dtype,
           grouped_mm(x, w, offsets, config=GROUPED_MM_CONFIGS[i]),
           ops._grouped_mm_reference(x, w, offsets))

# attention: causal, padding and additive masks, GQA, cross lengths, head dims 16/32/64
def attention_case(name, dtype, b, h, hkv, s, sk, d, mask, causal, cfg):
    q = randn(b, s, h, d, dtype=dtype).transpose(1, 2)
    k, v = randn(b, hkv, sk, d, dtype=dtype), randn(b, hkv, sk, d, dtype=dtype)
    record(name, dtype, A.attention(q, k, v, mask, causal, 0.3, config=cfg),
           ops._attention_reference(q, k, v, mask, causal, 0.3))

padding = torch.ones(2, 1, 1, 33, dtype=torch.bool)
padding[0, ..., 29:] = False
attention_case("attention causal gqa", F32, 1, 4, 2, 33, 33, 16, None, True, SMALL)
attention_case("attention padding mask", F16, 2, 2, 1, 33, 33, 32, padding, False, SMALL)
attention_case("attention additive mask cross", BF16, 1, 2, 2, 7, 20, 64,
               randn(7, 20, dtype=BF16), False, SMALL)
attention_case("attention causal default config", BF16, 1, 4, 1, 7, 7, 64, None, True, None)

# attention_cache: decode (1 token) near the start and the end of the cache, a short prefill
# from empty and after a context, split or not, written in place or not
def cache_case(name, dtype, h, hkv, d, s, firsts, cfg, write, t=40):
    b = len(firsts)
    kc, vc = randn(b, hkv, t, d, dtype=dtype), randn(b, hkv, t, d, dtype=dtype)
    positions = torch.stack([torch.arange(p, p + s) for p in firsts])
    q = randn(b, s, h, d, dtype=dtype).transpose(1, 2)
    k, v = randn(b, hkv, s, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype)
    ref = ops._attention_cache_reference(q, k, v, kc, vc, positions, 0.2)
    kc_in, vc_in = kc.clone(), vc.clone()
    out = A.attention_cache(q, k, v, kc_in, vc_in, positions, 0.2, config=cfg, write_cache=write)
    slots = positions[:, None, :, None].expand_as(k)
    want = (kc.scatter(2, slots, k), vc.scatter(2, slots, v)) if write else (kc, vc)
    record(name, dtype, out, ref, torch.equal(kc_in, want[0]) and torch.equal(vc_in, want[1]))

SPLIT3 = {"block_m": 0, "block_n": 16, "num_splits": 3, "num_warps": 4, "num_stages": 1}
ONE = {"block_m": 16, "block_n": 16, "num_splits": 1, "num_warps": 4, "num_stages": 1}
cache_case("cache decode split gqa", BF16, 4, 2, 32, 1, [0, 17], SPLIT3, False)
cache_case("cache decode end written", F32, 4, 2, 32, 1, [33, 39], ONE, True)
cache_case("cache decode default gqa4", F16, 8, 2, 64, 1, [25], None, True)
cache_case("cache prefill empty", BF16, 4, 2, 16, 5, [0, 0], ONE, True)
cache_case("cache prefill after context split", F16, 2, 2, 16, 7, [20, 3], SPLIT3, False)
# prompts longer than a key block: whole blocks below the diagonal run without a mask
cache_case("cache prefill unmasked blocks", F32, 4, 2, 16, 37, [0, 0], ONE, True)
cache_case("cache prefill default config", BF16, 2, 1, 16, 70, [0], None, False, t=72)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results() -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", COMPARE], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LIMITS = {"torch.float32": 1e-5, "torch.float16": 5e-3, "torch.bfloat16": 1.5e-2}


def test_kernels_match_their_references(results):
    """Every launcher equals its reference within the dtype's tolerance (bf16 looser: the
    interpreter truncates fp32 to bf16 where the GPU rounds), returns the reference's shape,
    dtype and strides, and leaves or writes the caches as asked."""
    assert len(results) == 62
    bad = [r for r in results if not (r["err"] < LIMITS[r["dtype"]] and r["layout"] and r["ok"])]
    assert not bad, bad


def test_every_dtype_and_variant_ran(results):
    names = {r["name"] for r in results}
    for expected in ("rms_norm chunked", "rotary interleaved=True D=64", "glu silu",
                     "gelu tanh bias=True", "attention padding mask", "cache decode split gqa",
                     "cache prefill after context split",
                     "linear_act gelu_tanh bias=True"):  # fmt: skip
        assert expected in names
    for op in ("rms_norm", "skip_layer_norm", "rotary", "attention", "cache"):
        dtypes = {r["dtype"] for r in results if r["name"].startswith(op)}
        assert len(dtypes) == 3, (op, dtypes)


TEMPLATES = {
    "rms_norm": "triton/rms_norm",
    "skip_rms_norm": "triton/skip_rms_norm",
    "layer_norm": "triton/layer_norm",
    "skip_layer_norm": "triton/skip_layer_norm",
    "rotary_embedding": "triton/rotary_embedding",
    "glu": "triton/glu",
    "gelu": "triton/gelu",
    "linear_act": "triton/linear_act",
    "grouped_mm": "triton/grouped_mm",
    "attention": "triton/attention",
    "attention_cache": "triton/attention_cache",
}


@pytest.mark.parametrize("op", sorted(TEMPLATES))
def test_registered_with_kernels_and_configs(op):
    lowering = lowering_for(op, "triton")
    assert lowering is not None and lowering.label == TEMPLATES[op]
    assert lowering.stage == "emit" and lowering.why_not is not None
    fn = lowering.fn
    assert fn.kernels and all(type(k).__name__ == "JITFunction" for k in fn.kernels)
    assert len(fn.configs) >= 3 and all(isinstance(c, dict) for c in fn.configs)
    assert len({json.dumps(c, sort_keys=True) for c in fn.configs}) == len(fn.configs)


def node_of(op: str, *args):
    """A graph node calling peakc::<op> on placeholders whose values are the tensors given."""
    graph = fx.Graph()
    inputs = []
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            placeholder = graph.placeholder(f"a{i}")
            placeholder.meta["val"] = arg
            arg = placeholder
        inputs.append(arg)
    return graph.call_function(getattr(torch.ops.peakc, op).default, tuple(inputs))


def why_not(op: str, *args):
    node = node_of(op, *args)
    return lowering_for(op, "triton").why_not(node, node.graph, None)


def empty(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype)


def test_nodes_the_kernels_cover_are_accepted():
    assert why_not("rms_norm", empty(2, 8), empty(8, dtype=torch.float32), 1e-6) is None
    assert why_not("skip_layer_norm", empty(2, 8), empty(2, 8), None, empty(8), 1e-5) is None
    assert (
        why_not("rotary_embedding", empty(1, 2, 3, 8), empty(1, 3, 2), empty(1, 3, 2), True) is None
    )
    assert why_not("glu", empty(3, 8), empty(3, 8), "gelu_tanh") is None
    assert why_not("gelu", empty(3, 8), None, "tanh") is None
    assert why_not("linear_act", empty(3, 8), empty(5, 8), empty(5), "gelu") is None
    counts = torch.empty(3, dtype=torch.int32)
    assert why_not("grouped_mm", empty(6, 8), empty(3, 8, 5), counts) is None
    mask = empty(1, 1, 1, 5, dtype=torch.bool)
    assert why_not("attention", empty(1, 4, 3, 16), empty(1, 2, 5, 16), empty(1, 2, 5, 16), mask,
                   False, 0.25) is None  # fmt: skip
    cache = empty(1, 2, 9, 16)
    positions = torch.empty(1, 3, dtype=torch.int64)
    assert why_not("attention_cache", empty(1, 4, 3, 16), empty(1, 2, 3, 16), empty(1, 2, 3, 16),
                   cache, cache, positions, 0.25) is None  # fmt: skip


def test_nodes_outside_the_kernels_are_declined_with_a_reason():
    assert why_not("rms_norm", empty(2, 8, dtype=torch.int64), empty(8), 1e-6) == (
        "x is int64, not fp16/bf16/fp32"
    )
    assert why_not("layer_norm", empty(2, 8), empty(7), None, 1e-5) == "weight is not [8]"
    assert why_not("layer_norm", empty(2, 8), empty(8, dtype=torch.float32), None, 1e-5) == (
        "x, weight and bias differ in dtype"
    )
    assert "differ in dtype" in why_not(
        "rotary_embedding", empty(1, 2, 3, 8), empty(1, 3, 2, dtype=torch.float32),
        empty(1, 3, 2, dtype=torch.float32), False,
    )  # fmt: skip
    assert why_not("glu", empty(3, 8), empty(3, 8), "swish") == (
        "activation 'swish' has no kernel form"
    )
    assert why_not("gelu", empty(3, 8), empty(4), "none") == "bias is not [8]"
    assert why_not("linear_act", empty(3, 8), empty(5, 8), empty(4), "gelu") == "bias is not [5]"
    counts = torch.empty(3, dtype=torch.int32)
    assert why_not("grouped_mm", empty(6, 8), empty(3, 7, 5), counts) == (
        "x [6, 8] and weight [3, 7, 5] are not [T, K], [E, K, N]"
    )
    assert why_not("grouped_mm", empty(6, 8), empty(2, 8, 5), counts) == "3 offsets for 2 experts"
    assert why_not("grouped_mm", empty(6, 8), empty(3, 8, 5), counts.float()) == (
        "offsets are not a vector of int32/int64"
    )
    assert why_not("linear_act", empty(3, 8), empty(5, 7), None, "relu") == (
        "weight [5, 7] is not [N, 8]"
    )
    assert why_not("linear_act", empty(3, 8), empty(5, 8, dtype=torch.float32), None, "gelu") == (
        "x, weight and bias differ in dtype"
    )
    q, kv = empty(1, 3, 4, 16), empty(1, 2, 4, 16)
    assert why_not("attention", q, kv, kv, None, True, 0.25) == (
        "3 query heads do not group over 2 KV heads"
    )
    q = empty(1, 4, 4, 16)
    assert why_not("attention", q, kv, kv, empty(4, 4, dtype=torch.bool), True, 0.25) == (
        "both a mask and is_causal"
    )
    assert "does not broadcast" in why_not("attention", q, kv, kv, empty(3, 4), False, 0.25)
    cache = empty(1, 2, 9, 32)
    positions = torch.empty(1, 4, dtype=torch.int64)
    assert why_not("attention_cache", q, kv, kv, cache, cache, positions, 0.25) == (
        "q, k, v and the caches differ in head dim"
    )
