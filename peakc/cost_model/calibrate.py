"""Measure a HardwareProfile on the local device with micro-benchmarks.

GEMM sweeps per dtype over LLM-like shapes, a copy sweep, an attention sweep, host-device
transfers (pinned and pageable), disk reads, and per-op host overhead. Device times on a
GPU are taken with the host running ahead (a `cuda._sleep` backlog, then CUDA events), so
they measure the kernels, not the host; host issue cost is measured separately.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from peakc.cost_model.hardware import BUILTIN_PROFILES, Curve, HardwareProfile
from peakc.errors import PeakcError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Sweep:
    """What one calibration run measures; `quick` and `tiny` are smaller instances."""

    gemm_m: list[int]
    gemm_kn: list[tuple[int, int]]
    gemm_dtypes: list[str]
    copy_sizes: list[int]  # bytes of one tensor (the kernel moves twice that)
    attention: list[tuple[int, int, int]]  # (heads, seq, head_dim), batch 1, causal
    transfer_bytes: int
    disk_bytes: int
    launch_iters: int
    target_seconds: float  # how long one timed loop should run
    tf32: bool = False
    notes: list[str] = field(default_factory=list)


def sweep_for(device: str, quick: bool, tiny: bool) -> Sweep:
    """The sweep for a device kind and mode (tiny: for tests, seconds on CPU)."""
    if tiny:
        return Sweep([1, 16, 64], [(64, 64), (128, 256)], ["fp32"], [2**12, 2**16, 2**20],
                     [(2, 32, 16)], 2**20, 2**20, 50, 0.002)
    if device == "cpu":
        kn = [(512, 512), (1024, 2048), (2048, 1024)]
        if quick:
            return Sweep([1, 32, 256], kn, ["fp32", "bf16"], [2**12, 2**16, 2**20, 2**24],
                         [(8, 256, 64)], 2**24, 2**25, 500, 0.02)
        return Sweep([1, 8, 32, 128, 512], kn + [(2048, 2048)], ["fp32", "bf16"],
                     [2**10, 2**12, 2**14, 2**16, 2**18, 2**20, 2**22, 2**24, 2**26],
                     [(8, 128, 64), (8, 512, 64), (16, 1024, 64)], 2**26, 2**27, 2000, 0.05)
    kn = [(4096, 4096), (4096, 11008), (11008, 4096), (2048, 8192), (8192, 2048), (576, 1536),
          (1536, 576), (576, 576), (2048, 2048), (4096, 32000)]
    copies = [2**k for k in range(10, 31, 2)]
    attn = [(32, s, 128) for s in (128, 256, 512, 1024, 2048, 4096)] + [(9, 512, 64),
                                                                       (9, 2048, 64)]
    if quick:
        return Sweep([1, 16, 128, 512, 2048, 4096], kn[:7], ["fp32", "bf16", "fp16"],
                     copies[::2] + [2**29], attn[::2], 2**26, 2**27, 1000, 0.003)
    return Sweep([1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], kn,
                 ["fp32", "bf16", "fp16"], copies, attn, 2**28, 2**29, 3000, 0.01, tf32=True)


# --- timing ---------------------------------------------------------------------------------


def device_seconds(fn: Callable[[], object], device: str, target: float, repeats: int = 3) -> float:
    """Seconds of one `fn()` on the device, the host kept ahead of the device.

    The median of repeats on CUDA; the minimum on CPU, where other processes only add time.
    """
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once = time.perf_counter() - start
    else:
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
    iters = int(min(max(target / max(once, 1e-7), 3), 200))
    start = time.perf_counter()
    for _ in range(5):
        fn()
    issue = (time.perf_counter() - start) / 5  # host seconds per call (device may lag)
    if device == "cuda":
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats if device == "cuda" else repeats + 2):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(2 * iters * issue * 2e9) + 100_000)  # backlog: host runs ahead
            begin.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / iters)
        else:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples) if device == "cuda" else min(samples)


def host_seconds(fn: Callable[[], object], device: str, iters: int) -> float:
    """Host seconds per call of `fn` issued back to back (eager per-op overhead)."""
    for _ in range(10):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - start) / iters)
        if device == "cuda":
            torch.cuda.synchronize()
    return statistics.median(samples)


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
        try:
            for k, n in sweep.gemm_kn:
                w = torch.randn(n, k, device=device, dtype=dtype)
                for m in sweep.gemm_m:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    seconds = device_seconds(lambda x=x, w=w: F.linear(x, w), device,
                                             sweep.target_seconds)
                    moved = (m * k + n * k + m * n) * x.element_size()
                    rows.append((2.0 * m * n * k, float(moved), seconds))
                    step()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        out[name] = rows
    return out


def measure_copies(sweep: Sweep, device: str, step: Callable[[], None]) -> list:
    """(bytes moved, seconds) of device-to-device copies."""
    rows = []
    for size in sweep.copy_sizes:
        src = torch.empty(size // 4, device=device, dtype=torch.float32).fill_(1.0)
        dst = torch.empty_like(src)
        seconds = device_seconds(lambda s=src, d=dst: d.copy_(s), device, sweep.target_seconds)
        rows.append((2.0 * size, seconds))
        step()
    return rows


def measure_attention(sweep: Sweep, device: str, dtype: torch.dtype,
                      step: Callable[[], None]) -> list:
    """(flops, seconds) of causal scaled-dot-product attention, batch 1."""
    rows = []
    for heads, seq, dim in sweep.attention:
        q, k, v = (torch.randn(1, heads, seq, dim, device=device, dtype=dtype) for _ in range(3))
        seconds = device_seconds(
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            device, sweep.target_seconds)
        rows.append((2.0 * heads * seq * (seq + 1) / 2 * 2 * dim, seconds))
        step()
    return rows


def measure_transfers(sweep: Sweep, device: str) -> dict[str, float]:
    """Host<->device bytes/s, pinned and pageable (a host memcpy on a CPU-only machine)."""
    n = sweep.transfer_bytes
    if device != "cuda":
        a, b = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        rate = n / device_seconds(lambda: b.copy_(a), "cpu", 0.02)
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


def fit_curve(points: list[tuple[float, float]], bins_per_decade: int = 2) -> Curve:
    """Median efficiency per log-size bin, as a curve with strictly increasing sizes."""
    if not points:
        return [(1.0, 1.0)]
    groups: dict[int, list[tuple[float, float]]] = {}
    for size, eff in points:
        key = int(torch.tensor(size).log10().item() * bins_per_decade)
        groups.setdefault(key, []).append((size, eff))
    curve = []
    for key in sorted(groups):
        sizes = [s for s, _ in groups[key]]
        effs = [e for _, e in groups[key]]
        curve.append((float(statistics.median(sizes)), float(statistics.median(effs))))
    deduped: Curve = []
    for size, eff in curve:
        if not deduped or size > deduped[-1][0]:
            deduped.append((size, min(max(eff, 1e-6), 1.0)))
    return deduped


def fit_profile(name: str, device_label: str, gemms: dict[str, list], copies: list,
                attention: list, attention_dtype: str, transfers: dict[str, float],
                disk: tuple[float, str], launch: dict[str, float], view: float,
                capacities: dict[str, float], asynchronous: bool,
                base: HardwareProfile | None) -> HardwareProfile:
    """Turn measurements into a profile: peaks are the best achieved, curves the fractions."""
    stamp = f"measured on {device_label} ({datetime.date.today().isoformat()})"
    bandwidth = max(b / s for b, s in copies)
    copy_curve = fit_curve([(b, b / s / bandwidth) for b, s in copies], bins_per_decade=1)
    peaks, by_dtype = {}, {}
    for dtype, rows in gemms.items():
        peaks[dtype] = max(f / s for f, _, s in rows)
        ridge = peaks[dtype] / bandwidth  # FLOP/byte where compute starts to bind
        compute_bound = [(flops, flops / seconds / peaks[dtype])
                         for flops, moved, seconds in rows if flops / moved >= 0.5 * ridge]
        by_dtype[dtype] = fit_curve(compute_bound) if compute_bound else [(1.0, 1.0)]
    sources = {f"peak_flops.{d}": stamp for d in peaks}
    if base is not None:
        for dtype, value in base.peak_flops.items():
            if dtype not in peaks:
                peaks[dtype] = value
                sources[f"peak_flops.{dtype}"] = f"{base.name} built-in (not measured)"
    peak_attn = peaks.get(attention_dtype, max(peaks.values()))
    attn_curve = fit_curve([(f, f / s / peak_attn) for f, s in attention]) if attention \
        else [(1.0, 1.0)]
    main = "bf16" if "bf16" in by_dtype else next(iter(by_dtype))
    sources.update({k: stamp for k in ("memory_bandwidth", "copy_efficiency", "gemm_efficiency",
                                       "attention_efficiency", "launch_overhead", "view_overhead",
                                       "launch_overhead_by_kind", "h2d/d2h", "memory_capacity")})
    sources["disk_read_bandwidth"] = f"{stamp}, {disk[1]}"
    if not asynchronous:
        sources["h2d/d2h"] = f"{stamp}: host memory copy (no separate device)"
    return HardwareProfile(
        name=name, peak_flops=peaks, memory_bandwidth=bandwidth,
        h2d_bandwidth_pinned=transfers["h2d_pinned"],
        h2d_bandwidth_pageable=transfers["h2d_pageable"],
        d2h_bandwidth_pinned=transfers["d2h_pinned"],
        d2h_bandwidth_pageable=transfers["d2h_pageable"],
        disk_read_bandwidth=disk[0], memory_capacity=capacities,
        launch_overhead=launch["memory"], launch_overhead_by_kind=dict(launch),
        gemm_efficiency=by_dtype[main], gemm_efficiency_by_dtype=by_dtype,
        attention_efficiency=attn_curve, copy_efficiency=copy_curve, view_overhead=view,
        asynchronous_launch=asynchronous, sources=sources,
    )


# --- the run --------------------------------------------------------------------------------


def calibrate(device: str | None = None, *, quick: bool = False, tiny: bool = False,
              disk_dir: str | None = None, progress: bool = True) -> HardwareProfile:
    """Run the sweeps on `device` ("cuda" or "cpu"; default: cuda when available) and fit."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise PeakcError(f"calibrate: device must be 'cuda' or 'cpu', got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise PeakcError("calibrate: device 'cuda' asked for but no CUDA device is available")
    sweep = sweep_for(device, quick, tiny)
    gemm_steps = len(sweep.gemm_m) * len(sweep.gemm_kn) * (len(sweep.gemm_dtypes) + sweep.tf32)
    total = gemm_steps + len(sweep.copy_sizes) + len(sweep.attention) + 3
    attn_dtype = "bf16" if device == "cuda" else "fp32"

    with _progress_bar(progress) as bar:
        task = bar.add_task("calibrate", total=total)

        def stage(text: str) -> Callable[[], None]:
            bar.update(task, description=text)
            return lambda: bar.advance(task)

        threads = torch.get_num_threads()
        if tiny and device == "cpu":
            torch.set_num_threads(1)  # tiny sweeps must not wait on a busy core's scheduler
        try:
            copies, gemms, attention, transfers, disk, launch, view = _measure_all(
                sweep, device, attn_dtype, disk_dir, stage)
        finally:
            torch.set_num_threads(threads)
    label = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    base = _builtin_for(label) if device == "cuda" else None
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return fit_profile(f"calibrated-{slug}", label, gemms, copies, attention, attn_dtype,
                       transfers, disk, launch, view, _capacities(device, disk_dir),
                       asynchronous=device == "cuda", base=base)


def _measure_all(sweep: Sweep, device: str, attn_dtype: str, disk_dir: str | None,
                 stage: Callable[[str], Callable[[], None]]) -> tuple:
    """Every measurement of one calibration, in order, each advancing the progress bar."""
    with torch.inference_mode():
        copies = measure_copies(sweep, device, stage("copy sweep"))
        gemms = measure_gemms(sweep, device, stage("GEMM sweep"))
        attention = measure_attention(sweep, device, DTYPES[attn_dtype], stage("attention"))
        step = stage("host-device transfers")
        transfers = measure_transfers(sweep, device)
        step()
        step = stage("disk read")
        disk = measure_disk(sweep, disk_dir)
        step()
        step = stage("launch overhead")
        launch, view = measure_host_overheads(sweep, device)
        step()
    return copies, gemms, attention, transfers, disk, launch, view


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
            lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), device, iters // 4),
    }
    model, (ids,) = demo_llama(0, vocab_size=64, hidden_size=64, intermediate_size=128,
                               num_layers=4, num_heads=4, num_kv_heads=2)
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


def forward_seconds(fn: Callable[[], object], device: str, repeats: int = 9) -> float:
    """Median seconds of single calls from an idle device (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


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

    return Progress(TextColumn("{task.description:<24}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())


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
