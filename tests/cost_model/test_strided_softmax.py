"""The strided class and row-width-aware softmax: graph decisions, sweep/estimate agreement,
and fits on synthetic measurements that predict widths and shapes they were not fed."""

import pytest
import torch
from torch import nn

from peakc.cost_model.estimate import estimate, node_device_time
from peakc.cost_model.fit import fit_class_curves
from peakc.cost_model.hardware import resolve_profile
from peakc.cost_model.op_costs import CostContext, OpCost, lane_padding, node_cost
from peakc.cost_model.op_sweeps import OpSample, case_bytes, op_cases
from peakc.ir import capture

BW, GAP = 3e12, 1e-6


class Rope(nn.Module):
    def forward(self, x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Wrap(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _costs(module, *inputs):
    graph = capture(module, inputs, name="t")
    return {n.name: node_cost(n, CostContext()) for n in graph.call_nodes()}, graph


def test_lane_padding_rounds_rows_to_power_of_two_lanes():
    assert lane_padding(1024) == 1.0
    assert lane_padding(1536) == pytest.approx(2048 / 1536)
    assert lane_padding(2560) == pytest.approx(4096 / 2560)
    assert lane_padding(5000) == pytest.approx(8192 / 5000)  # two passes of 4096 lanes


def test_rope_ops_read_strided_and_contiguous_ops_do_not():
    x, cos = torch.randn(1, 4, 16, 8), torch.randn(16, 8)
    costs, _ = _costs(Rope(), x, cos, cos)
    classes = {name: c.op_class for name, c in costs.items() if c.kind == "memory"}
    # mul by broadcast cos/sin, neg of a slice, cat of a slice along the last dim: strided;
    # the final add of two contiguous products: plain elementwise.
    assert classes == {
        "mul": "strided",
        "neg": "strided",
        "cat": "strided",
        "mul_1": "strided",
        "add": "elementwise",
    }
    a, b = torch.randn(6, 32), torch.randn(6, 32)
    costs, _ = _costs(Wrap(lambda a, b: torch.cat((a * b, torch.relu(a)), dim=0)), a, b)
    assert {c.op_class for c in costs.values() if c.kind == "memory"} == {"elementwise"}
    costs, _ = _costs(Wrap(lambda a, b: a.t() + b.t()), a, b)
    assert [c.op_class for c in costs.values() if c.kind == "memory"] == ["strided"]


def test_softmax_cost_keys_its_curve_by_row_width():
    costs, _ = _costs(Wrap(lambda x: torch.softmax(x, -1)), torch.randn(4, 3, 48))
    cost = next(c for c in costs.values() if c.op_class == "softmax")
    assert cost.padding == pytest.approx(64 / 48)
    assert cost.lane_bytes == pytest.approx(cost.bytes * 64 / 48)
    profile = resolve_profile("h100-sxm")
    profile.bandwidth_efficiency["softmax"] = [(1.0, 0.5)]
    profile.memory_bandwidth = BW
    wide = OpCost(0.0, 1e8, "memory", "bf16", op_class="softmax", padding=1.5)
    narrow = OpCost(0.0, 1e8, "memory", "bf16", op_class="softmax")
    assert node_device_time(wide, profile, 0)[0] == pytest.approx(
        1.5 * node_device_time(narrow, profile, 0)[0]
    )


def test_sweep_cases_are_costed_as_the_estimate_costs_them():
    """Bytes and class the calibration records for a case equal the estimate's for its graph."""
    cases = [c for c in op_cases("tiny") if c.op_class in ("strided", "softmax")]
    assert {c.label.split()[0] for c in cases} >= {"mul", "neg", "cat", "add", "softmax"}
    widths = {c.inputs[0][0][-1] for c in cases if c.op_class == "softmax"}
    assert len(widths) >= 2  # bytes and row width vary apart
    for case in cases:
        vocab = case.inputs[-1][0][0]
        inputs = tuple(
            torch.randn(s, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[d])
            for s, d in case.inputs
        )
        del vocab
        costs, _ = _costs(Wrap(case.fn), *inputs)
        work = [c for c in costs.values() if c.kind == "memory"]
        assert len(work) == 1, case.label
        assert work[0].op_class == case.op_class, case.label
        assert work[0].bytes == pytest.approx(case_bytes(case)), case.label
        assert work[0].padding == pytest.approx(case.padding), case.label


def _softmax_seconds(rows: int, width: int) -> float:
    """A device whose softmax streams lanes at 60% of bandwidth, plus one gap."""
    lane = rows * width * 4 * lane_padding(width)
    return GAP + lane / (0.6 * BW)


def test_fit_on_some_widths_predicts_an_unseen_width():
    samples = [
        OpSample("softmax", "s", r * w * 4.0, 0.0, 1, _softmax_seconds(r, w), lane_padding(w))
        for w in (384, 1536, 3072)
        for r in (300, 5000, 40000)
    ]
    curves, _ = fit_class_curves(samples, BW, GAP, 1e15)
    assert all(e == pytest.approx(0.6) for _, e in curves["softmax"])
    profile = resolve_profile("h100-sxm")
    profile.memory_bandwidth, profile.kernel_gap = BW, GAP
    profile.bandwidth_efficiency = curves
    x = torch.randn(1, 4, 100, 2560, dtype=torch.bfloat16)
    graph = capture(Wrap(lambda x: torch.softmax(x, -1)), (x,), name="s")
    # 400 rows 2560 wide (a width never swept): predicted from lanes, not from nominal bytes.
    est = estimate(graph, profile, runtime="graph")
    assert est.total_time == pytest.approx(_softmax_seconds(400, 2560))
    assert est.total_time - GAP > 1.5 * 400 * 2560 * 4 / (0.6 * BW)


def test_strided_curve_fits_apart_from_elementwise():
    samples = []
    for nbytes in (1e6, 1e7, 1e8):
        samples.append(OpSample("elementwise", "add", nbytes, 0.0, 1, GAP + nbytes / (0.9 * BW)))
        samples.append(OpSample("strided", "neg", nbytes, 0.0, 1, GAP + nbytes / (0.45 * BW)))
    curves, _ = fit_class_curves(samples, BW, GAP, 1e15)
    assert all(e == pytest.approx(0.45) for _, e in curves["strided"])
    assert all(e == pytest.approx(0.9) for _, e in curves["elementwise"])
    profile = resolve_profile("h100-sxm")
    profile.validate()  # the built-in profile carries a strided curve
    assert "strided" in profile.bandwidth_efficiency
