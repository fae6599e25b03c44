"""A roofline chart (PNG) of an estimate's nodes against the profile's ceilings."""

from __future__ import annotations

from pathlib import Path

from peakc.cost_model.estimate import Estimate
from peakc.cost_model.hardware import HardwareProfile
from peakc.errors import PeakcError


def plot_roofline(est: Estimate, profile: HardwareProfile, path: str | Path) -> Path:
    """Each kernel at (FLOPs per byte, estimated FLOP/s); ceilings: bandwidth and dtype peaks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PeakcError("--plot needs matplotlib: pip install 'peakc[plot]'") from None
    kernels = [n for n in est.nodes if n.kind != "free" and n.bytes > 0 and n.flops > 0]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lo = min([n.flops / n.bytes for n in kernels], default=0.01) / 4
    hi = max([n.flops / n.bytes for n in kernels], default=1e4) * 4
    hi = max(hi, 4 * max(profile.peak_flops.values()) / profile.memory_bandwidth)
    xs = [lo, hi]
    for dtype, peak in sorted(profile.peak_flops.items(), key=lambda kv: kv[1]):
        ridge = peak / profile.memory_bandwidth
        ax.plot([lo, max(ridge, lo)], [lo * profile.memory_bandwidth, peak], color="grey", lw=0.8)
        ax.plot([max(ridge, lo), hi], [peak, peak], lw=1, label=f"{dtype} peak")
    for kind, marker in (("gemm", "o"), ("attention", "s"), ("memory", ".")):
        pts = [n for n in kernels if n.kind == kind]
        if pts:
            ax.scatter(
                [n.flops / n.bytes for n in pts],
                [n.flops / max(n.device_time, 1e-12) for n in pts],
                marker=marker,
                s=14,
                label=f"{kind} ({len(pts)})",
                alpha=0.7,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*xs)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("estimated FLOP/s")
    ax.set_title(f"{est.phase} on {profile.name}: {len(kernels)} kernels")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
