"""The templated Triton kernels of peakc's ops against their eager references, on the shapes of
a Llama 1B and 8B layer (issue 16, templated kernels; the backend's own benchmark is
benchmarks/triton_backend.py).

One GPU call: measures the copy bandwidth, then for each op and shape checks every config of
the kernel (`fn.configs`) against the op's reference, times it and the reference as CUDA graph
replays (triton.testing.do_bench, median, L2 cleared before each run) and records the bytes
the op must move (inputs read once, outputs written once: for attention_cache the context's
keys and values), the achieved bandwidth and its share of the copy bandwidth. Decode shapes
are batch 1, 8 and 32 at context 1024; prefill is 2048 tokens.

    python benchmarks/triton_kernels.py [--out benchmarks/results/triton_kernels.json]
    python benchmarks/triton_kernels.py --smoke     # tiny shapes, default configs, on the CPU
    python benchmarks/triton_kernels.py --table     # RESULTS.md rows from --out
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import triton
from graph_timing import time_ms
from triton.testing import do_bench

import peakc.backends.triton.kernels  # noqa: F401  (registers the lowerings)
from peakc.ir.ops import OPS, lowering_for

TOLERANCE = 2e-2  # ‖out - ref‖ / ‖ref‖ for bf16


@dataclass
class Model:
    """The layer shapes a model's kernels see."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int


MODELS = [Model("llama-1b", 2048, 32, 8, 64, 8192), Model("llama-8b", 4096, 32, 8, 128, 14336)]
SMOKE_MODELS = [Model("smoke", 101, 4, 2, 32, 96)]
# (label, batch, new tokens, context already in the cache)
PHASES = [("decode b1", 1, 1, 1024), ("decode b8", 8, 1, 1024), ("decode b32", 32, 1, 1024),
          ("prefill 2048", 1, 2048, 0)]  # fmt: skip
SMOKE_PHASES = [("decode b1", 1, 1, 20), ("decode b3", 3, 1, 9), ("prefill 7", 1, 7, 0)]


@dataclass
class Case:
    """One op call: its arguments and the bytes it must move at the least."""

    op: str
    args: tuple
    nbytes: int


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cases(model: Model, batch: int, seq: int, context: int, device: str) -> list[Case]:
    """The templated ops of one layer of `model` at (batch, seq) over `context` cached tokens."""
    dtype = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    m, h, d = batch * seq, model.hidden, model.head_dim
    x, skip, w, b = randn(m, h), randn(m, h), randn(h), randn(h)
    fused = randn(m, 2 * model.ffn)
    gate, up = fused[:, : model.ffn], fused[:, model.ffn :]
    q = randn(batch, seq, model.heads, d).transpose(1, 2)
    k, v = randn(batch, model.kv_heads, seq, d), randn(batch, model.kv_heads, seq, d)
    cos, sin = randn(batch, seq, d // 2), randn(batch, seq, d // 2)
    capacity = triton.next_power_of_2(context + seq)
    k_cache = randn(batch, model.kv_heads, capacity, d)
    v_cache = randn(batch, model.kv_heads, capacity, d)
    positions = torch.arange(context, context + seq, device=device).expand(batch, seq)
    context_kv = 2 * batch * model.kv_heads * context * d * k_cache.element_size()
    rows_out = m * h * x.element_size()
    found = [
        Case("rms_norm", (x, w, 1e-6), nbytes(x, w) + rows_out),
        Case("skip_rms_norm", (x, skip, w, 1e-6), nbytes(x, skip, w) + 2 * rows_out),
        Case("layer_norm", (x, w, b, 1e-5), nbytes(x, w, b) + rows_out),
        Case("skip_layer_norm", (x, skip, w, b, 1e-5), nbytes(x, skip, w, b) + 2 * rows_out),
        Case("rotary_embedding", (q, cos, sin, False), 2 * nbytes(q) + nbytes(cos, sin)),
        Case("rotary_embedding", (q, cos, sin, True), 2 * nbytes(q) + nbytes(cos, sin)),
        Case("glu", (gate, up, "silu"), nbytes(gate, up) + nbytes(gate)),
        Case("gelu", (gate, randn(model.ffn), "tanh"), 2 * nbytes(gate)),
        Case(
            "attention_cache",
            (q, k, v, k_cache, v_cache, positions, d**-0.5),
            2 * nbytes(q) + nbytes(k, v, positions) + context_kv,
        ),  # fmt: skip
    ]
    if context == 0:  # prefill without a cache: the attention op (encoders, no-cache decoders)
        found.append(Case("attention", (q, k, v, None, True, d**-0.5), nbytes(q, k, v, q)))
    return found


def copy_bandwidth() -> float:
    """Bytes per second of a device copy (read + written); on the CPU a host copy."""
    if not torch.cuda.is_available():
        src = torch.empty(64 << 20, dtype=torch.uint8)
        started = time.perf_counter()
        src.clone()
        return 2 * src.numel() / (time.perf_counter() - started)
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (do_bench(lambda: dst.copy_(src), rep=200) * 1e-3)


def relative_error(out, ref) -> float:
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    errors = [float((o.float() - r.float()).norm() / r.float().norm()) for o, r in zip(outs, refs)]
    return max(errors) if all(e == e for e in errors) else float("inf")


def measure(case: Case, bandwidth: float, base: dict, every_config: bool) -> list[dict]:
    """The reference and the kernel's configs (all, or the default) on one case, as records."""
    reference = OPS[case.op].reference
    launcher = lowering_for(case.op, "triton").fn
    expected = reference(*case.args)
    variant = "interleaved" if case.op == "rotary_embedding" and case.args[3] else ""
    rows = []
    configs = launcher.configs if every_config else launcher.configs[:1]
    candidates = [("torch-eager", None)] + [("peakc-triton", c) for c in configs]
    for runtime, config in candidates:
        record = dict(base, op=case.op, variant=variant, runtime=runtime, config=config,
                      bytes=case.nbytes)  # fmt: skip
        if config is None:
            fn = functools.partial(reference, *case.args)
        else:
            fn = functools.partial(launcher, *case.args, config=config)
        try:
            record["rel_err"] = relative_error(fn(), expected)
            record["ms"] = time_ms(fn)
        except Exception as exc:  # noqa: BLE001 - recorded in the results, not hidden
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(record)
            continue
        record["GBps"] = case.nbytes / (record["ms"] * 1e-3) / 1e9
        record["of_copy"] = case.nbytes / (record["ms"] * 1e-3) / bandwidth
        if record["rel_err"] > TOLERANCE:
            record["error"] = f"relative error {record['rel_err']:.3g}"
        rows.append(record)
    return rows


def markdown_table(records: list[dict]) -> str:
    """Per model, phase and op: eager ms, the default config's and the best config's ms, the
    best's speedup and its share of the copy bandwidth (RESULTS.md rows come from this)."""
    lines = [
        "| model | phase | op | eager ms | triton default ms | triton best ms (config) "
        "| speedup | of copy BW |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    keys = dict.fromkeys((r["model"], r["phase"], r["op"], r["variant"]) for r in records)
    for model, phase, op, variant in keys:
        group = [r for r in records if (r["model"], r["phase"], r["op"], r["variant"]) ==
                 (model, phase, op, variant) and "error" not in r]  # fmt: skip
        eager = [r for r in group if r["runtime"] == "torch-eager"]
        ours = [r for r in group if r["runtime"] == "peakc-triton"]
        if not eager or not ours:
            continue
        default = ours[0] if ours[0]["config_index"] == 0 else None
        best = min(ours, key=lambda r: r["ms"])
        name = f"{op} ({variant})" if variant else op
        lines.append(
            f"| {model} | {phase} | {name} | {eager[0]['ms']:.4f} | "
            f"{default['ms'] if default else float('nan'):.4f} | "
            f"{best['ms']:.4f} (#{best['config_index']}) | {eager[0]['ms'] / best['ms']:.2f}x | "
            f"{best['of_copy']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=root / "results" / "triton_kernels.json")
    parser.add_argument("--table", action="store_true", help="print --out as markdown and exit")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    if args.smoke and args.out == parser.get_default("out"):
        args.out = Path(tempfile.gettempdir()) / "triton_kernels_smoke.json"  # not the results
    models, phases = (SMOKE_MODELS, SMOKE_PHASES) if args.smoke else (MODELS, PHASES)
    device = "cpu" if args.smoke else "cuda"
    torch.manual_seed(0)
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    base = dict(date=datetime.date.today().isoformat(), device=name,
                copy_TBps=round(bandwidth / 1e12, 3))  # fmt: skip
    records = []
    for model in models:
        for phase, batch, seq, context in phases:
            for case in cases(model, batch, seq, context, device):
                at = dict(base, model=model.name, phase=phase)
                for index, record in enumerate(measure(case, bandwidth, at, not args.smoke)):
                    record["config_index"] = index - 1  # -1: the eager reference
                    records.append(record)
                    if "error" in record:
                        print(f"FAILED {model.name} {phase} {case.op} {record['config']}: "
                              f"{record['error']}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(markdown_table(records))


if __name__ == "__main__":
    main()
