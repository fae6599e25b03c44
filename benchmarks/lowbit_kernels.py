"""Low-bit linear kernels against cuBLAS bf16 on one 8B layer's four linears (issue 17, Speed).

One GPU call: measures the copy bandwidth (the floor's denominator), checks every kernel
against dequantize + matmul in float32 at every shape and M, times each as a CUDA graph
replay with triton.testing.do_bench (median, L2 cleared before each run), sweeps a few kernel
configurations (what the config table in peakc/backends/triton/kernels/linear_wq.py comes
from), writes the records as JSON and prints a table of the layer sums last.

    python benchmarks/lowbit_kernels.py [--out benchmarks/results/lowbit_kernels.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from peakc.backends.triton.kernels.linear_wq import (
    CONFIGS,
    KernelConfig,
    RepackedLinear,
    _multiprocessors,
    choose_config,
    linear_wq_triton,
    repack_linear_wq,
    split_count,
)
from peakc.ir.ops import dequantize_weight, pack_bits

LINEARS = [
    (4096, 6144),
    (4096, 4096),
    (4096, 28672),
    (14336, 4096),
]  # (K, N): qkv, o, gate_up, down
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
TOLERANCE = 1e-2  # ‖out - ref‖ / ‖ref‖ for bf16 operands
INT4 = dict(bits=4, group_size=128, sym=False)
INT8 = dict(bits=8, group_size=None, sym=True)  # per channel
LAYOUTS = {
    "peakc-int4": "int4 g128 asym",
    "torch-int4": "int4 g128",
    "peakc-int8": "int8 per-channel sym",
}


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


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - ref).norm() / ref.norm())


def time_ms(fn: Callable) -> float:
    """Median GPU time of fn's launches, replayed from a CUDA graph so that Python launch
    overhead stays out (do_bench still clears L2 before each replay)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=10, rep=30, return_mode="median")


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


def build_layer(k: int, n: int, gen: torch.Generator) -> Layer:
    weight = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
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
        x = torch.randn(4, k, generator=gen, device="cuda").to(torch.bfloat16)
        err = relative_error(matmul(x), x.float() @ deqs[0].float().T)
        if err > TOLERANCE:
            matmul, reason = None, f"torch-int4 disagrees with the codes (rel err {err:.3g})"
    except (RuntimeError, AttributeError) as exc:  # missing op or unsupported on this build
        matmul, reason = None, f"torch-int4 unavailable: {type(exc).__name__}: {exc}"[:300]
    return Layer(k, n, weight, *packs, *deqs, matmul, nbytes, reason)


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
    return found


def sweep_candidates(m: int, bits: int) -> list[KernelConfig]:
    """Configurations tried per M (the table's own among them); block_k in words of 32 bits."""

    def cols(words: int) -> int:
        return words * 32 // bits

    if m == 1:
        base = KernelConfig("splitk", 1, 256, cols(16))
        return [
            base,
            dataclasses.replace(base, block_n=128),
            dataclasses.replace(base, block_n=512),
            dataclasses.replace(base, block_k=cols(32)),
            dataclasses.replace(base, num_warps=8),
            dataclasses.replace(base, num_stages=4),
            dataclasses.replace(base, reduction="atomic"),
            dataclasses.replace(base, block_n=128, num_warps=2),
            KernelConfig("splitk", 16, 128, cols(16)),
            KernelConfig("splitk", 16, 64, cols(16)),
        ]
    if m <= 16:
        base = KernelConfig("splitk", 16, 128, cols(16))
        return [
            base,
            dataclasses.replace(base, block_n=64),
            dataclasses.replace(base, block_n=256, num_warps=8),
            dataclasses.replace(base, block_k=cols(32)),
            dataclasses.replace(base, num_warps=8),
            dataclasses.replace(base, num_stages=4),
            dataclasses.replace(base, reduction="atomic"),
        ]
    if m <= 64:
        return [
            KernelConfig("splitk", 64, 128, cols(16)),
            KernelConfig("splitk", 64, 64, cols(16)),
            KernelConfig("splitk", 64, 128, cols(32), num_warps=8),
            KernelConfig("gemm", 64, 128, cols(16)),
            KernelConfig("gemm", 64, 64, cols(16)),
        ]
    return [
        KernelConfig("gemm", 128, 128, cols(16), num_warps=8, num_stages=3),
        KernelConfig("gemm", 128, 128, cols(16), num_warps=8, num_stages=4),
        KernelConfig("gemm", 128, 256, cols(16), num_warps=8, num_stages=3),
        KernelConfig("gemm", 64, 128, cols(16), num_warps=4, num_stages=4),
        KernelConfig("gemm", 128, 128, cols(32), num_warps=8, num_stages=3),
        KernelConfig("gemm", 256, 128, cols(16), num_warps=8, num_stages=3),
    ]


def sweep(layers: list[Layer], rows: list[int], gen: torch.Generator) -> list[dict]:
    """Each candidate (and, at M <= 16, its split halved and doubled) on every linear."""
    results = []
    for m in rows:
        for name, bits in (("int4", 4), ("int8", 8)):
            variants = []
            for config in sweep_candidates(m, bits):
                variants.append(config)
                if config.kernel == "splitk" and m <= 16:
                    variants.append(dataclasses.replace(config, split_k=-2))
                    variants.append(dataclasses.replace(config, split_k=-3))
            for variant in variants:
                total, errors = 0.0, []
                for layer in layers:
                    packed = layer.int4 if bits == 4 else layer.int8
                    deq = layer.deq4 if bits == 4 else layer.deq8
                    chosen = _resolve_split(variant, m, packed)
                    x = torch.randn(m, layer.k, generator=gen, device="cuda").to(torch.bfloat16)
                    try:
                        err = relative_error(
                            linear_wq_triton(x, packed, config=chosen),
                            x.float() @ deq.float().T,
                        )
                        total += time_ms(
                            lambda x=x, p=packed, c=chosen: linear_wq_triton(x, p, config=c)
                        )
                    except Exception as exc:  # noqa: BLE001 - a config that fails to compile
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                        break
                    if err > TOLERANCE:
                        errors.append(f"rel err {err:.3g}")
                results.append(
                    dict(weights=name, M=m, config=dataclasses.asdict(variant),
                         layer_ms=None if errors else total, errors=errors)
                )  # fmt: skip
    return results


def _resolve_split(config: KernelConfig, m: int, packed: RepackedLinear) -> KernelConfig:
    """split_k -2 / -3: the automatic split halved / doubled (sweep only)."""
    if config.split_k >= 0:
        return config
    block_k = config.block_k
    tiles = triton.cdiv(packed.out_features, config.block_n) * triton.cdiv(m, config.block_m)
    k_tiles = packed.k_padded // block_k
    splits, _ = split_count(tiles, k_tiles, _multiprocessors(torch.device("cuda")))
    splits = max(1, splits // 2) if config.split_k == -2 else min(k_tiles, splits * 2)
    return dataclasses.replace(config, split_k=splits)


def markdown_table(records: list[dict]) -> str:
    """The four linears of a layer summed, per M: ms and speedup over cuBLAS bf16, per kernel
    (RESULTS.md rows come from this, never typed by hand)."""
    layer = [r for r in records if r["K"] == "layer"]
    kernels = sorted({r["kernel"] for r in layer}, key=lambda k: (k != "cublas-bf16", k))
    by = {(r["kernel"], r["M"]): r for r in layer}
    cublas = {m: by[("cublas-bf16", m)]["ms"] for k, m in by if k == "cublas-bf16"}
    lines = ["| M | " + " | ".join(kernels) + " | int4 floor |", "|---:" * (len(kernels) + 2) + "|"]
    for m in sorted({r["M"] for r in layer}):
        cells = []
        for k in kernels:
            r = by.get((k, m))
            cells.append("-" if r is None else f"{r['ms']:.3f} ({cublas[m] / r['ms']:.2f}x)")
        floor = by.get(("peakc-int4", m), {}).get("floor_ms")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {floor:.4f} |" if floor else "| - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=root / "results" / "lowbit_kernels.json")
    parser.add_argument("--sweep-out", type=Path, default=None)
    parser.add_argument("--sweep-rows", default="1,16,64,2048")
    parser.add_argument(
        "--table", action="store_true", help="print --out's layer rows as markdown and exit"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return

    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    bandwidth = copy_bandwidth()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for bucket, configs in CONFIGS:
        print(f"config M <= {bucket}:", {w: dataclasses.astuple(c) for w, c in configs.items()})
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [build_layer(k, n, gen) for k, n in LINEARS]
    if layers[0].torch_int4_reason:
        print("torch-int4 skipped:", layers[0].torch_int4_reason)

    records, failures = [], []
    for layer in layers:
        for m in ROWS:
            x = torch.randn(m, layer.k, generator=gen, device="cuda").to(torch.bfloat16)
            for name, (fn, weight, nbytes) in kernels(layer).items():
                ref = x.float() @ weight.float().T
                try:
                    err = relative_error(fn(x), ref)
                except Exception as exc:  # noqa: BLE001 - recorded and printed, not hidden
                    failures.append(f"{name} K={layer.k} N={layer.n} M={m}: {exc}"[:300])
                    continue
                if err > TOLERANCE:
                    failures.append(f"{name} K={layer.k} N={layer.n} M={m}: rel err {err:.3g}")
                    continue
                ms = time_ms(lambda fn=fn, x=x: fn(x))
                record = dict(date=date, device=device, kernel=name, K=layer.k, N=layer.n, M=m,
                              ms=ms, floor_ms=nbytes / bandwidth * 1e3, rel_err=err)  # fmt: skip
                if name.startswith("peakc"):
                    packed = layer.int4 if name == "peakc-int4" else layer.int8
                    record["config"] = dataclasses.asdict(choose_config(m, packed))
                records.append(record)
    for name in ("cublas-bf16", "torch-int4", "peakc-int4", "peakc-int8"):
        for m in ROWS:
            rows = [r for r in records if r["kernel"] == name and r["M"] == m]
            if len(rows) == len(LINEARS):
                records.append(dict(date=date, device=device, kernel=name, K="layer", N="layer",
                                    M=m, ms=sum(r["ms"] for r in rows),
                                    floor_ms=sum(r["floor_ms"] for r in rows)))  # fmt: skip
    for record in records:
        record["copy_TBps"] = round(bandwidth / 1e12, 3)
        record["layout"] = LAYOUTS.get(record["kernel"], "bf16")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")

    if args.sweep_out is not None:
        sweep_rows = [int(m) for m in args.sweep_rows.split(",") if m]
        results = sweep(layers, sweep_rows, gen)
        args.sweep_out.write_text(json.dumps(results, indent=1) + "\n")
        print("\nsweep: best layer ms per (weights, M)")
        for weights in ("int4", "int8"):
            for m in sweep_rows:
                tried = [r for r in results if r["weights"] == weights and r["M"] == m]
                ok = sorted(
                    (r for r in tried if r["layer_ms"] is not None), key=lambda r: r["layer_ms"]
                )
                bad = [r for r in tried if r["layer_ms"] is None]
                for r in ok[:3]:
                    c = r["config"]
                    print(
                        f"  {weights} M={m:5d} {r['layer_ms']:.4f} ms  {c['kernel']} "
                        f"bm{c['block_m']} bn{c['block_n']} bk{c['block_k']} w{c['num_warps']} "
                        f"s{c['num_stages']} split{c['split_k']} {c['reduction']}"
                    )
                for r in bad[:2]:
                    print(f"  {weights} M={m:5d} FAILED {r['config']}: {r['errors'][:1]}")

    for failure in failures:
        print("FAILED", failure)
    layer_rows = {(r["kernel"], r["M"]): r for r in records if r["K"] == "layer"}
    print("\nlayer (four linears summed), ms; x = speedup over cublas-bf16")
    names = ["cublas-bf16", "torch-int4", "peakc-int4", "peakc-int8"]
    print(f"{'M':>5} " + " ".join(f"{n:>19}" for n in names) + "  int4-floor")
    for m in ROWS:
        base = layer_rows.get(("cublas-bf16", m))
        cells = []
        for name in names:
            r = layer_rows.get((name, m))
            if r is None:
                cells.append(f"{'-':>19}")
            else:
                speed = base["ms"] / r["ms"] if base else float("nan")
                cells.append(f"{r['ms']:>10.4f} {speed:>7.2f}x")
        floor = layer_rows.get(("peakc-int4", m))
        print(
            f"{m:>5} " + " ".join(cells) + f"  {floor['floor_ms'] if floor else float('nan'):.4f}"
        )


if __name__ == "__main__":
    main()
