"""Measure a HardwareProfile on the local device with micro-benchmarks.

The device-side launch gap of a near-empty kernel, GEMM sweeps per dtype over LLM-like
shapes, a copy sweep, per-op-class sweeps (elementwise, reductions, softmax, norms, gathers,
attention prefill and decode: `op_sweeps.py`), the kernels eager PyTorch launches for fused
nodes, host-device transfers (pinned and pageable), disk reads, and per-kernel host issue
cost. Device times on a GPU are CUDA graph replays (`timing.py`), so they measure the
kernels, not the host; host issue cost (the eager runtime) is measured separately.
The GEMM and op-class shapes are not those of `benchmarks/cost_model_accuracy.py`.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from peakc.cost_model.fit import fit_class_curves, fit_curve, fit_gemms, work_seconds
from peakc.cost_model.hardware import BUILTIN_PROFILES, HardwareProfile
from peakc.cost_model.op_sweeps import (
    OpSample,
    count_eager_kernels,
    measure_kernel_gap,
    measure_op_classes,
    op_cases,
)
from peakc.cost_model.timing import (
    copies_for,
    device_seconds,
    forward_seconds,
    host_seconds,
)
from peakc.errors import PeakcError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Sweep:
    """What one calibration run measures; `quick` and `tiny` are smaller instances."""

    gemm_m: list[int]
    gemm_kn: list[tuple[int, int]]
    gemm_dtypes: list[str]
    copy_sizes: list[int]  # bytes of one tensor (the kernel moves twice that)
    op_scale: str  # op_sweeps.op_cases scale: "tiny" | "cpu" | "quick" | "full"
    transfer_bytes: int
    disk_bytes: int
    launch_iters: int
    target_seconds: float  # how long one timed loop (or graph replay) should run
    tf32: bool = False
    other_dtype_shapes: int = 5  # dtypes other than bf16 sweep the first this many shapes


def sweep_for(device: str, quick: bool, tiny: bool) -> Sweep:
    """The sweep for a device kind and mode (tiny: for tests, seconds on CPU)."""
    if tiny:
        return Sweep(
            [1, 16, 64],
            [(64, 64), (128, 256)],
            ["fp32"],
            [2**12, 2**16, 2**20],
            "tiny",
            2**20,
            2**20,
            50,
            0.002,
        )
    if device == "cpu":
        kn = [(512, 512), (1024, 2048), (2048, 1024)]
        if quick:
            return Sweep(
                [1, 32, 256],
                kn,
                ["fp32", "bf16"],
                [2**12, 2**16, 2**20, 2**24],
                "cpu",
                2**24,
                2**25,
                500,
                0.02,
            )
        return Sweep(
            [1, 8, 32, 128, 512],
            kn + [(2048, 2048)],
            ["fp32", "bf16"],
            [2**10, 2**12, 2**14, 2**16, 2**18, 2**20, 2**22, 2**24, 2**26],
            "cpu",
            2**26,
            2**27,
            2000,
            0.05,
        )
    # Not the accuracy benchmark's shapes: no 4096/11008, 2048/8192 or 576/1536 layers.
    kn = [
        (3072, 3072),
        (3072, 8192),
        (8192, 3072),
        (1024, 4096),
        (4096, 1024),
        (5120, 13824),
        (13824, 5120),
        (1024, 1024),
        (768, 2304),
        (2304, 768),
        (3072, 50000),
        (512, 512),
        (384, 1024),
        (1024, 384),
        (768, 128),
    ]
    m = [2, 8, 24, 64, 192, 384, 768, 1536, 3072, 6144]
    copies = [2**k for k in range(10, 31, 2)]
    if quick:
        return Sweep(
            m[::2] + [6144],
            kn[:5] + kn[-1:],
            ["bf16", "fp16", "fp32"],
            copies[::2] + [2**29],
            "quick",
            2**26,
            2**27,
            1000,
            1e-3,
            other_dtype_shapes=3,
        )
    return Sweep(
        m, kn, ["bf16", "fp16", "fp32"], copies, "full", 2**28, 2**29, 3000, 2e-3, tf32=True
    )


# --- measurements ---------------------------------------------------------------------------


def measure_gemms(sweep: Sweep, device: str, step: Callable[[], None]) -> dict[str, list]:
    """(flops, bytes, seconds) per dtype over the sweep's (M, K, N) shapes."""
    out: dict[str, list] = {}
    dtypes = list(sweep.gemm_dtypes) + (["tf32"] if sweep.tf32 else [])
    for name in dtypes:
        dtype = DTYPES.get(name, torch.float32)
        rows = []
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        shapes = sweep.gemm_kn if name == "bf16" else sweep.gemm_kn[: sweep.other_dtype_shapes]
        try:
            for k, n in shapes:
                size = torch.finfo(dtype).bits // 8
                count = copies_for(n * k * size) if device == "cuda" else 1
                weights = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(count)]
                for m in sweep.gemm_m:
                    xs = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(count)]
                    calls = [lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, weights)]
                    seconds = device_seconds(calls, device, sweep.target_seconds)
                    moved = (m * k + n * k + m * n) * size
                    rows.append((2.0 * m * n * k, float(moved), seconds))
                    step()
                del weights
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        out[name] = rows
    return out


def measure_copies(sweep: Sweep, device: str, step: Callable[[], None]) -> list:
    """(bytes moved, seconds) of device-to-device copies."""
    rows = []
    for size in sweep.copy_sizes:
        count = copies_for(2 * size) if device == "cuda" else 1
        pairs = [
            (
                torch.empty(size // 4, device=device).fill_(1.0),
                torch.empty(size // 4, device=device),
            )
            for _ in range(count)
        ]
        seconds = device_seconds(
            [lambda s=s, d=d: d.copy_(s) for s, d in pairs], device, sweep.target_seconds
        )
        rows.append((2.0 * size, seconds))
        step()
    return rows


def measure_transfers(sweep: Sweep, device: str) -> dict[str, float]:
    """Host<->device bytes/s, pinned and pageable (a host memcpy on a CPU-only machine)."""
    n = sweep.transfer_bytes
    if device != "cuda":
        a, b = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        rate = n / device_seconds([lambda: b.copy_(a)], "cpu", 0.02)
        return {k: rate for k in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")}
    gpu = torch.empty(n, dtype=torch.uint8, device="cuda")
    rates = {}
    for kind in ("pinned", "pageable"):
        host = torch.empty(n, dtype=torch.uint8, pin_memory=kind == "pinned")
        for direction, (dst, src) in (("h2d", (gpu, host)), ("d2h", (host, gpu))):
            samples = []
            for _ in range(3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                dst.copy_(src)
                torch.cuda.synchronize()
                samples.append(time.perf_counter() - start)
            rates[f"{direction}_{kind}"] = n / statistics.median(samples)
    return rates


def measure_disk(sweep: Sweep, directory: str | None) -> tuple[float, str]:
    """Sequential read bytes/s of a fresh file with its page cache dropped (when the OS can)."""
    block = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:
        path = f.name
        for _ in range(max(sweep.disk_bytes >> 20, 1)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    how = "read after fsync + posix_fadvise(DONTNEED)"
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                how = "read after fsync (page cache may serve it)"
            buf = bytearray(8 << 20)
            view = memoryview(buf)
            total = 0
            start = time.perf_counter()
            with os.fdopen(os.dup(fd), "rb", buffering=0) as stream:
                while (got := stream.readinto(view)) > 0:
                    total += got
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
    return total / seconds, how


# --- fitting --------------------------------------------------------------------------------


def fit_profile(
    name: str,
    device_label: str,
    m: Measurements,
    capacities: dict[str, float],
    asynchronous: bool,
    base: HardwareProfile | None,
) -> HardwareProfile:
    """Turn measurements into a profile: peaks are the best achieved, curves the fractions."""
    stamp = f"measured on {device_label} ({datetime.date.today().isoformat()})"
    gap = m.kernel_gap
    bandwidth = max(b / s for b, s in m.copies)
    copy_curve = fit_curve(
        [(b, b / work_seconds(s, 1, gap) / bandwidth) for b, s in m.copies],
        bins_per_decade=1,
        cap=1.5,
    )
    peaks, by_dtype, gemm_bandwidth = {}, {}, []
    for dtype, rows in m.gemms.items():
        peaks[dtype], by_dtype[dtype], points = fit_gemms(rows, bandwidth, gap)
        gemm_bandwidth += points
    sources = {f"peak_flops.{d}": stamp for d in peaks}
    if base is not None:
        for dtype, value in base.peak_flops.items():
            if dtype not in peaks:
                peaks[dtype] = value
                sources[f"peak_flops.{dtype}"] = f"{base.name} built-in (not measured)"
    attention_dtype = "bf16" if asynchronous else "fp32"
    class_curves, attn_curve = fit_class_curves(
        m.op_samples, bandwidth, gap, peaks.get(attention_dtype, max(peaks.values()))
    )
    if gemm_bandwidth:
        class_curves["gemm"] = fit_curve(gemm_bandwidth, bins_per_decade=3, cap=1.5)
    main = "bf16" if "bf16" in by_dtype else next(iter(by_dtype))
    sources.update(
        {
            k: stamp
            for k in (
                "memory_bandwidth",
                "copy_efficiency",
                "gemm_efficiency",
                "attention_efficiency",
                "launch_overhead",
                "view_overhead",
                "launch_overhead_by_kind",
                "h2d/d2h",
                "memory_capacity",
                "bandwidth_efficiency",
                "kernel_gap",
            )
        }
    )
    if m.eager_kernels:
        sources["eager_kernels"] = f"{stamp}: kernels per call counted by torch.profiler"
    if not asynchronous:
        sources["kernel_gap"] = "no device-side launch on a CPU: its per-op cost is host time"
    sources["disk_read_bandwidth"] = f"{stamp}, {m.disk[1]}"
    if not asynchronous:
        sources["h2d/d2h"] = f"{stamp}: host memory copy (no separate device)"
    return HardwareProfile(
        name=name,
        peak_flops=peaks,
        memory_bandwidth=bandwidth,
        h2d_bandwidth_pinned=m.transfers["h2d_pinned"],
        h2d_bandwidth_pageable=m.transfers["h2d_pageable"],
        d2h_bandwidth_pinned=m.transfers["d2h_pinned"],
        d2h_bandwidth_pageable=m.transfers["d2h_pageable"],
        disk_read_bandwidth=m.disk[0],
        memory_capacity=capacities,
        launch_overhead=m.launch["memory"],
        launch_overhead_by_kind=dict(m.launch),
        gemm_efficiency=by_dtype[main],
        gemm_efficiency_by_dtype=by_dtype,
        attention_efficiency=attn_curve,
        copy_efficiency=copy_curve,
        view_overhead=m.view,
        asynchronous_launch=asynchronous,
        kernel_gap=gap,
        bandwidth_efficiency=class_curves,
        eager_kernels=dict(m.eager_kernels),
        sources=sources,
    )


@dataclass
class Measurements:
    """Everything one calibration measured, before fitting."""

    kernel_gap: float
    copies: list  # (bytes moved, seconds)
    gemms: dict[str, list]  # dtype -> (FLOPs, bytes, seconds)
    op_samples: list[OpSample]
    eager_kernels: dict[str, int]
    transfers: dict[str, float]
    disk: tuple[float, str]
    launch: dict[str, float]  # host seconds per eager kernel, by kind
    view: float


# --- the run --------------------------------------------------------------------------------


def calibrate(
    device: str | None = None,
    *,
    quick: bool = False,
    tiny: bool = False,
    disk_dir: str | None = None,
    progress: bool = True,
) -> HardwareProfile:
    """Run the sweeps on `device` ("cuda" or "cpu"; default: cuda when available) and fit."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise PeakcError(f"calibrate: device must be 'cuda' or 'cpu', got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise PeakcError("calibrate: device 'cuda' asked for but no CUDA device is available")
    measurements = measure(device, quick=quick, tiny=tiny, disk_dir=disk_dir, progress=progress)
    return fit_for_device(measurements, device, disk_dir)


def fit_for_device(
    measurements: Measurements, device: str, disk_dir: str | None = None
) -> HardwareProfile:
    """Fit measurements taken on this machine's `device` into a named profile."""
    label = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    base = _builtin_for(label) if device == "cuda" else None
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return fit_profile(
        f"calibrated-{slug}",
        label,
        measurements,
        _capacities(device, disk_dir),
        asynchronous=device == "cuda",
        base=base,
    )


def measure(
    device: str,
    *,
    quick: bool = False,
    tiny: bool = False,
    disk_dir: str | None = None,
    progress: bool = True,
) -> Measurements:
    """Every measurement of one calibration, in order, each advancing the progress bar."""
    sweep = sweep_for(device, quick, tiny)
    cases = op_cases(sweep.op_scale)
    gemm_steps = len(sweep.gemm_m) * sum(
        len(sweep.gemm_kn) if d == "bf16" else min(len(sweep.gemm_kn), sweep.other_dtype_shapes)
        for d in sweep.gemm_dtypes + (["tf32"] if sweep.tf32 else [])
    )
    total = gemm_steps + len(sweep.copy_sizes) + len(cases) + 5
    threads = torch.get_num_threads()
    if tiny and device == "cpu":
        torch.set_num_threads(1)  # tiny sweeps must not wait on a busy core's scheduler
    try:
        with _progress_bar(progress) as bar, torch.inference_mode():
            task = bar.add_task("calibrate", total=total)

            def stage(text: str) -> Callable[[], None]:
                bar.update(task, description=text)
                return lambda: bar.advance(task)

            step = stage("kernel gap")
            gap = measure_kernel_gap(device)
            step()
            copies = measure_copies(sweep, device, stage("copy sweep"))
            gemms = measure_gemms(sweep, device, stage("GEMM sweep"))
            samples = measure_op_classes(
                cases, device, sweep.target_seconds, stage("op-class sweeps")
            )
            step = stage("eager kernels per node")
            eager_kernels = count_eager_kernels(device)
            step()
            step = stage("host-device transfers")
            transfers = measure_transfers(sweep, device)
            step()
            step = stage("disk read")
            disk = measure_disk(sweep, disk_dir)
            step()
            step = stage("launch overhead")
            launch, view = measure_host_overheads(sweep, device)
            step()
    finally:
        torch.set_num_threads(threads)
    return Measurements(gap, copies, gemms, samples, eager_kernels, transfers, disk, launch, view)


def measure_host_overheads(sweep: Sweep, device: str) -> tuple[dict[str, float], float]:
    """Host seconds to issue one eager kernel by kind, and one eager view.

    Bare calls (a tiny linear, attention, add) give each kind's relative cost. A tiny demo
    Llama forward, timed one forward at a time like the eager peer, then scales them so
    that its kernels (counted by kind in its captured graph) and views add up to its time:
    module calls, dispatch and allocation are paid by the kernels they issue.
    """
    from peakc.cost_model.op_costs import CostContext, node_cost
    from peakc.ir import capture
    from peakc.models.demo import demo_llama

    iters = sweep.launch_iters
    x = torch.ones(4, 8, 16, device=device)
    view = host_seconds(lambda: x.view(4, 128), device, iters)
    a, b = torch.ones(8, 16, device=device), torch.ones(8, 16, device=device)
    w = torch.ones(16, 16, device=device)
    q = torch.ones(1, 2, 4, 8, device=device)
    bare = {
        "memory": host_seconds(lambda: torch.add(a, b), device, iters),
        "gemm": host_seconds(lambda: F.linear(a, w), device, iters),
        "attention": host_seconds(
            lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), device, iters // 4
        ),
    }
    model, (ids,) = demo_llama(
        0,
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
    )
    ids = ids[:, :8]
    graph = capture(model, (ids,), name="calibration llama")
    counts = {"memory": 0, "gemm": 0, "attention": 0, "free": 0}
    for node in graph.call_nodes():
        counts[node_cost(node, CostContext()).kind] += 1
    model, ids = model.to(device), ids.to(device)
    per_forward = forward_seconds(lambda: model(ids), device)
    kernel_host = sum(counts[k] * bare[k] for k in bare)
    scale = max((per_forward - counts["free"] * view) / kernel_host, 0.5)
    return {k: v * scale for k, v in bare.items()}, view


class _SilentBar:
    """Stands in for rich's Progress when no bar is wanted (rich need not be installed)."""

    def __enter__(self) -> _SilentBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        return None

    def advance(self, *args: object, **kwargs: object) -> None:
        return None


def _progress_bar(show: bool):
    if not show:
        return _SilentBar()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )


def _builtin_for(label: str) -> HardwareProfile | None:
    text = label.lower()
    for key, name in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80gb")):
        if key in text:
            return BUILTIN_PROFILES[name]
    return None


def _capacities(device: str, disk_dir: str | None) -> dict[str, float]:
    host = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    disk = float(shutil.disk_usage(disk_dir or tempfile.gettempdir()).free)
    dev = float(torch.cuda.get_device_properties(0).total_memory) if device == "cuda" else host
    return {"device": dev, "host": host, "disk": disk}


def write_profile(profile: HardwareProfile, path: str | Path) -> None:
    profile.validate(str(path))
    profile.save(path)
