"""Kernel timing shared by the GPU benchmarks: the median device time of a callable's launches
replayed from a CUDA graph (Python launch overhead out; triton.testing.do_bench clears L2
before each replay); on the CPU (the benchmarks' --smoke runs) one call's wall time."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], rep: int = 50) -> float:
    """Milliseconds of one call of `fn`: the median of CUDA-graph replays over `rep` ms, after
    one eager call and one call on a side stream (the warm-up graph capture needs)."""
    fn()
    if not torch.cuda.is_available():
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=10, rep=rep, return_mode="median")
