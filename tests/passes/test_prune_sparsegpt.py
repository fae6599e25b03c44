"""SparseGPT and magnitude pruning on single layers: exactness, the paper's loop, errors."""

import warnings

import pytest
import torch

from peakc.passes.compress import reconstruction_error
from peakc.passes.prune.magnitude import magnitude_prune
from peakc.passes.prune.pattern import Pattern, parse_pattern
from peakc.passes.prune.sparsegpt import (
    Segment,
    _masked_errors_batched,
    _masked_errors_by_column,
    inverse_hessian_factor,
    sparsegpt_prune,
)


def correlated_hessian(cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(400, cols // 2, generator=gen) @ torch.randn(cols // 2, cols, generator=gen)
    x += 0.1 * torch.randn(400, cols, generator=gen)
    return 2 * x.T @ x / 400


def paper_loop(w, h, sparsity, pattern, bs, damp):
    """SparseGPT's column-by-column loop, written plainly, as the reference."""
    u, dead = inverse_hessian_factor(h, damp, "ref")
    w = w.clone().float()
    w[:, dead] = 0
    rows, cols = w.shape
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        q1, e1 = torch.zeros_like(w1), torch.zeros_like(w1)
        mask = torch.zeros_like(w1, dtype=torch.bool)
        if not pattern.structured:
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            score = w1**2 / torch.diag(u1).reshape(1, -1) ** 2
            mask.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                score = w1[:, i : i + pattern.m] ** 2 / torch.diag(u1)[i : i + pattern.m] ** 2
                drop = torch.topk(score, pattern.m - pattern.n, dim=1, largest=False).indices
                mask.scatter_(1, i + drop, True)
            q = w1[:, i].clone()
            q[mask[:, i]] = 0
            err = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            q1[:, i], e1[:, i] = q, err
        w[:, i1:i2] = q1
        w[:, i2:] -= e1 @ u[i1:i2, i2:]
    return w


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_matches_the_papers_column_loop(pattern):
    pat = parse_pattern(pattern)
    h = correlated_hessian(72)
    w = torch.randn(20, 72, generator=torch.Generator().manual_seed(1))
    ours = sparsegpt_prune(w, h, [Segment(0, 20, 0.5)], pat, block_size=32)
    ref = paper_loop(w, h, 0.5, pat, 32, 0.01)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_exact_unstructured_sparsity_with_ragged_blocks(sparsity):
    h = correlated_hessian(70)
    w = torch.randn(13, 70, generator=torch.Generator().manual_seed(2))
    out = sparsegpt_prune(w, h, [Segment(0, 13, sparsity)], Pattern(), block_size=32)
    assert int((out == 0).sum()) == round(sparsity * w.numel())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_exact_n_m_on_every_group(pattern):
    pat = parse_pattern(pattern)
    h = correlated_hessian(72)
    w = torch.randn(11, 72, generator=torch.Generator().manual_seed(3))
    for out in (
        sparsegpt_prune(w, h, [Segment(0, 11, 0.0)], pat, block_size=48),
        magnitude_prune(w, 0.0, pat),
    ):
        groups = out.view(11, 72 // pat.m, pat.m)
        assert ((groups != 0).sum(-1) == pat.n).all()


def test_segments_prune_each_stacked_layer_exactly():
    h = correlated_hessian(64)
    w = torch.randn(30, 64, generator=torch.Generator().manual_seed(4))
    segs = [Segment(0, 10, 0.5), Segment(10, 30, 0.25)]
    out = sparsegpt_prune(w, h, segs, Pattern(), block_size=16)
    assert int((out[:10] == 0).sum()) == 320
    assert int((out[10:] == 0).sum()) == 320


def test_sparsegpt_reconstructs_better_than_magnitude():
    h = correlated_hessian(96)
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(5))
    for pattern in (Pattern(), Pattern(2, 4)):
        sgpt = sparsegpt_prune(w, h, [Segment(0, 32, 0.5)], pattern, block_size=32)
        mag = magnitude_prune(w, 0.5, pattern)
        assert reconstruction_error(w, sgpt, h) < 0.5 * reconstruction_error(w, mag, h)


def test_magnitude_exact_count_and_keeps_largest():
    w = torch.randn(9, 31, generator=torch.Generator().manual_seed(6))
    out = magnitude_prune(w, 0.4, Pattern())
    assert int((out == 0).sum()) == round(0.4 * w.numel())
    assert out[out != 0].abs().min() >= w[out == 0].abs().max()


def test_singular_hessian_raises_damping_with_a_warning_never_nan():
    x = torch.randn(50, 8)
    x = torch.cat([x, x], dim=1)  # duplicated inputs: rank 8 of 16
    h = 2 * x.T @ x / 50
    w = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sparsegpt_prune(w, h, [Segment(0, 4, 0.5)], Pattern(), 8, damp=0.0, layer="blk.q")
    assert any("blk.q" in str(c.message) and "damp" in str(c.message) for c in caught)
    assert torch.isfinite(out).all()


def test_dead_inputs_are_zeroed_not_nan():
    h = correlated_hessian(16)
    h[3, :] = 0
    h[:, 3] = 0
    out = sparsegpt_prune(torch.randn(4, 16), h, [Segment(0, 4, 0.5)], Pattern(), 8)
    assert torch.isfinite(out).all() and (out[:, 3] == 0).all()


def test_batched_solve_equals_column_substitution():
    u, _ = inverse_hessian_factor(correlated_hessian(24), 0.01, "x")
    w = torch.randn(10, 24, generator=torch.Generator().manual_seed(8))
    mask = torch.rand(10, 24, generator=torch.Generator().manual_seed(9)) < 0.5
    torch.testing.assert_close(
        _masked_errors_batched(mask, w, u),
        _masked_errors_by_column(mask, w, u),
        atol=1e-5,
        rtol=1e-4,
    )
