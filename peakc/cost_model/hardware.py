"""HardwareProfile: the figures every placement and fusion decision reads.

Built-in profiles cite where each figure came from (a vendor datasheet, or an estimate
to be replaced by `peakc calibrate`). Profiles load and save as JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peakc.cost_model.lowbit_curves import LOWBIT_CURVES  # fitted: benchmarks/lowbit_curves.py
from peakc.errors import PeakcError

Curve = list[tuple[float, float]]  # (size, fraction of peak), interpolated in log10(size)

RATE_FIGURES = (
    "memory_bandwidth",
    "h2d_bandwidth_pinned",
    "h2d_bandwidth_pageable",
    "d2h_bandwidth_pinned",
    "d2h_bandwidth_pageable",
    "disk_read_bandwidth",
    "launch_overhead",
    "view_overhead",
)
CURVE_FIGURES = ("gemm_efficiency", "attention_efficiency", "copy_efficiency")
CURVE_TABLES = ("gemm_efficiency_by_dtype", "bandwidth_efficiency")
# Op classes with their own bandwidth curve (bytes moved -> fraction of memory_bandwidth).
# "strided": elementwise ops and cat reading a non-contiguous view or a broadcast input.
OP_CLASSES = (
    "elementwise",
    "strided",
    "reduction",
    "softmax",
    "norm",
    "gather",
    "gemm",
    "attention",
    "lowbit",  # linear_wq: packed codes unpacked in registers (instruction-bound GEMVs)
    "sparse24",  # linear_sparse24: 2:4-compressed values + metadata
    "sparse24_lowbit",  # linear_sparse24_wq: 2:4-compressed int codes + metadata
)


def efficiency_at(curve: Curve, size: float) -> float:
    """The curve's fraction of peak at `size`, piecewise linear in log10(size).

    Above the last point it stays flat; below the first, the kernel's time stays that of the
    first point (efficiency falls with size): a smaller kernel is no faster than the smallest
    one measured.
    """
    if size <= curve[0][0]:
        return curve[0][1] * size / curve[0][0]
    if size >= curve[-1][0]:
        return curve[-1][1]
    x = math.log10(size)
    for (s0, e0), (s1, e1) in zip(curve, curve[1:]):
        if size <= s1:
            x0, x1 = math.log10(s0), math.log10(s1)
            return e0 + (e1 - e0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


@dataclass
class HardwareProfile:
    """Peak rates, bandwidths, capacities and efficiency curves of one device and its host."""

    name: str
    peak_flops: dict[str, float]  # FLOP/s by dtype: fp32, tf32, bf16, fp16, int8, fp8
    memory_bandwidth: float  # bytes/s, device memory
    h2d_bandwidth_pinned: float  # bytes/s
    h2d_bandwidth_pageable: float
    d2h_bandwidth_pinned: float
    d2h_bandwidth_pageable: float
    disk_read_bandwidth: float  # bytes/s
    memory_capacity: dict[str, float]  # bytes by tier: device, host, disk
    launch_overhead: float  # seconds: host time to issue one eager kernel
    # Efficiency curves. GEMM and attention: (FLOPs of the op, fraction of the dtype's peak);
    # copy: (bytes moved, fraction of memory_bandwidth). A dtype without its own GEMM curve
    # uses `gemm_efficiency`.
    gemm_efficiency: Curve = field(default_factory=lambda: [(1.0, 1.0)])
    gemm_efficiency_by_dtype: dict[str, Curve] = field(default_factory=dict)
    attention_efficiency: Curve = field(default_factory=lambda: [(1.0, 1.0)])
    copy_efficiency: Curve = field(default_factory=lambda: [(1.0, 1.0)])
    view_overhead: float = 1e-6  # seconds: host time of an eager view/reshape (no kernel)
    # Host issue seconds by kernel kind ("gemm", "attention", "memory"); others use
    # launch_overhead. Eager linear and attention calls cost the host more than an add.
    launch_overhead_by_kind: dict[str, float] = field(default_factory=dict)
    # True on GPUs: the host issues kernels ahead of the device, so the two overlap.
    asynchronous_launch: bool = True
    # Device seconds each kernel costs beyond its work when kernels run back to back on the
    # device (a CUDA graph replay): launch latency, ramp-up and tail of a near-empty kernel.
    kernel_gap: float = 2e-6
    # Per op class (OP_CLASSES): (bytes moved, fraction of memory_bandwidth) for the kernels
    # of that class; a class without its own curve uses `copy_efficiency`.
    bandwidth_efficiency: dict[str, Curve] = field(default_factory=dict)
    # Kernels eager PyTorch launches per node of an op (`aten.rms_norm`: 1 when fused);
    # ops not listed use op_costs.EAGER_KERNELS.
    eager_kernels: dict[str, int] = field(default_factory=dict)
    # Bytes/s one device sends another over each kind of link ("nvlink", "pcie", "network"):
    # what a pipeline cut's transfer costs (the partition pass).
    interconnect_bandwidth: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # figure -> where it came from

    # --- reading figures -------------------------------------------------------------------

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` (fp32 when the chip lists no separate figure for it)."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if "fp32" in self.peak_flops:
            return self.peak_flops["fp32"]
        raise PeakcError(f"profile {self.name}: no peak FLOP/s for '{dtype}' and no 'fp32'")

    def issue_time(self, kind: str) -> float:
        """Host seconds to issue one eager kernel of `kind`."""
        return self.launch_overhead_by_kind.get(kind, self.launch_overhead)

    def gemm_efficiency_for(self, dtype: str, flops: float) -> float:
        """Fraction of peak a GEMM of `flops` reaches in `dtype`."""
        return efficiency_at(self.gemm_efficiency_by_dtype.get(dtype, self.gemm_efficiency), flops)

    def copy_efficiency_for(self, nbytes: float) -> float:
        """Fraction of memory bandwidth a kernel moving `nbytes` reaches."""
        return efficiency_at(self.copy_efficiency, nbytes)

    def bandwidth_efficiency_for(self, op_class: str, nbytes: float) -> float:
        """Fraction of memory bandwidth a kernel of `op_class` moving `nbytes` reaches."""
        curve = self.bandwidth_efficiency.get(op_class, self.copy_efficiency)
        return efficiency_at(curve, nbytes)

    def attention_efficiency_for(self, flops: float) -> float:
        """Fraction of peak an attention kernel of `flops` reaches."""
        return efficiency_at(self.attention_efficiency, flops)

    # --- checking and JSON -----------------------------------------------------------------

    def validate(self, origin: str = "") -> None:
        """Raise a one-line PeakcError naming the first missing or non-positive figure."""
        where = f"profile {origin or self.name}"
        for key in RATE_FIGURES + ("kernel_gap",):
            _positive(where, key, getattr(self, key))
        if not isinstance(self.peak_flops, dict) or not self.peak_flops:
            raise PeakcError(f"{where}: 'peak_flops' is empty")
        for table in (
            "peak_flops",
            "memory_capacity",
            "launch_overhead_by_kind",
            "eager_kernels",
            "interconnect_bandwidth",
        ):
            values = getattr(self, table)
            if not isinstance(values, dict):
                raise PeakcError(f"{where}: '{table}' must be an object of numbers")
            for k, v in values.items():
                _positive(where, f"{table}.{k}", v)
        curves = {k: getattr(self, k) for k in CURVE_FIGURES}
        for table in CURVE_TABLES:
            values = getattr(self, table)
            if not isinstance(values, dict):
                raise PeakcError(f"{where}: '{table}' must be an object of curves")
            curves.update({f"{table}.{k}": v for k, v in values.items()})
        unknown = sorted(set(self.bandwidth_efficiency) - set(OP_CLASSES))
        if unknown:
            raise PeakcError(
                f"{where}: 'bandwidth_efficiency.{unknown[0]}' is not an op class "
                f"({', '.join(OP_CLASSES)})"
            )
        for key, curve in curves.items():
            _check_curve(where, key, curve)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "") -> HardwareProfile:
        """Build and validate a profile from parsed JSON; errors name the figure at fault."""
        where = f"profile {origin}" if origin else "profile"
        if not isinstance(data, dict):
            raise PeakcError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise PeakcError(f"{where}: missing figure '{missing[0]}'")
        unknown = sorted(set(data) - names)
        if unknown:
            raise PeakcError(f"{where}: unknown field '{unknown[0]}'")
        data = dict(data)
        for key in CURVE_FIGURES:
            if key in data:
                data[key] = _as_curve(where, key, data[key])
        for table in CURVE_TABLES:
            if table not in data:
                continue
            if not isinstance(data[table], dict):
                raise PeakcError(f"{where}: '{table}' must be an object")
            data[table] = {k: _as_curve(where, f"{table}.{k}", v) for k, v in data[table].items()}
        profile = cls(**data)
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
        Path(path).write_text(self.to_json() + "\n")


def _positive(where: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise PeakcError(f"{where}: '{key}' must be a positive number, got {value!r}")
    if math.isinf(value):
        raise PeakcError(f"{where}: '{key}' must be finite, got {value!r}")


def _as_curve(where: str, key: str, raw: Any) -> Curve:
    if not isinstance(raw, list) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in raw
    ):
        raise PeakcError(f"{where}: '{key}' must be a list of [size, efficiency] pairs")
    return [(p[0], p[1]) for p in raw]


def _check_curve(where: str, key: str, curve: Curve) -> None:
    if not curve:
        raise PeakcError(f"{where}: '{key}' has no points")
    for size, eff in curve:
        _positive(where, f"{key} size", size)
        _positive(where, f"{key} efficiency", eff)
        if eff > 1.5:
            raise PeakcError(f"{where}: '{key}' efficiency {eff} is above 1.5 of peak")
    sizes = [s for s, _ in curve]
    if sizes != sorted(sizes) or len(set(sizes)) != len(sizes):
        raise PeakcError(f"{where}: '{key}' sizes must be strictly increasing")


GB = 1e9
GiB = 2**30
TB = 1e12

ESTIMATED_CURVES = (
    "estimated from typical cuBLAS/FlashAttention results; refine with `peakc calibrate`"
)
GRAPH_GAP = (
    "estimate of an H100's per-kernel time in a CUDA graph replay of near-empty "
    "kernels; refine with `peakc calibrate`"
)
EAGER_LAUNCH = "estimate of eager PyTorch per-op host cost; refine with `peakc calibrate`"


def _gpu_curves() -> dict[str, Any]:
    """Efficiency curves shared by the built-in data-centre GPU profiles (estimates)."""
    copy = [
        (1e4, 0.002),
        (1e5, 0.015),
        (1e6, 0.1),
        (1e7, 0.45),
        (1e8, 0.78),
        (1e9, 0.88),
        (1e10, 0.9),
    ]
    return dict(
        gemm_efficiency=[
            (1e6, 0.004),
            (1e7, 0.03),
            (1e8, 0.15),
            (1e9, 0.4),
            (1e10, 0.62),
            (1e11, 0.72),
            (1e12, 0.75),
        ],
        gemm_efficiency_by_dtype={
            "fp32": [(1e6, 0.04), (1e7, 0.2), (1e8, 0.5), (1e9, 0.7), (1e10, 0.78), (1e12, 0.8)],
        },
        attention_efficiency=[
            (1e6, 0.002),
            (1e7, 0.015),
            (1e8, 0.08),
            (1e9, 0.2),
            (1e10, 0.33),
            (1e11, 0.4),
            (1e12, 0.42),
        ],
        copy_efficiency=copy,
        # Reductions, softmax and norms keep a row on chip and reach about 60% of a copy.
        # Large elementwise kernels on strided or broadcast inputs lose vectorised access
        # (~half); small ones are latency-bound like any other.
        bandwidth_efficiency={
            **{k: [(s, 0.6 * e) for s, e in copy] for k in ("reduction", "softmax", "norm")},
            "strided": [(s, e * (1.0 if s < 1e7 else 0.5)) for s, e in copy],
            **LOWBIT_CURVES,
        },
        kernel_gap=2.5e-6,
    )


@dataclass(frozen=True)
class HostLink:
    """Host-device copy bandwidths (bytes/s) of a bus, and where the figures came from."""

    pinned: float
    pageable: float
    source: str


@dataclass(frozen=True)
class GpuFigures:
    """The measured or published figures that set one built-in GPU profile apart from another;
    everything else (efficiency curves, launch costs) is the shared estimate in _gpu_curves."""

    datasheet: str  # source of peak_flops, memory_bandwidth and device memory
    peak_flops: dict[str, float]
    memory_bandwidth: float
    device_memory: float
    link: HostLink
    host_memory: float
    disk_capacity: float
    host_source: str  # where the host memory and disk capacities came from
    disk_read_bandwidth: float = 3 * GB
    interconnect: Interconnect | None = None


PCIE5 = HostLink(
    50 * GB, 20 * GB, "PCIe Gen5 x16 nominal (64 GB/s), typical achieved; pageable assumed ~40%"
)
PCIE4 = HostLink(
    25 * GB, 10 * GB, "PCIe Gen4 x16 nominal (32 GB/s), typical achieved; pageable assumed ~40%"
)
NVME = "typical datacentre NVMe sequential read (estimate)"


@dataclass(frozen=True)
class Interconnect:
    """Device-to-device bandwidths (bytes/s, one direction) by link, and their source."""

    bandwidth: dict[str, float]
    source: str


# NVLink 4 (Hopper SXM): 900 GB/s bidirectional = 450 GB/s per direction; nccl-tests' p2p
# sendrecv reaches ~370 GB/s. PCIe 5 peer copies ~ the host link's pinned rate. Network: one
# 400 Gb/s NDR InfiniBand port per GPU (50 GB/s), ~45 GB/s achieved.
HOPPER_LINKS = Interconnect(
    {"nvlink": 370 * GB, "pcie": 50 * GB, "network": 45 * GB},
    "NVLink 4 datasheet (450 GB/s per direction), ~370 GB/s achieved p2p (nccl-tests); "
    "PCIe 5 x16 achieved; 400 Gb/s NDR InfiniBand per GPU, ~45 GB/s achieved (estimates)",
)
# NVLink 3 (A100 SXM): 600 GB/s bidirectional = 300 per direction, ~240 achieved; PCIe 4;
# 200 Gb/s HDR InfiniBand (25 GB/s), ~22 achieved.
AMPERE_LINKS = Interconnect(
    {"nvlink": 240 * GB, "pcie": 25 * GB, "network": 22 * GB},
    "NVLink 3 datasheet (300 GB/s per direction), ~240 GB/s achieved p2p; PCIe 4 x16 "
    "achieved; 200 Gb/s HDR InfiniBand, ~22 GB/s achieved (estimates)",
)
# Dense tensor-core peaks of Hopper (GH100): the H100 SXM5 and H200 SXM datasheets list the
# same figures; the H200 differs in memory (capacity and bandwidth) only.
HOPPER_PEAK_FLOPS = {
    "fp32": 67e12,
    "tf32": 495e12,
    "bf16": 989e12,
    "fp16": 989e12,
    "int8": 1979e12,
    "fp8": 1979e12,
}

GPU_FIGURES: dict[str, GpuFigures] = {
    "h100-sxm": GpuFigures(
        datasheet="NVIDIA H100 SXM5 datasheet (dense, no sparsity)",
        peak_flops=HOPPER_PEAK_FLOPS,
        memory_bandwidth=3.35 * TB,
        device_memory=80 * GiB,
        link=PCIE5,
        host_memory=128 * GiB,
        disk_capacity=64 * GiB,
        host_source="the lent H100 machine's description",
        interconnect=HOPPER_LINKS,
    ),
    "h200": GpuFigures(
        datasheet="NVIDIA H200 SXM datasheet (dense, no sparsity)",
        peak_flops=HOPPER_PEAK_FLOPS,
        memory_bandwidth=4.8 * TB,
        device_memory=141 * GB,
        link=PCIE5,
        host_memory=128 * GiB,
        disk_capacity=64 * GiB,
        host_source="the lent H200 machine's description",
        interconnect=HOPPER_LINKS,
    ),
    "a100-80gb": GpuFigures(
        datasheet="NVIDIA A100 80GB SXM datasheet (dense, no sparsity)",
        peak_flops={
            "fp32": 19.5e12,
            "tf32": 156e12,
            "bf16": 312e12,
            "fp16": 312e12,
            "int8": 624e12,
        },
        memory_bandwidth=2.039 * TB,
        device_memory=80 * GiB,
        link=PCIE4,
        host_memory=128 * GiB,
        disk_capacity=64 * GiB,
        host_source="assumed typical host",
        disk_read_bandwidth=2 * GB,
        interconnect=AMPERE_LINKS,
    ),
}


def gpu_profile(name: str, figures: GpuFigures) -> HardwareProfile:
    """A built-in GPU profile: the device's figures, the shared curve estimates, the sources."""
    link = figures.link
    return HardwareProfile(
        name=name,
        peak_flops=dict(figures.peak_flops),
        memory_bandwidth=figures.memory_bandwidth,
        h2d_bandwidth_pinned=link.pinned,
        h2d_bandwidth_pageable=link.pageable,
        d2h_bandwidth_pinned=link.pinned,
        d2h_bandwidth_pageable=link.pageable,
        disk_read_bandwidth=figures.disk_read_bandwidth,
        memory_capacity={
            "device": figures.device_memory,
            "host": figures.host_memory,
            "disk": figures.disk_capacity,
        },
        launch_overhead=5e-6,
        **_gpu_curves(),
        interconnect_bandwidth=dict(figures.interconnect.bandwidth) if figures.interconnect else {},
        sources={
            "peak_flops": figures.datasheet,
            "memory_bandwidth": figures.datasheet,
            "memory_capacity.device": figures.datasheet,
            "h2d/d2h": link.source,
            "disk": NVME,
            "memory_capacity.host/disk": figures.host_source,
            "launch_overhead": EAGER_LAUNCH,
            "efficiency curves": ESTIMATED_CURVES,
            "kernel_gap": GRAPH_GAP,
            **({"interconnect": figures.interconnect.source} if figures.interconnect else {}),
        },
    )


def _builtin() -> dict[str, HardwareProfile]:
    profiles = {name: gpu_profile(name, figures) for name, figures in GPU_FIGURES.items()}
    profiles["cpu"] = HardwareProfile(
        name="cpu",
        peak_flops={"fp32": 100e9, "bf16": 50e9, "fp16": 20e9, "int8": 100e9},
        memory_bandwidth=10 * GB,
        h2d_bandwidth_pinned=10 * GB,
        h2d_bandwidth_pageable=10 * GB,
        d2h_bandwidth_pinned=10 * GB,
        d2h_bandwidth_pageable=10 * GB,
        disk_read_bandwidth=1 * GB,
        memory_capacity={"device": 24 * GiB, "host": 24 * GiB, "disk": 50 * GiB},
        launch_overhead=5e-6,
        asynchronous_launch=False,
        kernel_gap=1e-7,
        gemm_efficiency=[(1e4, 0.05), (1e6, 0.3), (1e8, 0.7), (1e10, 0.8)],
        attention_efficiency=[(1e4, 0.02), (1e6, 0.15), (1e8, 0.4), (1e10, 0.5)],
        copy_efficiency=[(1e3, 0.05), (1e5, 0.4), (1e7, 0.8), (1e9, 0.8)],
        # gloo over loopback TCP between processes on one host; 10 GbE between hosts
        interconnect_bandwidth={"pcie": 2 * GB, "network": 1.25 * GB},
        sources={"all": "rough estimates for a 2-core cloud VM; run `peakc calibrate`"},
    )
    return profiles


BUILTIN_PROFILES = _builtin()


def resolve_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name, or a JSON profile file by path."""
    if name_or_path in BUILTIN_PROFILES:
        return copy.deepcopy(BUILTIN_PROFILES[name_or_path])
    if name_or_path.endswith(".json") or Path(name_or_path).exists():
        return HardwareProfile.load(name_or_path)
    raise PeakcError(
        f"unknown target '{name_or_path}' (built-in: {', '.join(BUILTIN_PROFILES)}; "
        "or a profile .json file)"
    )
