"""The cost model's curves for the low-bit and 2:4 Triton kernels, fitted from measurements.

Reads the per-linear records of `benchmarks/lowbit_kernels.py` runs (decode batches, M <= 16),
turns each into (weight bytes read, fraction of the copy bandwidth measured in the same run,
after the kernel's launch gap) as `peakc calibrate` does for the other op classes, fits one
curve per class with the calibration's own fit (`fit_curve`: median per third of a decade),
and writes peakc/cost_model/lowbit_curves.py. Below the smallest weight measured (an 8B
layer's linears are 7-130 MB) a curve follows the GPU profiles' copy curve at the ratio it
has to it at its first point: small kernels lose bandwidth to latency as a copy does. A
kernel's class takes its rows from the last file given that has them, so a partial run of the
int4 kernels refits "lowbit" while the 2:4 curves keep the run that measured them.

    python benchmarks/lowbit_curves.py benchmarks/results/lowbit_kernels.json \
        benchmarks/results/lowbit_kernels_partial.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peakc.cost_model.fit import fit_curve, work_seconds
from peakc.cost_model.hardware import Curve, efficiency_at, resolve_profile

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "peakc" / "cost_model" / "lowbit_curves.py"
CLASSES = {  # kernel in the results -> the cost model's op class
    "peakc-int4": "lowbit",
    "peakc-int8": "lowbit",
    "peakc-2:4": "sparse24",
    "peakc-2:4-int4": "sparse24_lowbit",
}
DECODE_ROWS = 16  # the curves price decode-sized batches
KERNEL_GAP = 2.5e-6  # seconds: the GPU profiles' kernel_gap, taken off each sample
SMALL_SIZES = (1e4, 1e5, 1e6)  # bytes below the measured range, priced after the copy curve


def samples(
    paths: list[Path],
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[str]]]:
    """Per class, (bytes, efficiency) points from the last file holding its kernels' rows,
    and the file, device and date each class comes from."""
    chosen: dict[str, tuple[Path, list[dict]]] = {}
    for path in paths:
        records = json.loads(path.read_text())
        for kernel in CLASSES:
            rows = [
                r for r in records
                if r["kernel"] == kernel and isinstance(r.get("K"), int) and r["M"] <= DECODE_ROWS
            ]  # fmt: skip
            if rows:
                chosen[kernel] = (path, rows)
    points: dict[str, list[tuple[float, float]]] = {}
    sources: dict[str, set[str]] = {}
    for kernel, (path, rows) in chosen.items():
        op_class = CLASSES[kernel]
        for r in rows:
            bandwidth = r["copy_TBps"] * 1e12
            nbytes = r["floor_ms"] / 1e3 * bandwidth
            work = work_seconds(r["ms"] / 1e3, 1, KERNEL_GAP)
            points.setdefault(op_class, []).append((nbytes, nbytes / work / bandwidth))
        where = f"{path.relative_to(ROOT)} ({rows[0]['device']}, {rows[0]['date']})"
        sources.setdefault(op_class, set()).add(f"{kernel}: {where}")
    return points, {k: sorted(v) for k, v in sources.items()}


def extend_below(curve: Curve, copy: Curve) -> Curve:
    """`curve` with points below its first size that keep its ratio to the copy curve there."""
    size, eff = curve[0]
    ratio = eff / efficiency_at(copy, size)
    small = [(s, efficiency_at(copy, s) * ratio) for s in SMALL_SIZES if s < size]
    return small + curve


def module_text(curves: dict[str, list], sources: dict[str, list[str]]) -> str:
    """The module's source, laid out as `ruff format` leaves it."""
    lines = [
        '"""Efficiency curves of the low-bit and 2:4 Triton kernels at decode batches: weight',
        "bytes read -> fraction of the copy bandwidth. Written by benchmarks/lowbit_curves.py from",
        'measured runs (SOURCES); refit there, do not edit by hand."""',
        "",
        "LOWBIT_CURVES = {",
    ]
    for name in sorted(curves):
        lines.append(f'    "{name}": [')
        lines += [f"        ({float(f'{s:.3g}')!r}, {round(e, 4)!r})," for s, e in curves[name]]
        lines.append("    ],")
    lines += ["}", "", "SOURCES = {"]
    for name in sorted(sources):
        lines.append(f'    "{name}": [')
        lines += [f'        "{source}",' for source in sources[name]]
        lines.append("    ],")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="lowbit_kernels.py JSON files")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    points, sources = samples([p.resolve() for p in args.results])
    missing = sorted(set(CLASSES.values()) - set(points))
    if missing:
        parser.error(f"no decode rows for {', '.join(missing)} in the files given")
    copy = resolve_profile("h200").copy_efficiency
    curves = {k: extend_below(fit_curve(v, bins_per_decade=3), copy) for k, v in points.items()}
    args.out.write_text(module_text(curves, sources))
    for name, curve in sorted(curves.items()):
        print(f"{name:16s}", " ".join(f"{s:.2g}:{e:.3f}" for s, e in curve))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
