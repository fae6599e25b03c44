"""GPTQ batched over experts (compress_moe's solver) against the per-layer GPTQ loop: same
codes, grids and weights within float tolerance, for every grid mode, dead columns and a
Hessian that needs more damping."""

import pytest
import torch

from peakc.passes.moe_experts import TernarySpec
from peakc.passes.quantize.gptq import gptq_quantize, gptq_quantize_batched
from peakc.passes.quantize.grid import GridSpec


def _experts(batch=4, rows=24, cols=80, seed=0):
    """Weights and Hessians of `batch` experts, each from its own (scaled) inputs."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, rows, cols, generator=gen)
    x = torch.randn(batch, 160, cols, generator=gen) * torch.rand(batch, 1, cols, generator=gen)
    h = 2 * x.transpose(1, 2) @ x / 160
    h[1, 5, :] = h[1, :, 5] = 0  # a column expert 1 never saw: dead
    w[2, :3, :7] = 0  # exact zeros (pruned) stay zero
    return w, h


@pytest.mark.parametrize(
    "spec, static, act_order",
    [
        (TernarySpec(2, 80, True), True, True),  # compress_moe's grid
        (GridSpec(4, 16, False), True, True),  # static groups gathered per act-order column
        (GridSpec(4, 16, False), False, True),  # grids fitted during the walk, g_idx per expert
        (GridSpec(3, 32, True), False, False),
    ],
)
def test_batched_gptq_equals_the_per_expert_loop(spec, static, act_order):
    w, h = _experts()
    batched = gptq_quantize_batched(
        w, h, spec, block_size=32, act_order=act_order, static_groups=static
    )
    assert [q.kernel for q in batched] == ["batched"] * 4
    for b, q in enumerate(batched):
        one = gptq_quantize(
            w[b], h[b], spec, block_size=32, act_order=act_order, static_groups=static,
            kernel="torch",
        )  # fmt: skip
        assert torch.equal(q.ints, one.ints)
        torch.testing.assert_close(q.dequantized, one.dequantized, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.scales, one.scales)
        torch.testing.assert_close(q.zeros, one.zeros)
        if one.g_idx is None:
            assert q.g_idx is None
        else:
            assert torch.equal(q.g_idx, one.g_idx)
    assert (batched[2].dequantized[:3, :7] == 0).all()
    assert (batched[1].dequantized[:, 5] == 0).all()


def test_a_hessian_needing_more_damping_is_retried_alone():
    w, h = _experts(batch=3, cols=32)
    h[0] = -torch.eye(32)  # not positive definite at any small damping of its mean diagonal
    h[0, 0, 0] = 40.0
    with pytest.warns(UserWarning, match=r"Hessian of expert0 is not positive definite"):
        batched = gptq_quantize_batched(
            w, h, TernarySpec(2, 32, True), layers=["expert0", "expert1", "expert2"]
        )
    with pytest.warns(UserWarning):
        alone = gptq_quantize(w[0], h[0], TernarySpec(2, 32, True), kernel="torch")
    assert torch.equal(batched[0].ints, alone.ints)
    other = gptq_quantize(w[1], h[1], TernarySpec(2, 32, True), kernel="torch")
    assert torch.equal(batched[1].ints, other.ints)
