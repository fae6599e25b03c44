"""Low-bit linear kernels against cuBLAS bf16 on one 8B layer's four linears (issue 17, Speed).

One GPU call: measures the copy bandwidth (the floor's denominator); checks the linear_wq
kernels on layouts the table does not cover (groups of 16-64, act-order, per channel, bias,
fp16; their CUDA path converts codes with inline PTX, which the CPU tests cannot run); checks
every kernel against dequantize + matmul in float32 at every shape and M, before and after
timing it as a CUDA graph replay with triton.testing.do_bench (median, L2 cleared before each
run); optionally sweeps kernel configurations (what the config tables in
peakc/backends/triton/kernels/ come from); writes the records as JSON after each one and
prints a table of the layer sums last. Exits non-zero if any result disagrees.

    python benchmarks/lowbit_kernels.py [--out benchmarks/results/lowbit_kernels.json]
    python benchmarks/lowbit_kernels.py --smoke     # tiny shapes on the CPU (Triton interpreter)
    python benchmarks/lowbit_kernels.py --table     # RESULTS.md rows from --out
    python benchmarks/lowbit_kernels.py --rows 1,16 --kernels cublas-bf16,peakc-int4 \
        --sweep-out sweep.json --sweep-rows 1,16 --sweep-kinds int4,int8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
import triton
from graph_timing import time_ms
from triton.testing import do_bench

from peakc.backends.triton.kernels.linear_wq import (
    CONFIGS,
    KernelConfig,
    RepackedLinear,
    choose_config,
    linear_wq_triton,
    repack_linear_wq,
)
from peakc.backends.triton.kernels.sparse24 import (
    RepackedSparse24,
    Sparse24Config,
    choose_sparse24_config,
    linear_sparse24_triton,
    repack_sparse24,
    repack_sparse24_wq,
)
from peakc.ir.ops import (
    compress_sparse24,
    decompress_sparse24,
    dequantize_weight,
    pack_bits,
    sparse24_values_weight,
)

LINEARS = [
    (4096, 6144),
    (4096, 4096),
    (4096, 28672),
    (14336, 4096),
]  # (K, N): qkv, o, gate_up, down
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
SMOKE_LINEARS = [(256, 96), (128, 64)]  # --smoke: CPU, Triton interpreter, seconds
SMOKE_ROWS = [1, 3, 17, 64]
TOLERANCE = 1e-2  # ‖out - ref‖ / ‖ref‖ for bf16 operands
INT4 = dict(bits=4, group_size=128, sym=False)
INT8 = dict(bits=8, group_size=None, sym=True)  # per channel
LAYOUTS = {
    "peakc-int4": "int4 g128 asym",
    "torch-int4": "int4 g128",
    "peakc-int8": "int8 per-channel sym",
    "torch-2:4": "2:4 bf16",
    "peakc-2:4": "2:4 bf16",
    "peakc-2:4-int4": "2:4 + int4 g128 asym",
}
KERNELS = [
    "cublas-bf16",
    "torch-int4",
    "torch-2:4",
    "peakc-int4",
    "peakc-int8",
    "peakc-2:4",
    "peakc-2:4-int4",
]


def device_copy_bandwidth() -> float:
    """copy_bandwidth on the GPU; on the CPU (smoke) a host copy timed by the clock."""
    if torch.cuda.is_available():
        return copy_bandwidth()
    src = torch.empty(64 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    started = time.perf_counter()
    dst.copy_(src)
    return 2 * src.numel() / (time.perf_counter() - started)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None, sym: bool) -> tuple:
    """Round-to-nearest codes in peakc's linear_wq layout: (qweight, scales, qzeros, gs, K)."""
    n, k = w.shape
    gs = group_size or k
    groups = w.float().view(n, k // gs, gs)
    maxq = (1 << bits) - 1
    if sym:
        scale = groups.abs().amax(-1) / (maxq / 2)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = (high - low) / maxq
        zero = torch.round(-low / scale)
    scale = scale.clamp(min=1e-8)
    q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, maxq)
    q = q.view(n, k).to(torch.int64)
    return pack_bits(q, bits), scale.to(torch.bfloat16), pack_bits(zero.long(), bits), gs, k


def torch_int4(qweight, scales, qzeros, k: int) -> tuple[Callable, int]:
    """torch's tinygemm int4 (group 128) for the same codes: (matmul, weight bytes)."""
    codes = _codes(qweight, k)
    zeros = _codes(qzeros, scales.shape[1])
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    weight = torch._convert_weight_to_int4pack(packed, 8)
    # tinygemm dequantizes (q - 8) * s + offset; ours is (q - z) * s, so offset = (8 - z) * s
    offset = (8 - zeros).to(torch.float32) * scales.float()
    scale_zero = torch.stack([scales.float().T, offset.T], dim=-1).to(torch.bfloat16).contiguous()

    def matmul(x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x, weight, 128, scale_zero)

    return matmul, weight.numel() * weight.element_size() + scale_zero.numel() * 2


def _codes(packed: torch.Tensor, count: int) -> torch.Tensor:
    from peakc.ir.ops import unpack_bits

    return unpack_bits(packed, 4, count)


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4: the two largest of every 4 consecutive weights of a row kept."""
    n, k = w.shape
    groups = w.view(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).view(n, k)


def torch_24(weight: torch.Tensor) -> tuple[Callable, int]:
    """torch's semi-structured 2:4 (cuSPARSELt or CUTLASS): (matmul, compressed bytes)."""
    from torch.sparse import to_sparse_semi_structured

    sparse = to_sparse_semi_structured(weight)
    inner = [getattr(sparse, name) for name in sparse.__tensor_flatten__()[0]]
    nbytes = sum(t.numel() * t.element_size() for t in inner)

    def matmul(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, sparse)

    return matmul, nbytes


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return errors_of(out, ref)[0]


def errors_of(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(‖out - ref‖ / ‖ref‖, max |out - ref| / max |ref|); inf for a non-finite output."""
    if not torch.isfinite(out).all():
        return float("inf"), float("inf")
    diff = out.float() - ref
    return float(diff.norm() / ref.norm()), float(diff.abs().max() / ref.abs().max())


@dataclasses.dataclass
class Layer:
    k: int
    n: int
    weight: torch.Tensor
    int4: RepackedLinear
    int8: RepackedLinear
    deq4: torch.Tensor
    deq8: torch.Tensor
    torch_int4: Callable | None
    torch_int4_bytes: int
    torch_int4_reason: str
    sparse: RepackedSparse24  # the weight pruned 2:4 by magnitude
    sparse_int4: RepackedSparse24  # its kept values quantized int4 g128 (g64 over kept values)
    deq24: torch.Tensor
    deq24_int4: torch.Tensor
    torch_24: Callable | None
    torch_24_bytes: int
    torch_24_reason: str


def build_sparse(weight: torch.Tensor) -> tuple:
    """2:4 and 2:4 + int4 of `weight` in the kernels' layout, with their float weights."""
    k = weight.shape[1]
    pruned = prune_24(weight)
    values, meta = compress_sparse24(pruned)
    qweight, scales, qzeros, gs, _ = quantize_rtn(values, bits=4, group_size=64, sym=False)
    kept = sparse24_values_weight(qweight, scales, qzeros, 4, 2 * gs, k)
    deq_int4 = decompress_sparse24(kept.dequantize(), meta, k)
    packed = repack_sparse24(values, meta, k)
    packed_int4 = repack_sparse24_wq(qweight, scales, qzeros, meta, 4, 2 * gs, k)
    return pruned, packed, packed_int4, deq_int4


def build_layer(k: int, n: int, gen: torch.Generator, device: str = "cuda") -> Layer:
    weight = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    packs, deqs = [], []
    for spec in (INT4, INT8):
        qweight, scales, qzeros, gs, _ = quantize_rtn(weight, **spec)
        packs.append(repack_linear_wq(qweight, scales, qzeros, None, spec["bits"], gs, k))
        deqs.append(dequantize_weight(qweight, scales, qzeros, None, spec["bits"], gs, k))
        if spec is INT4:
            int4_parts = (qweight, scales, qzeros)
    matmul, nbytes, reason = None, 0, ""
    try:
        matmul, nbytes = torch_int4(*int4_parts, k)
        x = torch.randn(4, k, generator=gen, device=device).to(torch.bfloat16)
        err = relative_error(matmul(x), x.float() @ deqs[0].float().T)
        if err > TOLERANCE:
            matmul, reason = None, f"torch-int4 disagrees with the codes (rel err {err:.3g})"
    except (RuntimeError, AttributeError, NotImplementedError) as exc:  # not on this build
        matmul, reason = None, f"torch-int4 unavailable: {type(exc).__name__}: {exc}"[:300]
    pruned, sparse, sparse_int4, deq24_int4 = build_sparse(weight)
    matmul24, nbytes24, reason24 = None, 0, ""
    try:
        matmul24, nbytes24 = torch_24(pruned)
        x = torch.randn(64, k, generator=gen, device=device).to(torch.bfloat16)
        err = relative_error(matmul24(x), x.float() @ pruned.float().T)
        if err > TOLERANCE:
            matmul24, reason24 = None, f"torch-2:4 disagrees (rel err {err:.3g})"
    except (RuntimeError, ValueError, NotImplementedError) as exc:  # no sparse kernels here
        matmul24, reason24 = None, f"torch-2:4 unavailable: {type(exc).__name__}: {exc}"[:300]
    return Layer(k, n, weight, *packs, *deqs, matmul, nbytes, reason, sparse, sparse_int4,
                 pruned, deq24_int4, matmul24, nbytes24, reason24)  # fmt: skip


def kernels(layer: Layer) -> dict[str, tuple[Callable, torch.Tensor, int]]:
    """name -> (x -> out, the float weight it should equal, weight bytes)."""
    found = {
        "cublas-bf16": (
            lambda x: F.linear(x, layer.weight),
            layer.weight,
            layer.weight.numel() * 2,
        ),
        "peakc-int4": (
            lambda x: linear_wq_triton(x, layer.int4),
            layer.deq4,
            layer.int4.nbytes(),
        ),
        "peakc-int8": (
            lambda x: linear_wq_triton(x, layer.int8),
            layer.deq8,
            layer.int8.nbytes(),
        ),
    }
    if layer.torch_int4 is not None:
        found["torch-int4"] = (layer.torch_int4, layer.deq4, layer.torch_int4_bytes)
    if layer.torch_24 is not None:
        found["torch-2:4"] = (layer.torch_24, layer.deq24, layer.torch_24_bytes)
    found["peakc-2:4"] = (
        lambda x: linear_sparse24_triton(x, layer.sparse),
        layer.deq24,
        layer.sparse.nbytes(),
    )
    found["peakc-2:4-int4"] = (
        lambda x: linear_sparse24_triton(x, layer.sparse_int4),
        layer.deq24_int4,
        layer.sparse_int4.nbytes(),
    )
    return found


def sweep_candidates(m: int, bits: int) -> list[KernelConfig]:
    """Configurations tried per M (the table's own first)."""
    base = CONFIGS[[m <= bound for bound, _ in CONFIGS].index(True)][1][bits]
    fused = dataclasses.replace
    if m <= 8:
        others = [
            fused(base, block_n=128),
            fused(base, num_warps=8),
            fused(base, waves=2.0),
            fused(base, waves=8.0),
            fused(base, reduction="partials"),
            fused(base, num_stages=2),
            fused(base, num_stages=4),
            fused(base, block_n=512, num_warps=8),
        ]
    elif m <= 16:
        others = [
            fused(base, num_warps=4),
            fused(base, block_n=256),
            fused(base, waves=2.0),
            fused(base, waves=8.0),
            fused(base, block_n=256, num_warps=4),
            KernelConfig("fused", 8, 256),
        ]
    elif m <= 64:
        others = [
            fused(base, affine=True),
            fused(base, block_n=64),
            fused(base, block_n=256, num_warps=8),
            fused(base, block_m=32),
            fused(base, waves=2.0),
            fused(base, num_warps=8),
        ]
    else:
        others = [
            KernelConfig("fused", 128, 128, num_warps=8, split_k=1),
            KernelConfig("fused", 128, 128, num_warps=8, split_k=1, affine=True),
            KernelConfig("fused", 64, 256, num_warps=8, split_k=1, affine=True),
            KernelConfig("fused", 128, 256, num_warps=8, split_k=1, affine=True),
            KernelConfig("fused", 64, 128, split_k=1, affine=True),
            KernelConfig("dequant", 1, 128),
        ]
    return [base, *others]  # fmt: skip


def sparse_candidates(m: int, packed: RepackedSparse24) -> list[Sparse24Config]:
    """2:4 kernel configurations tried per M (the table's own first)."""
    base = choose_sparse24_config(m, packed)
    if m == 1:
        return [base, Sparse24Config(1, 64, 128), Sparse24Config(1, 256, 64),
                Sparse24Config(1, 128, 256), Sparse24Config(1, 128, 128, num_warps=8)]  # fmt: skip
    if m <= 16:
        return [base, Sparse24Config(16, 128, 64), Sparse24Config(16, 32, 128),
                Sparse24Config(16, 64, 64, num_stages=4), Sparse24Config(1, 128, 128)]  # fmt: skip
    if m <= 64:
        return [base, Sparse24Config(64, 64, 64), Sparse24Config(32, 128, 64, num_stages=4),
                Sparse24Config(64, 128, 128)]  # fmt: skip
    return [base, Sparse24Config(128, 256, 64, num_warps=8, split_k=1),
            Sparse24Config(1, 64, 64, kernel="dense"), Sparse24Config(1, 128, 32, kernel="dense"),
            Sparse24Config(128, 128, 32, num_warps=4, num_stages=4, split_k=1)]  # fmt: skip


def sweep_variants(m: int, weights: str, packed: object) -> list:
    """The configurations swept for one kind of weights at M."""
    if weights.startswith("2:4"):
        return sparse_candidates(m, packed)
    return sweep_candidates(m, packed.bits)


SWEEP_KINDS = {
    "int4": (lambda layer: layer.int4, lambda layer: layer.deq4, linear_wq_triton),
    "int8": (lambda layer: layer.int8, lambda layer: layer.deq8, linear_wq_triton),
    "2:4": (lambda layer: layer.sparse, lambda layer: layer.deq24, linear_sparse24_triton),
    "2:4-int4": (
        lambda layer: layer.sparse_int4,
        lambda layer: layer.deq24_int4,
        linear_sparse24_triton,
    ),
}


def sweep(
    layers: list[Layer], rows: list[int], kinds: list[str], gen: torch.Generator, out: Path
) -> list[dict]:
    """Each kind of weights' candidate configurations on every linear, the layer summed; the
    results rewritten to `out` after each configuration."""
    results = []
    for m in rows:
        for name in kinds:
            packed_of, deq_of, run = SWEEP_KINDS[name]
            for variant in sweep_variants(m, name, packed_of(layers[0])):
                total, errors = 0.0, []
                for layer in layers:
                    packed, deq = packed_of(layer), deq_of(layer)
                    x = torch.randn(m, layer.k, generator=gen, device=deq.device)
                    x = x.to(torch.bfloat16)
                    try:
                        err = errors_of(run(x, packed, config=variant), x.float() @ deq.float().T)
                        total += time_ms(
                            lambda x=x, p=packed, c=variant, r=run: r(x, p, config=c), rep=30
                        )
                    except Exception as exc:  # noqa: BLE001 - a config that fails to compile
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                        break
                    if err[0] > TOLERANCE:
                        errors.append(f"rel err {err[0]:.3g}")
                results.append(
                    dict(weights=name, M=m, config=dataclasses.asdict(variant),
                         layer_ms=None if errors else total, errors=errors)
                )  # fmt: skip
                out.write_text(json.dumps(results, indent=1) + "\n")
    return results


def print_sweep(results: list[dict]) -> None:
    print("\nsweep: best layer ms per (weights, M)")
    for weights in SWEEP_KINDS:
        for m in sorted({r["M"] for r in results}):
            tried = [r for r in results if r["weights"] == weights and r["M"] == m]
            done = (r for r in tried if r["layer_ms"] is not None)
            ok = sorted(done, key=lambda r: r["layer_ms"])
            for r in ok[:4]:
                c = " ".join(f"{k}={v}" for k, v in r["config"].items())
                print(f"  {weights} M={m:5d} {r['layer_ms']:.4f} ms  {c}")
            for r in (r for r in tried if r["layer_ms"] is None):
                print(f"  {weights} M={m:5d} FAILED {r['config']}: {r['errors'][:1]}")


# Layouts the table's weights do not cover, checked on the device (the CUDA kernels convert
# codes with inline PTX, which the interpreter tests cannot run): (bits, group, act-order, sym,
# N, K, bias, x dtype).
CHECK_LAYOUTS = [
    (4, 32, True, False, 200, 512, True, torch.float16),
    (4, 64, False, True, 256, 384, False, torch.bfloat16),
    (4, None, False, False, 136, 200, True, torch.bfloat16),
    (8, 64, False, False, 256, 512, True, torch.float16),
    (8, 16, True, True, 72, 160, False, torch.bfloat16),
]
CHECK_ROWS = [1, 17, 300]


def layout_checks(device: str, gen: torch.Generator) -> list[str]:
    """Every CHECK_LAYOUTS weight through linear_wq_triton (the M bucket's kernel) against the
    op's reference; returns the failures."""
    from peakc.ir.ops import _linear_wq_reference

    failures = []
    for bits, gs, act_order, sym, n, k, has_bias, dtype in CHECK_LAYOUTS:
        weight = torch.randn(n, k, generator=gen, device=device) * 0.02
        qweight, scales, qzeros, gs, _ = quantize_rtn(weight, bits, gs, sym)
        g_idx = None
        if act_order:
            order = torch.randperm(k, generator=gen, device=device)
            g_idx = (torch.argsort(order) // gs).to(torch.int32)
        args = (qweight, scales.to(dtype), qzeros, g_idx)
        packed = repack_linear_wq(*args, bits, gs, k)
        bias = torch.randn(n, generator=gen, device=device).to(dtype) if has_bias else None
        for m in CHECK_ROWS:
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)
            ref_bias = None if bias is None else bias.float()
            ref = _linear_wq_reference(x.float(), *args, ref_bias, bits, gs, k)
            rel, worst = errors_of(linear_wq_triton(x, packed, bias), ref)
            where = f"check int{bits} g{gs} act_order={act_order} {dtype} N={n} K={k} M={m}"
            print(f"{where}: rel err {rel:.2e}, max err {worst:.2e}")
            if not rel < TOLERANCE:
                failures.append(f"{where}: rel err {rel:.3g}")
    return failures


def markdown_table(records: list[dict]) -> str:
    """The four linears of a layer summed, per M: ms and speedup over cuBLAS bf16, per kernel,
    and the int4 and 2:4 + int4 floors (RESULTS.md rows come from this, never typed by hand)."""
    layer = [r for r in records if r.get("K") == "layer"]
    kernels = [k for k in KERNELS if any(r["kernel"] == k for r in layer)]
    by = {(r["kernel"], r["M"]): r for r in layer}
    floors = ["peakc-int4", "peakc-2:4-int4"]
    head = " | ".join(kernels + [f"{k.removeprefix('peakc-')} floor" for k in floors])
    lines = [f"| M | {head} |", "|---:" * (len(kernels) + len(floors) + 1) + "|"]
    for m in sorted({r["M"] for r in layer}):
        cublas = by[("cublas-bf16", m)]["ms"]
        cells = []
        for k in kernels:
            r = by.get((k, m))
            cells.append("-" if r is None else f"{r['ms']:.3f} ({cublas / r['ms']:.2f}x)")
        for k in floors:
            r = by.get((k, m))
            cells.append("-" if r is None else f"{r['floor_ms']:.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=root / "results" / "lowbit_kernels.json")
    parser.add_argument("--rows", default=None, help="M values of the table (default: all)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="the table's kernels")
    parser.add_argument("--sweep-out", type=Path, default=None)
    parser.add_argument("--sweep-rows", default="1,16,64,2048")
    parser.add_argument("--sweep-kinds", default=",".join(SWEEP_KINDS))
    parser.add_argument(
        "--table", action="store_true", help="print --out's layer rows as markdown and exit"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    if args.smoke and args.out == parser.get_default("out"):
        args.out = Path(tempfile.gettempdir()) / "lowbit_kernels_smoke.json"  # not the results
    linears, rows = (SMOKE_LINEARS, SMOKE_ROWS) if args.smoke else (LINEARS, ROWS)
    if args.rows:
        rows = [int(m) for m in args.rows.split(",")]
    chosen = args.kernels.split(",")
    where = "cpu" if args.smoke else "cuda"

    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    bandwidth = device_copy_bandwidth()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for bucket, configs in CONFIGS:
        print(f"config M <= {bucket}:", {w: dataclasses.astuple(c) for w, c in configs.items()})
    gen = torch.Generator(device=where).manual_seed(0)
    failures = [] if args.smoke else layout_checks(where, gen)
    layers = [build_layer(k, n, gen, where) for k, n in linears]
    for reason in (layers[0].torch_int4_reason, layers[0].torch_24_reason):
        if reason:
            print("skipped:", reason)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    common = dict(date=date, device=device, copy_TBps=round(bandwidth / 1e12, 3))
    # benchmarks/lowbit_e2e.py's end-to-end rows (they name a model) stay in the file
    old = json.loads(args.out.read_text()) if args.out.is_file() else []
    end_to_end = [r for r in old if "model" in r]
    records = []
    for layer in layers:
        for m in rows:
            x = torch.randn(m, layer.k, generator=gen, device=where).to(torch.bfloat16)
            for name, (fn, weight, nbytes) in kernels(layer).items():
                if name not in chosen:
                    continue
                ref = x.float() @ weight.float().T
                try:
                    rel, worst = errors_of(fn(x), ref)
                except Exception as exc:  # noqa: BLE001 - recorded and printed, not hidden
                    failures.append(f"{name} K={layer.k} N={layer.n} M={m}: {exc}"[:300])
                    continue
                if not rel < TOLERANCE:
                    failures.append(f"{name} K={layer.k} N={layer.n} M={m}: rel err {rel:.3g}")
                    continue
                ms = time_ms(lambda fn=fn, x=x: fn(x), rep=30)
                again = errors_of(fn(x), ref)[0]  # state kept between calls (split-K counters)
                if not again < TOLERANCE:
                    failures.append(f"{name} K={layer.k} N={layer.n} M={m}: rel err {again:.3g} "
                                    "after the timed calls")  # fmt: skip
                record = dict(common, kernel=name, K=layer.k, N=layer.n, M=m, ms=ms,
                              floor_ms=nbytes / bandwidth * 1e3, rel_err=rel, max_err=worst,
                              layout=LAYOUTS.get(name, "bf16"))  # fmt: skip
                if name in ("peakc-int4", "peakc-int8"):
                    packed = layer.int4 if name == "peakc-int4" else layer.int8
                    record["config"] = dataclasses.asdict(choose_config(m, packed))
                elif name.startswith("peakc-2:4"):
                    packed = layer.sparse if name == "peakc-2:4" else layer.sparse_int4
                    record["config"] = dataclasses.asdict(choose_sparse24_config(m, packed))
                records.append(record)
                args.out.write_text(json.dumps(end_to_end + records, indent=1) + "\n")
                print(f"{name} K={layer.k} N={layer.n} M={m}: {ms:.4f} ms, rel err {rel:.1e}")
    for name in KERNELS:
        for m in rows:
            parts = [r for r in records if r["kernel"] == name and r["M"] == m]
            if len(parts) == len(linears):
                records.append(dict(common, kernel=name, K="layer", N="layer", M=m,
                                    ms=sum(r["ms"] for r in parts),
                                    floor_ms=sum(r["floor_ms"] for r in parts),
                                    max_err=max(r["max_err"] for r in parts),
                                    layout=LAYOUTS.get(name, "bf16")))  # fmt: skip
    args.out.write_text(json.dumps(end_to_end + records, indent=1) + "\n")

    if args.sweep_out is not None:
        sweep_rows = [int(m) for m in args.sweep_rows.split(",") if m]
        kinds = args.sweep_kinds.split(",")
        print_sweep(sweep(layers, sweep_rows, kinds, gen, args.sweep_out))

    for failure in failures:
        print("FAILED", failure)
    print("\nlayer (four linears summed), ms (x = speedup over cublas-bf16)")
    print(markdown_table(records))
    if failures:
        sys.exit(f"{len(failures)} kernel results disagree with their references (FAILED above)")


if __name__ == "__main__":
    main()
