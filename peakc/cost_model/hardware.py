"""HardwareProfile: the figures every placement and fusion decision reads.

Built-in profiles cite where each figure came from. Profiles load and save as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peakc.errors import PeakcError


@dataclass
class HardwareProfile:
    name: str
    peak_flops: dict[str, float]  # FLOP/s by dtype: fp32, tf32, bf16, fp16, int8, fp8
    memory_bandwidth: float  # bytes/s, device memory
    h2d_bandwidth_pinned: float  # bytes/s
    h2d_bandwidth_pageable: float
    d2h_bandwidth_pinned: float
    d2h_bandwidth_pageable: float
    disk_read_bandwidth: float  # bytes/s
    memory_capacity: dict[str, float]  # bytes by tier: device, host, disk
    launch_overhead: float  # seconds per kernel
    # Efficiency curves: (size, fraction of peak) points, interpolated in log(size).
    gemm_efficiency: list[tuple[float, float]] = field(default_factory=lambda: [(1.0, 1.0)])
    copy_efficiency: list[tuple[float, float]] = field(default_factory=lambda: [(1.0, 1.0)])
    sources: dict[str, str] = field(default_factory=dict)

    def validate(self, origin: str = "") -> None:
        where = f"profile {origin or self.name}"
        for key in ("memory_bandwidth", "h2d_bandwidth_pinned", "h2d_bandwidth_pageable",
                    "d2h_bandwidth_pinned", "d2h_bandwidth_pageable", "disk_read_bandwidth",
                    "launch_overhead"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value <= 0:
                raise PeakcError(f"{where}: '{key}' must be a positive number, got {value!r}")
        if not self.peak_flops:
            raise PeakcError(f"{where}: 'peak_flops' is empty")
        for table in ("peak_flops", "memory_capacity"):
            for k, v in getattr(self, table).items():
                if not isinstance(v, (int, float)) or v <= 0:
                    raise PeakcError(f"{where}: '{table}.{k}' must be positive, got {v!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "") -> HardwareProfile:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise PeakcError(f"profile {origin}: missing figure '{missing[0]}'")
        unknown = sorted(set(data) - names)
        if unknown:
            raise PeakcError(f"profile {origin}: unknown field '{unknown[0]}'")
        profile = cls(**data)
        profile.gemm_efficiency = [tuple(p) for p in profile.gemm_efficiency]
        profile.copy_efficiency = [tuple(p) for p in profile.copy_efficiency]
        profile.validate(origin)
        return profile

    @classmethod
    def load(cls, path: str | Path) -> HardwareProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PeakcError(f"profile file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise PeakcError(f"profile {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, origin=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())


GB = 1e9
GiB = 2**30
TB = 1e12
DATASHEET_H100 = "NVIDIA H100 SXM datasheet (dense, no sparsity)"


def _builtin() -> dict[str, HardwareProfile]:
    return {
        "h100-sxm": HardwareProfile(
            name="h100-sxm",
            peak_flops={"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12,
                        "int8": 1979e12, "fp8": 1979e12},
            memory_bandwidth=3.35 * TB,
            h2d_bandwidth_pinned=55 * GB, h2d_bandwidth_pageable=20 * GB,
            d2h_bandwidth_pinned=55 * GB, d2h_bandwidth_pageable=20 * GB,
            disk_read_bandwidth=2 * GB,
            memory_capacity={"device": 80 * GiB, "host": 128 * GiB, "disk": 64 * GiB},
            launch_overhead=4e-6,
            gemm_efficiency=[(1e6, 0.05), (1e9, 0.5), (1e11, 0.8), (1e13, 0.85)],
            copy_efficiency=[(1e4, 0.02), (1e6, 0.3), (1e8, 0.85), (1e10, 0.9)],
            sources={"peak_flops": DATASHEET_H100, "memory_bandwidth": DATASHEET_H100,
                     "h2d_bandwidth_pinned": "PCIe Gen5 x16 datasheet",
                     "efficiency curves": "estimated, refine with `peakc calibrate`"},
        ),
        "h200": HardwareProfile(
            name="h200",
            peak_flops={"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12,
                        "int8": 1979e12, "fp8": 1979e12},
            memory_bandwidth=4.8 * TB,
            h2d_bandwidth_pinned=55 * GB, h2d_bandwidth_pageable=20 * GB,
            d2h_bandwidth_pinned=55 * GB, d2h_bandwidth_pageable=20 * GB,
            disk_read_bandwidth=2 * GB,
            memory_capacity={"device": 141 * GB, "host": 128 * GiB, "disk": 64 * GiB},
            launch_overhead=4e-6,
            gemm_efficiency=[(1e6, 0.05), (1e9, 0.5), (1e11, 0.8), (1e13, 0.85)],
            copy_efficiency=[(1e4, 0.02), (1e6, 0.3), (1e8, 0.85), (1e10, 0.9)],
            sources={"peak_flops": "NVIDIA H200 SXM datasheet", "memory_bandwidth":
                     "NVIDIA H200 SXM datasheet"},
        ),
        "a100-80gb": HardwareProfile(
            name="a100-80gb",
            peak_flops={"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12,
                        "int8": 624e12},
            memory_bandwidth=2.039 * TB,
            h2d_bandwidth_pinned=25 * GB, h2d_bandwidth_pageable=10 * GB,
            d2h_bandwidth_pinned=25 * GB, d2h_bandwidth_pageable=10 * GB,
            disk_read_bandwidth=2 * GB,
            memory_capacity={"device": 80 * GiB, "host": 128 * GiB, "disk": 64 * GiB},
            launch_overhead=5e-6,
            gemm_efficiency=[(1e6, 0.05), (1e9, 0.5), (1e11, 0.8), (1e13, 0.85)],
            copy_efficiency=[(1e4, 0.02), (1e6, 0.3), (1e8, 0.85), (1e10, 0.9)],
            sources={"peak_flops": "NVIDIA A100 80GB SXM datasheet",
                     "memory_bandwidth": "NVIDIA A100 80GB SXM datasheet"},
        ),
        "cpu": HardwareProfile(
            name="cpu",
            peak_flops={"fp32": 100e9, "bf16": 50e9, "fp16": 20e9, "int8": 100e9},
            memory_bandwidth=10 * GB,
            h2d_bandwidth_pinned=10 * GB, h2d_bandwidth_pageable=10 * GB,
            d2h_bandwidth_pinned=10 * GB, d2h_bandwidth_pageable=10 * GB,
            disk_read_bandwidth=1 * GB,
            memory_capacity={"device": 24 * GiB, "host": 24 * GiB, "disk": 50 * GiB},
            launch_overhead=5e-6,
            sources={"all": "rough figures for a 2-core cloud VM; run `peakc calibrate`"},
        ),
    }


BUILTIN_PROFILES = _builtin()


def resolve_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name, or a JSON profile file by path."""
    if name_or_path in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name_or_path]
    if name_or_path.endswith(".json") or Path(name_or_path).exists():
        return HardwareProfile.load(name_or_path)
    raise PeakcError(
        f"unknown target '{name_or_path}' (built-in: {', '.join(BUILTIN_PROFILES)}; "
        "or a profile .json file)"
    )
