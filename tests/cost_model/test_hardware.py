"""HardwareProfile: JSON round trip, bad profiles, target resolution."""

import json

import pytest

from peakc.cost_model.hardware import (
    BUILTIN_PROFILES,
    HardwareProfile,
    efficiency_at,
    resolve_profile,
)
from peakc.errors import PeakcError


@pytest.mark.parametrize("name", ["h100-sxm", "h200", "a100-80gb", "cpu"])
def test_builtin_profiles_round_trip(tmp_path, name):
    profile = resolve_profile(name)
    profile.validate()
    assert profile.sources, f"{name} must say where its figures came from"
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = HardwareProfile.load(path)
    assert loaded == profile
    assert resolve_profile(str(path)) == profile


def test_resolve_returns_a_copy():
    profile = resolve_profile("h100-sxm")
    profile.peak_flops["bf16"] = 1.0
    assert BUILTIN_PROFILES["h100-sxm"].peak_flops["bf16"] == 989e12


def _data():
    return json.loads(resolve_profile("h100-sxm").to_json())


def test_missing_figure_is_named(tmp_path):
    data = _data()
    del data["memory_bandwidth"]
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(PeakcError, match="missing figure 'memory_bandwidth'"):
        HardwareProfile.load(tmp_path / "p.json")


@pytest.mark.parametrize(
    "key,value",
    [("launch_overhead", 0), ("disk_read_bandwidth", -1.0), ("h2d_bandwidth_pinned", "fast")],
)
def test_non_positive_figure_is_named(key, value):
    data = _data()
    data[key] = value
    with pytest.raises(PeakcError, match=f"'{key}' must be a positive number"):
        HardwareProfile.from_dict(data, origin="x.json")


def test_non_positive_peak_and_bad_curve():
    data = _data()
    data["peak_flops"]["bf16"] = 0
    with pytest.raises(PeakcError, match="peak_flops.bf16"):
        HardwareProfile.from_dict(data)
    data = _data()
    data["copy_efficiency"] = [[1e6, 0.5], [1e3, 0.9]]
    with pytest.raises(PeakcError, match="copy_efficiency' sizes must be strictly increasing"):
        HardwareProfile.from_dict(data)
    data = _data()
    data["gemm_efficiency"] = "steep"
    with pytest.raises(PeakcError, match="gemm_efficiency"):
        HardwareProfile.from_dict(data)


def test_unknown_field_and_bad_json(tmp_path):
    data = _data()
    data["warp_speed"] = 9
    with pytest.raises(PeakcError, match="unknown field 'warp_speed'"):
        HardwareProfile.from_dict(data)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PeakcError, match="not valid JSON"):
        HardwareProfile.load(tmp_path / "bad.json")
    with pytest.raises(PeakcError, match="profile file not found"):
        resolve_profile(str(tmp_path / "absent.json"))


def test_unknown_target():
    with pytest.raises(PeakcError, match="unknown target 'tpu-v9'"):
        resolve_profile("tpu-v9")


def test_efficiency_curve_interpolates_in_log_size():
    curve = [(1e3, 0.1), (1e5, 0.5)]
    assert efficiency_at(curve, 1e2) == pytest.approx(0.01)  # below: the first point's time
    assert efficiency_at(curve, 1e9) == 0.5
    assert efficiency_at(curve, 1e4) == pytest.approx(0.3)
