"""Calibration on CPU with the tiny sweep: a valid profile whose figures were measured."""

import json

import pytest

from peakc.cli import main
from peakc.cost_model.calibrate import calibrate, fit_curve
from peakc.cost_model.hardware import HardwareProfile


@pytest.fixture(scope="module")
def tiny_profile():
    return calibrate("cpu", tiny=True, progress=False)


def test_tiny_calibration_is_a_valid_measured_profile(tiny_profile, tmp_path):
    p = tiny_profile
    p.validate()
    assert set(p.peak_flops) == {"fp32"}
    assert 1e8 < p.peak_flops["fp32"] < 1e14
    assert 1e8 < p.memory_bandwidth < 1e13
    assert 0 < p.launch_overhead < 1e-2
    assert set(p.launch_overhead_by_kind) == {"memory", "gemm", "attention"}
    assert not p.asynchronous_launch
    assert all(0 < e <= 1 for _, e in p.gemm_efficiency)
    assert all(0 < e <= 1.5 for _, e in p.copy_efficiency)
    assert {"elementwise", "reduction", "softmax", "norm", "gather", "attention", "gemm"} <= set(
        p.bandwidth_efficiency
    )
    assert 0 < p.kernel_gap < 1e-3
    assert "measured on cpu" in p.sources["memory_bandwidth"]
    p.save(tmp_path / "p.json")
    assert HardwareProfile.load(tmp_path / "p.json") == p


def test_fit_curve_bins_and_orders():
    curve = fit_curve([(1e3, 0.1), (1.2e3, 0.3), (1e6, 0.9), (1e5, 0.5)])
    assert [s for s, _ in curve] == sorted(s for s, _ in curve)
    assert curve[0][1] == pytest.approx(0.2)
    assert curve[-1] == (1e6, 0.9)


def test_calibrate_cli_tiny(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["calibrate", "--tiny", "--device", "cpu", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["name"].startswith("calibrated-cpu")
    assert main(["estimate", "demo:mlp", "--target", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == data["name"]
