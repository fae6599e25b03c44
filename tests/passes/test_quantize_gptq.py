import pytest
import torch

from peakc.ir.ops import pack_bits
from peakc.passes.quantize.gptq import gptq_quantize, rtn_quantize
from peakc.passes.quantize.grid import GridSpec


def _correlated(k=96, n=24, tokens=2048, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * 0.3 + torch.eye(k)
    scale = torch.linspace(0.2, 3.0, k)  # uneven input scales make act-order matter
    x = (torch.randn(tokens, k, generator=gen) @ mix) * scale
    w = torch.randn(n, k, generator=gen)
    return x, w, 2 * x.T @ x / tokens


def _output_error(x, w, dq):
    return float(((x @ (w - dq).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def _on_grid(q, spec):
    """Every dequantized value is (integer in [0, maxq] - zero) * scale of its group."""
    assert q.ints.min() >= 0 and q.ints.max() <= spec.maxq
    assert torch.equal(q.ints, q.ints.round()) and torch.equal(q.zeros, q.zeros.round())
    cols = q.ints.shape[1]
    g = q.g_idx.long() if q.g_idx is not None else torch.arange(cols) // spec.group_size
    s, z = q.scales[:, g], q.zeros[:, g]
    torch.testing.assert_close(q.dequantized, (q.ints - z) * s, rtol=0, atol=1e-6)
    codes = q.dequantized / s + z
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [96, 32, 40])
@pytest.mark.parametrize("sym", [False, True])
def test_every_value_lies_on_its_group_grid(bits, group_size, sym):
    x, w, h = _correlated()
    spec = GridSpec(bits, group_size, sym)
    _on_grid(rtn_quantize(w, spec), spec)
    for act_order, static in [(False, False), (True, True), (True, False)]:
        _on_grid(gptq_quantize(w, h, spec, act_order=act_order, static_groups=static), spec)


@pytest.mark.parametrize("bits,group_size", [(3, 96), (4, 96), (4, 32), (2, 32)])
def test_gptq_layer_error_is_below_rtn_on_correlated_inputs(bits, group_size):
    x, w, h = _correlated()
    spec = GridSpec(bits, group_size, False)
    rtn = _output_error(x, w, rtn_quantize(w, spec).dequantized)
    for act_order in (False, True):
        q = gptq_quantize(w, h, spec, act_order=act_order, static_groups=True, block_size=32)
        assert _output_error(x, w, q.dequantized) < 0.8 * rtn


def test_act_order_with_static_groups_needs_no_permutation():
    x, w, h = _correlated()
    bits, gs = 4, 32
    q = gptq_quantize(w, h, GridSpec(bits, gs, False), act_order=True, static_groups=True)
    assert q.g_idx is None
    plain = torch.ops.peakc.linear_wq(
        x, pack_bits(q.ints, bits), q.scales, pack_bits(q.zeros, bits), None, None, bits, gs, 96
    )
    # the same layer stored in act-order (columns permuted, a group index per column)
    perm = torch.argsort(torch.diagonal(h), descending=True)
    permuted = torch.ops.peakc.linear_wq(
        x[:, perm],
        pack_bits(q.ints[:, perm], bits),
        q.scales,
        pack_bits(q.zeros, bits),
        (perm // gs).to(torch.int32),
        None,
        bits,
        gs,
        96,
    )
    torch.testing.assert_close(plain, permuted, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain, x @ q.dequantized.T, rtol=1e-5, atol=1e-4)


def test_act_order_without_static_groups_carries_a_group_index():
    x, w, h = _correlated()
    q = gptq_quantize(w, h, GridSpec(4, 32, False), act_order=True, static_groups=False)
    assert q.g_idx is not None and q.g_idx.dtype == torch.int32
    assert torch.bincount(q.g_idx.long()).tolist() == [32, 32, 32]
    out = torch.ops.peakc.linear_wq(
        x, pack_bits(q.ints, 4), q.scales, pack_bits(q.zeros, 4), q.g_idx, None, 4, 32, 96
    )
    torch.testing.assert_close(out, x @ q.dequantized.T, rtol=1e-5, atol=1e-4)


def test_gptq_keeps_zeros_of_a_pruned_layer():
    x, w, h = _correlated()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    w = w.masked_fill(mask, 0.0)
    q = gptq_quantize(w, h, GridSpec(4, 32, False))
    assert torch.equal(q.dequantized[mask], torch.zeros(int(mask.sum())))
    assert bool((q.dequantized[~mask] != 0).float().mean() > 0.9)


@pytest.mark.parametrize("block_size", [128, 32, 40])
def test_per_channel_grid_fitted_in_the_walk_is_the_static_one(block_size):
    """Per channel, the only group starts at column 0, before any update: fitting it during
    the walk or up front gives the same layer, whatever the blocks."""
    x, w, h = _correlated()
    spec = GridSpec(4, 96, False)
    a = gptq_quantize(w, h, spec, static_groups=False, block_size=block_size)
    b = gptq_quantize(w, h, spec, static_groups=True, block_size=block_size)
    assert torch.equal(a.ints, b.ints) and torch.equal(a.scales, b.scales)
    torch.testing.assert_close(a.dequantized, b.dequantized, rtol=0, atol=1e-6)
