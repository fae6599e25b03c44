"""The low-bit kernels' cost curves are what benchmarks/lowbit_curves.py fits from the
committed measurements, byte for byte (so nobody edits them by hand), and the profiles use them."""

import subprocess
import sys
from pathlib import Path

from peakc.cost_model.hardware import resolve_profile
from peakc.cost_model.lowbit_curves import LOWBIT_CURVES

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def test_committed_curves_are_the_fit_of_the_committed_results(tmp_path):
    out = tmp_path / "lowbit_curves.py"
    files = [RESULTS / "lowbit_kernels.json", RESULTS / "lowbit_kernels_partial.json"]
    script = ROOT / "benchmarks" / "lowbit_curves.py"
    command = [sys.executable, str(script), *map(str, files), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    committed = ROOT / "peakc" / "cost_model" / "lowbit_curves.py"
    assert out.read_text() == committed.read_text()


def test_gpu_profiles_price_the_kernels_with_the_fitted_curves():
    profile = resolve_profile("h200")
    for name, curve in LOWBIT_CURVES.items():
        assert profile.bandwidth_efficiency[name] == curve
        assert all(0 < e <= 1 for _, e in curve)
        assert [s for s, _ in curve] == sorted(s for s, _ in curve)
