"""Calibration fits on synthetic measurements: the fitted profile predicts what it was fed."""

import pytest

from peakc.cost_model.estimate import kernel_time, node_device_time
from peakc.cost_model.fit import fit_class_curves, fit_gemms, work_seconds
from peakc.cost_model.hardware import resolve_profile
from peakc.cost_model.op_costs import OpCost
from peakc.cost_model.op_sweeps import OpSample

BW, PEAK, GAP = 3e12, 800e12, 2e-6


def synthetic_gemm(m, k, n):
    """A device whose GEMMs reach 80% of bandwidth or 60% of peak, plus one gap."""
    flops, moved = 2.0 * m * n * k, 2.0 * (m * k + n * k + m * n)
    return flops, moved, GAP + max(flops / (0.6 * PEAK), moved / (0.8 * BW))


def test_fit_gemms_splits_at_the_ridge_and_removes_the_gap():
    rows = [synthetic_gemm(m, 3072, 8192) for m in (2, 8, 64, 1024, 4096, 8192)]
    peak, curve, memory = fit_gemms(rows, BW, GAP)
    assert peak == pytest.approx(0.6 * PEAK, rel=1e-6)  # the best achieved rate
    assert all(e == pytest.approx(1.0) for _, e in curve)  # every compute sample at that peak
    assert len(memory) == 3 and all(e == pytest.approx(0.8) for _, e in memory)


def test_work_seconds_never_below_a_share_of_the_measurement():
    assert work_seconds(10e-6, 2, GAP) == pytest.approx(6e-6)
    assert work_seconds(3e-6, 2, GAP) == pytest.approx(0.3e-6)


def test_class_curves_recover_per_class_efficiency():
    samples = []
    for nbytes in (1e6, 1e7, 1e8, 1e9):
        for cls, eff, kernels in (("elementwise", 0.9, 1), ("softmax", 0.55, 1), ("norm", 0.6, 2)):
            samples.append(
                OpSample(cls, cls, nbytes, 0.0, kernels, kernels * GAP + nbytes / (eff * BW))
            )
    for flops in (1e9, 1e10, 1e11):
        samples.append(
            OpSample("attention_prefill", "attn", 1e6, flops, 1, GAP + flops / (0.4 * PEAK))
        )
    curves, attn = fit_class_curves(samples, BW, GAP, PEAK)
    assert set(curves) == {"elementwise", "softmax", "norm"}
    for cls, eff in (("elementwise", 0.9), ("softmax", 0.55), ("norm", 0.6)):
        assert all(e == pytest.approx(eff) for _, e in curves[cls])
    assert all(e == pytest.approx(0.4) for _, e in attn)

    # The profile built from these curves predicts the samples it was fitted on.
    profile = resolve_profile("h100-sxm")
    profile.memory_bandwidth, profile.kernel_gap = BW, GAP
    profile.bandwidth_efficiency = curves
    for s in samples[:12]:
        cost = OpCost(0.0, s.bytes, "memory", "bf16", op_class=s.op_class)
        assert node_device_time(cost, profile, s.kernels)[0] == pytest.approx(s.seconds)
    softmax = OpCost(0.0, 1e7, "memory", "bf16", op_class="softmax")
    copy = OpCost(0.0, 1e7, "memory", "bf16", op_class="elementwise")
    assert kernel_time(softmax, profile)[0] == pytest.approx(
        kernel_time(copy, profile)[0] * 0.9 / 0.55
    )
