"""Timing primitives for calibration and the accuracy benchmark.

On a GPU, device time is taken by replaying a CUDA graph of back-to-back calls (CUDA events,
median of repeats), so host issue cost stays out of it; inputs rotate among copies larger
than the L2 cache so that repeats read device memory, as a model's weights are. Host time
(eager issue cost) is measured separately. On a CPU, device and host are one clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

ROTATE_BYTES = 128 * 2**20  # copies of an op's inputs fill this many bytes (> L2 of a GPU)
MAX_COPIES = 8


def copies_for(nbytes: float) -> int:
    """How many copies of inputs of `nbytes` to rotate among so that repeats miss the cache."""
    return int(min(max(ROTATE_BYTES // max(int(nbytes), 1), 1), MAX_COPIES))


def warm_up(calls: list[Callable[[], object]]) -> None:
    """Run each call once on a side stream (CUDA graph capture wants warmed-up libraries)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def graph_seconds(
    calls: list[Callable[[], object]], target: float = 2e-3, repeats: int = 5
) -> float:
    """Device seconds of one call: replays of a CUDA graph of back-to-back calls, median.

    The graph holds `reps` calls cycling through `calls` (one per input copy), `reps` chosen
    so that one replay lasts about `target` seconds.
    """
    warm_up(calls)
    with torch.no_grad():
        probe = torch.cuda.CUDAGraph()
        with torch.cuda.graph(probe):
            for call in calls:
                call()
        probe.replay()
        torch.cuda.synchronize()
        once = _replay_seconds(probe, 3) / len(calls)
        del probe
        reps = int(min(max(target / max(once, 1e-7), len(calls), 4), 400))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                calls[i % len(calls)]()
        graph.replay()
        torch.cuda.synchronize()
        seconds = _replay_seconds(graph, repeats) / reps
        del graph
    return seconds


def _replay_seconds(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def device_seconds(
    calls: list[Callable[[], object]], device: str, target: float, repeats: int = 3
) -> float:
    """Device seconds of one call: a CUDA graph replay on a GPU; on a CPU, the fastest loop."""
    if device == "cuda":
        return graph_seconds(calls, target, repeats)
    for call in calls:
        call()
    start = time.perf_counter()
    calls[0]()
    once = time.perf_counter() - start
    iters = int(min(max(target / max(once, 1e-7), 3), 200))
    samples = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        for i in range(iters):
            calls[i % len(calls)]()
        samples.append((time.perf_counter() - start) / iters)
    return min(samples)  # other processes only add time on a shared CPU


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


def forward_seconds(fn: Callable[[], object], device: str, repeats: int = 9) -> float:
    """Median seconds of single eager calls from an idle device (CUDA events on a GPU)."""
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


def count_kernels(fn: Callable[[], object], reps: int = 3) -> float:
    """Device kernels (and memcpy/memset) one eager call of `fn` launches, by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    launched = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(launched) / reps
