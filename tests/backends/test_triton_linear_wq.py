"""The Triton linear_wq kernels against the op's reference, on CPU under TRITON_INTERPRET=1
(run once in a fresh interpreter by the `compressed_kernel_results` fixture, cases in
triton_compressed_cases.py); the repack's round trip and its refusals in this process.
"""

import pytest
import torch

from peakc.errors import PeakcError
from peakc.ir.ops import dequantize_weight, pack_bits

pytest.importorskip("triton")

from peakc.backends.triton.kernels.linear_wq import (  # noqa: E402
    dequantize_repacked,
    repack_linear_wq,
    unpack_linear_wq,
)


def test_kernels_match_the_reference(compressed_kernel_results):
    """Every layout x M = 1, 3, 17, 64, both the M bucket's kernel and another (split K summed
    by the last split, from partials or by atomics; sums corrected per group or weights
    dequantized in registers; dequantize + matmul); fp16 and bf16 alternate. bf16 tolerates
    more: the interpreter truncates float32 to bf16 (the GPU rounds to nearest), and bf16
    outputs carry their own rounding. (The CUDA path converts codes with inline PTX, which the
    interpreter cannot run: benchmarks/lowbit_kernels.py checks it on the GPU.)"""
    layouts = compressed_kernel_results["wq_layouts"]
    results = compressed_kernel_results["linear_wq"]
    assert len(results) == 2 * len(layouts) * len(compressed_kernel_results["rows"])
    assert {r["kernel"] for r in results} == {"fused", "dequant"}
    assert {r["reduction"] for r in results} == {"serial", "partials", "atomic"}
    assert {r["affine"] for r in results} == {True, False}
    for r in results:
        bits, gs, act_order, sym, n, k = layouts[r["layout"]]
        assert r["shape"] == [r["m"], n] and r["out_dtype"] == r["dtype"], r
        limit = 2e-3 if r["dtype"] == "torch.float16" else 1.5e-2
        assert r["err"] < limit, (layouts[r["layout"]], r)


def test_serial_reduction_leaves_its_counters_zeroed(compressed_kernel_results):
    """Every split-K launch above shared one counter buffer; the last split of each tile reset
    its counter, so the buffer needs no zeroing between launches."""
    assert compressed_kernel_results["wq_counters"] == {"devices": 1, "nonzero": 0}


def _random_layer(bits, gs, n, k, act_order, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // gs)
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    z = torch.randint(0, 2**bits, (n, groups), generator=gen)
    s = torch.rand(n, groups, generator=gen).to(torch.bfloat16)
    g_idx = None
    if act_order:
        g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).to(torch.int32)
    return pack_bits(q, bits), s, pack_bits(z, bits), g_idx


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "gs, k, act_order", [(32, 128, False), (128, 256, False), (40, 40, False), (16, 72, True)]
)
def test_repack_round_trips(bits, gs, k, act_order):
    args = _random_layer(bits, gs, 24, k, act_order)
    packed = repack_linear_wq(*args, bits, gs, k)
    assert packed.k_padded % packed.block_columns == 0 and packed.k_padded >= k
    assert packed.qweight.dtype == torch.int16
    assert packed.qweight.shape == (packed.k_padded // packed.block_columns, 24, packed.slot)
    assert packed.scales.shape[0] == -(-packed.k_padded // packed.group)
    assert (packed.perm is not None) == act_order
    assert all(t.is_contiguous() for t in (packed.qweight, packed.scales, packed.zeros))
    qweight, scales, qzeros, g_idx = unpack_linear_wq(packed)
    assert torch.equal(qweight, args[0]) and torch.equal(scales, args[1])
    assert torch.equal(qzeros, args[2])
    if act_order:
        assert torch.equal(g_idx, args[3])
    expected = dequantize_weight(*args, bits, gs, k)
    assert torch.equal(dequantize_repacked(packed), expected)


def test_repack_takes_gptq_act_order_output():
    """A real GPTQ layer (act-order, dynamic groups) repacks and round trips."""
    from peakc.passes.quantize.gptq import gptq_quantize
    from peakc.passes.quantize.grid import GridSpec
    from peakc.passes.quantize.rewrite import pack_layer

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=gen)
    x = torch.randn(128, 64, generator=gen) * torch.linspace(0.2, 3.0, 64)
    spec = GridSpec(4, 16, False)
    q = gptq_quantize(w, 2 * x.T @ x / 128, spec, act_order=True, static_groups=False)
    layer = pack_layer(q, 4, 16, torch.float16)
    args = (layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4, 16, 64)
    packed = repack_linear_wq(*args)
    assert packed.perm is not None
    assert torch.equal(dequantize_repacked(packed), dequantize_weight(*args))


def test_repack_refuses_uncovered_layouts():
    args = _random_layer(4, 32, 8, 64, False)
    with pytest.raises(PeakcError, match="layers.0.q: 3-bit"):
        repack_linear_wq(*args, 3, 32, 64, name="layers.0.q")
    uneven = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)
    with pytest.raises(PeakcError, match="not 32 columns each"):
        repack_linear_wq(args[0], args[1], args[2], uneven, 4, 32, 64)
    args = _random_layer(4, 24, 8, 48, False)
    with pytest.raises(PeakcError, match="group size 24"):
        repack_linear_wq(*args, 4, 24, 48)
    args = _random_layer(4, 8, 8, 48, False)
    with pytest.raises(PeakcError, match="group size 8 is not a power of two >= 16"):
        repack_linear_wq(*args, 4, 8, 48)


def test_repacked_layout_places_codes_in_slots():
    """Element (b, n, i) of an int4 weight holds columns b*128 + c*32 + i in its four 4-bit
    fields, lowest first: each field of a block's tile is a run of 32 contiguous columns."""
    k, n = 256, 2
    q = (torch.arange(k) % 16).repeat(n, 1)
    q[1] = 15 - q[1]
    args = (pack_bits(q, 4), torch.ones(n, 1), pack_bits(torch.zeros(n, 1), 4), None)
    packed = repack_linear_wq(*args, 4, k, k)
    assert packed.slot == 32 and packed.block_columns == 128
    element = int(packed.qweight[1, 1, 5]) & 0xFFFF
    fields = [(element >> (4 * c)) & 15 for c in range(4)]
    assert fields == [int(q[1, 128 + c * 32 + 5]) for c in range(4)]
