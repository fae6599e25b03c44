"""Fit efficiency curves from measured samples: the model the estimate inverts.

The estimate predicts a node as `kernels * kernel_gap + max(FLOPs / (peak * e_f(FLOPs)),
bytes / (bandwidth * e_b(class, bytes)))`. Fitting inverts that per sample: its work time
is the measured time less its kernels' gaps, and its efficiency is the binding resource's
amount over work time over the ceiling. Curves are medians per log-size bin.
"""

from __future__ import annotations

import math
import statistics

from peakc.cost_model.hardware import OP_CLASSES, Curve

MIN_WORK_SHARE = 0.1  # a sample's work time is at least this share of its measured time


def fit_curve(
    points: list[tuple[float, float]], bins_per_decade: int = 2, cap: float = 1.0
) -> Curve:
    """Median efficiency per log-size bin, as a curve with strictly increasing sizes."""
    if not points:
        return [(1.0, 1.0)]
    groups: dict[int, list[tuple[float, float]]] = {}
    for size, eff in points:
        groups.setdefault(math.floor(math.log10(size) * bins_per_decade), []).append((size, eff))
    curve: Curve = []
    for key in sorted(groups):
        size = float(statistics.median(s for s, _ in groups[key]))
        eff = float(statistics.median(e for _, e in groups[key]))
        if not curve or size > curve[-1][0]:
            curve.append((size, min(max(eff, 1e-6), cap)))
    return curve


def work_seconds(seconds: float, kernels: int, gap: float) -> float:
    """Measured seconds less the kernels' launch gaps (never below MIN_WORK_SHARE of it)."""
    return max(seconds - kernels * gap, MIN_WORK_SHARE * seconds)


def fit_gemms(
    rows: list[tuple[float, float, float]], bandwidth: float, gap: float
) -> tuple[float, Curve, list[tuple[float, float]]]:
    """(peak FLOP/s, FLOP-efficiency curve, bandwidth points) of one dtype's GEMM samples.

    Rows are (FLOPs, bytes, seconds). Samples whose arithmetic intensity is above the ridge
    (peak / bandwidth) fit the FLOP curve; the others are bandwidth points for the "gemm"
    class curve (weights streamed by skinny products).
    """
    peak = max(f / work_seconds(s, 1, gap) for f, _, s in rows)
    ridge = peak / bandwidth
    compute, memory = [], []
    for flops, moved, seconds in rows:
        work = work_seconds(seconds, 1, gap)
        if flops / moved >= ridge:
            compute.append((flops, flops / work / peak))
        else:
            memory.append((moved, moved / work / bandwidth))
    curve = fit_curve(compute, bins_per_decade=3) if compute else [(1.0, 1.0)]
    return peak, curve, memory


def fit_class_curves(
    samples: list, bandwidth: float, gap: float, attention_peak: float
) -> tuple[dict[str, Curve], Curve]:
    """(bandwidth curve per op class, attention FLOP curve) from op-class samples.

    `samples` are op_sweeps.OpSample; "attention_prefill" samples fit the FLOP curve,
    every other class its bandwidth curve.
    """
    points: dict[str, list[tuple[float, float]]] = {}
    attention: list[tuple[float, float]] = []
    for s in samples:
        work = work_seconds(s.seconds, s.kernels, gap)
        if s.op_class == "attention_prefill":
            attention.append((s.flops, s.flops / work / attention_peak))
        elif s.op_class in OP_CLASSES:
            lane_bytes = s.bytes * s.padding  # the size axis the estimate reads (OpCost)
            points.setdefault(s.op_class, []).append((lane_bytes, lane_bytes / work / bandwidth))
    curves = {k: fit_curve(v, bins_per_decade=3, cap=1.5) for k, v in points.items()}
    attn = fit_curve(attention, bins_per_decade=3) if attention else [(1.0, 1.0)]
    return curves, attn
