"""GPU benchmark of the ort backend (issue 8): peakc's ONNX artifact against the two tools ONNX
Runtime users run today, and eager PyTorch, on random Llama-architecture models.

    python benchmarks/ort_backend.py --out DIR                     # smollm2-135m, llama-1b (CUDA)
    python benchmarks/ort_backend.py --configs llama-8b --out DIR
    python benchmarks/ort_backend.py --quick --out DIR             # tiny model on the CPU

Per config: a transformers LlamaForCausalLM with random weights (fp16 on CUDA, fp32 on the CPU)
is saved as a local Hugging Face folder with a WordLevel tokenizer. Then, one section at a time
(each in try/except, results appended to DIR/ort_backend.json as they come):
- peakc: `--task generate` decoder (prefill and decode_step programs) compiled with the default
  pipeline to the ort backend, run by peakc's Generator (I/O binding on the device);
  `peakc-nograph`: that artifact loaded with cuda_graph=false (shared buffers, fixed binding);
  `peakc-int4`: the same after `quantize{method=rtn,bits=4,group_size=32}` (MatMulNBits);
- eager: the transformers model with its DynamicCache, prefill then greedy decode;
- optimize_model: the same KV-cache decoder as plain torch (the cache-attention op as its
  reference implementation) exported by torch.onnx, then
  `onnxruntime.transformers.optimizer.optimize_model(model_type=gpt2)`, run by the same
  Generator; its fused-op counts;
- genai / genai-int4: `onnxruntime_genai.models.builder -p fp16|int4` from the HF folder and
  GenAI's own loop (og.Generator: append_tokens = prefill, generate_next_token = decode).
Prompt of --prompt-len random tokens, --gen-len new tokens, greedy, batch 1 and 8; medians of
--repeats runs after a warm-up. Prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import subprocess
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import onnx
import torch

CONFIGS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=512),
    "diag": dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=512),
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152),
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256),
    "llama-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256),
}
INT4_PIPELINE = "quantize{method=rtn,bits=4,group_size=32},fuse"
FUSED = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "SkipLayerNormalization",
    "RotaryEmbedding",
    "MatMulNBits",
    "FastGelu",
    "BiasGelu",
    "Gelu",
)


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def op_counts(path: Path) -> dict[str, int]:
    """Fused/contrib op counts of an ONNX file (graph and local functions)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    for node in nodes:
        if node.op_type in FUSED or node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def make_hf_folder(name: str, folder: Path, device: str, dtype: torch.dtype):
    """A random LlamaForCausalLM saved with a WordLevel tokenizer; returns the model."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    c = CONFIGS[name]
    config = transformers.LlamaConfig(
        vocab_size=c["vocab"],
        hidden_size=c["hidden"],
        intermediate_size=c["ffn"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=name == "smollm2-135m",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(c["vocab"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0"
    )
    fast.save_pretrained(folder)
    return model


def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def time_generator(generator, args, device: str) -> dict:
    """peakc Generator: prefill ms (batch 1) and decode ms/token, tokens/s at batch 1 and 8."""
    from peakc.runtime.generate import SamplingConfig

    out: dict = {}
    vocab = generator.layout["vocab_size"]
    config = SamplingConfig(max_new_tokens=args.gen_len)
    for batch in args.batches:
        batch_prompts = prompts(vocab, batch, args.prompt_len)
        generator.generate(batch_prompts, config)  # warm-up
        pre, dec = [], []
        for _ in range(args.repeats):
            r = generator.generate(batch_prompts, config)
            pre.append(r.prefill_seconds)
            dec.append(r.decode_seconds / max(r.decode_steps, 1))
        out[f"b{batch}"] = rates(pre, dec, batch)
        out[f"b{batch}"]["tokens_sha"] = hashlib.sha1(str(r.tokens).encode()).hexdigest()[:12]
    return out


def rates(pre: list[float], dec: list[float], batch: int) -> dict:
    step = statistics.median(dec)
    return {
        "prefill_ms": round(1e3 * statistics.median(pre), 3),
        "decode_ms_per_token": round(1e3 * step, 4),
        "tokens_per_s": round(batch / step, 1),
    }


def time_eager(model, args, device: str) -> dict:
    """transformers forward with its DynamicCache: prefill, then greedy decode steps."""
    out: dict = {}
    for batch in args.batches:
        ids = torch.tensor(prompts(model.config.vocab_size, batch, args.prompt_len), device=device)

        def run(ids=ids):
            t0 = sync(device)
            with torch.no_grad():
                o = model(input_ids=ids, use_cache=True)
                token = o.logits[:, -1].argmax(-1, keepdim=True)
                t1 = sync(device)
                cache = o.past_key_values
                for _ in range(args.gen_len - 1):
                    o = model(input_ids=token, past_key_values=cache, use_cache=True)
                    cache = o.past_key_values
                    token = o.logits[:, -1].argmax(-1, keepdim=True)
            t2 = sync(device)
            return t1 - t0, (t2 - t1) / (args.gen_len - 1)

        run()
        runs = [run() for _ in range(args.repeats)]
        out[f"b{batch}"] = rates([r[0] for r in runs], [r[1] for r in runs], batch)
    return out


def bench_peakc(
    folder: Path, work: Path, args, device: str, pipeline: str, tag: str, options: str = ""
) -> dict:
    import peakc
    from peakc.backends.ort.lower import check_parity
    from peakc.backends.ort.session import OrtProgram
    from peakc.models import load_source_for_task
    from peakc.runtime.generate import Generator

    dtype = "float16" if device == "cuda" else "float32"
    max_len = args.prompt_len + args.gen_len + 1
    source = load_source_for_task(f"hf:{folder}", "generate", max_len, max(args.batches), dtype)
    start = time.perf_counter()
    compiled = peakc.compile(
        source.module,
        source.example_inputs,
        pipeline=pipeline,
        backend=f"ort{{device={device}{options}}}",
        dynamic=source.dynamic,
        generation=source.generation,
        source=tag,
        parity=False,
    )
    directory = compiled.save(work / tag, force=True)
    LAST_ARTIFACT[tag] = directory
    row: dict = {"compile_s": round(time.perf_counter() - start, 1)}
    report = compiled.contents.report["ort"]
    row["provider"] = report["provider"]
    row["ops"] = op_counts(directory / "decoder.onnx")
    row["ort_parity_rel_error_at_compile"] = report["parity_rel_error"]
    row["matmul_nbits"] = report.get("matmul_nbits")
    row["static_decode_batches"] = report.get("static_decode_batches")
    del compiled, source
    gc.collect()
    artifact = peakc.load(directory)
    program = artifact.program("decoder")
    if isinstance(program, OrtProgram):
        row["session_providers"] = program.session.get_providers()
    if isinstance(program, OrtProgram):
        row["cuda_graph"] = program.cuda_graph
        row["shared_kv_buffers"] = report.get("shared_kv_buffers")
    generator = Generator.from_artifact(artifact, device)
    row["step"] = type(generator.step).__name__
    row.update(time_generator(generator, args, device))
    if isinstance(program, OrtProgram):
        row["decode_sessions_used"] = sorted(program.decode_sessions)
    del generator, artifact, program
    gc.collect()
    _ = check_parity  # parity is measured at compile time (report) on the example inputs
    return row


def bench_peakc_without_graph(args, device: str, tag: str, static: bool = True) -> dict:
    """The artifact the peakc section compiled, loaded with cuda_graph=false (same buffers and
    fixed-address binding, no graph capture/replay): decode on the static decode programs, or
    with static=False on the dynamic decoder (run C's configuration)."""
    import peakc
    from peakc.backends.ort.session import OrtProgram
    from peakc.runtime.generate import Generator

    directory = LAST_ARTIFACT[tag]
    manifest = peakc.load(directory).manifest
    layout = manifest["generation"]
    runtime = manifest["programs"]["decoder"].get("runtime", {})
    decode_programs = runtime.get("decode_programs") if static else None
    program = OrtProgram(directory / "decoder.onnx", device, "false", decode_programs)
    step = program.cache_owning_step(layout) or program
    generator = Generator(step, layout, device)
    row = {"cuda_graph": program.cuda_graph, "step": type(step).__name__}
    row.update(time_generator(generator, args, device))
    row["decode_sessions_used"] = sorted(program.decode_sessions)
    del generator, program, step
    gc.collect()
    return row


def export_plain_decoder(folder: Path, path: Path, args, device: str):
    """The KV-cache decoder as plain torch exported by torch.onnx (no peakc passes or ops)."""
    from peakc.ir.ops import OPS
    from peakc.models import load_source_for_task
    from peakc.models.kv_cache import CacheLayout

    dtype = "float16" if device == "cuda" else "float32"
    max_len = args.prompt_len + args.gen_len + 1
    source = load_source_for_task(f"hf:{folder}", "generate", max_len, max(args.batches), dtype)
    batch = torch.export.Dim("batch", min=1, max=max(args.batches))
    seq = torch.export.Dim("seq", min=1, max=max_len)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {1: batch}, {1: batch})
    with torch.no_grad():
        program = torch.export.export(
            source.module, source.example_inputs, dynamic_shapes=shapes, strict=False
        )
        program = program.run_decompositions({OPS["attention_cache"].overload: _cache_reference})
        torch.onnx.export(
            program,
            (),
            str(path),
            dynamo=True,
            input_names=["input_ids", "positions", "k_cache", "v_cache"],
            output_names=["logits", "new_k", "new_v"],
            external_data=True,
            optimize=True,
        )
    layout = CacheLayout(**source.generation)
    return layout


def _cache_reference(q, k, v, k_cache, v_cache, positions, scale):
    from peakc.ir.ops import OPS

    return OPS["attention_cache"].reference(q, k, v, k_cache, v_cache, positions, scale)


def bench_optimize_model(folder: Path, work: Path, args, device: str, name: str) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    from peakc.backends.ort.export import max_ir_version
    from peakc.backends.ort.session import OrtProgram
    from peakc.runtime.generate import Generator

    c = CONFIGS[name]
    raw = work / "peer" / "decoder.onnx"
    raw.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    layout = export_plain_decoder(folder, raw, args, device)
    optimized = optimize_model(
        str(raw),
        model_type="gpt2",
        num_heads=c["heads"],
        hidden_size=c["hidden"],
        use_gpu=device == "cuda",
        opt_level=0,  # fusions only: onnxruntime's own graph optimizations run at session load
    )
    optimized.model.ir_version = min(optimized.model.ir_version, max_ir_version())
    out = work / "peer-opt" / "decoder.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(out), use_external_data_format=True)
    row: dict = {"export_s": round(time.perf_counter() - start, 1), "ops": op_counts(out)}
    row["fusion_stats"] = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    del optimized
    gc.collect()
    program = OrtProgram(out, device)
    row["session_providers"] = program.session.get_providers()
    generator = Generator(program, layout.to_dict(), device)
    row.update(time_generator(generator, args, device))
    del generator, program
    gc.collect()
    return row


def bench_genai(folder: Path, work: Path, args, device: str, precision: str) -> dict:
    out = work / f"genai-{precision}"
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-m",
        str(folder),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        device,
        "-c",
        str(work / "genai-cache"),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"builder failed: {(done.stderr or done.stdout)[-1500:]}")
    row: dict = {"build_s": round(time.perf_counter() - start, 1)}
    row["ops"] = op_counts(next(out.glob("*.onnx")))
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(out))
    vocab = CONFIGS[args.current]["vocab"]
    for batch in args.batches:
        batch_prompts = np.array(prompts(vocab, batch, args.prompt_len), dtype=np.int32)

        def run(model=model, batch=batch, batch_prompts=batch_prompts):
            params = og.GeneratorParams(model)
            length = args.prompt_len + args.gen_len
            params.set_search_options(
                max_length=length, min_length=length, do_sample=False, batch_size=batch
            )
            generator = og.Generator(model, params)
            t0 = sync(device)
            generator.append_tokens(batch_prompts)  # runs the prompt
            generator.generate_next_token()  # picks the first token from the prompt's logits
            t1 = sync(device)
            steps = 0
            while steps < args.gen_len - 1 and not generator.is_done():
                generator.generate_next_token()
                steps += 1
            t2 = sync(device)
            row["decode_steps"] = steps
            del generator
            return t1 - t0, (t2 - t1) / max(steps, 1)

        run()
        runs = [run() for _ in range(args.repeats)]
        row[f"b{batch}"] = rates([r[0] for r in runs], [r[1] for r in runs], batch)
    del model
    gc.collect()
    return row


def translation_variants() -> dict:
    """Named changes to the ort backend's translation table, most fused first ("all": the
    backend's own choice for the device)."""
    from peakc.backends.ort import contrib

    mha = {"attention_cache": contrib.attention_cache_mha}
    return {
        "attention_cache=gqa": {"attention_cache": contrib.attention_cache},
        "all": {},
        "attention_cache=mha": mha,
        "rotary=reference": {"rotary_embedding": None},
        "norms=reference": {"rms_norm": None, "skip_rms_norm": None},
        "rotary=reference,attention_cache=mha": {"rotary_embedding": None, **mha},
        "attention_cache=reference": {"attention_cache": None},
        "rotary,attention_cache=reference": {"rotary_embedding": None, "attention_cache": None},
    }


def apply_variant(changes: dict) -> dict:
    """Change the translation tables in place, the per-device overrides too (None: export
    through the reference); returns the undo."""
    from peakc.backends.ort.contrib import TRANSLATIONS
    from peakc.backends.ort.export import DEVICE_TRANSLATIONS

    tables = [TRANSLATIONS, *DEVICE_TRANSLATIONS.values()]
    undo = [(table, name, table.get(name)) for table in tables for name in changes]
    for table in tables:
        for name, fn in changes.items():
            if fn is None:
                table.pop(name, None)
            elif table is TRANSLATIONS or name in table:
                table[name] = fn
    return undo


def undo_variant(undo: list) -> None:
    for table, name, fn in undo:
        if fn is None:
            table.pop(name, None)
        else:
            table[name] = fn


def diagnose_parity(work: Path, args, device: str) -> dict:
    """Parity of each translation variant on a 2-layer model on this device; the first one
    within tolerance stays applied for the rest of the run, and its greedy tokens are compared
    with peakc's eager backend."""
    import peakc
    from peakc.backends.ort import lower
    from peakc.models import load_source_for_task
    from peakc.runtime.generate import Generator, SamplingConfig

    folder = work / "diag-hf"
    make_hf_folder("diag", folder, device, torch.float16 if device == "cuda" else torch.float32)
    dtype = "float16" if device == "cuda" else "float32"
    saved_tol = dict(lower.PARITY_TOL)
    lower.PARITY_TOL.update({k: float("inf") for k in saved_tol})
    row: dict = {"rel_error": {}}
    chosen = None
    try:
        for name, changes in translation_variants().items():
            undo = apply_variant(changes)
            try:
                source = load_source_for_task(f"hf:{folder}", "generate", 64, 2, dtype)
                compiled = peakc.compile(
                    source.module,
                    source.example_inputs,
                    backend=f"ort{{device={device}}}",
                    dynamic=source.dynamic,
                    generation=source.generation,
                    parity=False,
                )
                error = compiled.contents.report["ort"]["parity_rel_error"]
            except Exception as exc:  # noqa: BLE001 - a variant that fails is reported
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["rel_error"][name] = error
            log(f"diag {name}: {error}")
            if isinstance(error, float) and error < saved_tol[torch.float16]:
                chosen = name
                break
            undo_variant(undo)
    finally:
        lower.PARITY_TOL.update(saved_tol)
    row["chosen"] = chosen
    if chosen is None:
        return row
    tokens = {}
    for backend in ("eager", f"ort{{device={device}}}"):
        source = load_source_for_task(f"hf:{folder}", "generate", 64, 2, dtype)
        compiled = peakc.compile(
            source.module,
            source.example_inputs,
            backend=backend,
            dynamic=source.dynamic,
            generation=source.generation,
            parity=False,
        )
        artifact = peakc.load(compiled.save(work / "diag" / backend[:3], force=True))
        generator = Generator.from_artifact(artifact, device)
        result = generator.generate([[5, 6, 7, 8, 9], [11, 12]], SamplingConfig(max_new_tokens=8))
        tokens[backend[:3]] = result.tokens
    row["greedy_tokens"] = tokens
    row["greedy_equal"] = tokens["eag"] == tokens["ort"]
    return row


def run_section(results: dict, key: str, fn, out_file: Path) -> None:
    log(f"start {key}")
    start = time.perf_counter()
    try:
        results[key] = fn()
    except Exception as exc:  # noqa: BLE001 - one failing peer must not lose the others
        traceback.print_exc()
        results[key] = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
    results[key]["section_s"] = round(time.perf_counter() - start, 1)
    log(f"done {key} in {results[key]['section_s']} s: {json.dumps(results[key])[:600]}")
    out_file.write_text(json.dumps(RESULTS, indent=1, default=str))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


RESULTS: dict = {}
LAST_ARTIFACT: dict[str, Path] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--configs", default="smollm2-135m,llama-1b")
    parser.add_argument(
        "--sections", default="peakc,optimize_model,genai,eager,peakc-int4,genai-int4"
    )
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=".")
    parser.add_argument("--work", default="/tmp/ort-bench")
    parser.add_argument("--variant", default="", help="a translation variant to apply (diagnose)")
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    names = ["tiny"] if args.quick else args.configs.split(",")
    if args.quick:
        args.prompt_len, args.gen_len, args.repeats = 24, 6, 1
    args.batches = (1, 8)
    out_file = Path(args.out) / "ort_backend.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    import onnxruntime

    if device == "cuda" and hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()  # CUDA/cuDNN from the nvidia wheels torch brought
    RESULTS["meta"] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "argv": sys.argv,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
    }
    if args.variant:
        apply_variant(translation_variants()[args.variant])
        RESULTS["meta"]["variant"] = args.variant
    if "diagnose" in sections:
        diag: dict = {}
        RESULTS["diagnose"] = diag
        run_section(
            diag, "parity", partial(diagnose_parity, Path(args.work), args, device), out_file
        )
    for name in names:
        args.current = name
        work = Path(args.work) / name
        work.mkdir(parents=True, exist_ok=True)
        folder = work / "hf"
        results: dict = {}
        RESULTS[name] = results
        dtype = torch.float16 if device == "cuda" else torch.float32
        log(f"== {name}")
        model = make_hf_folder(name, folder, device, dtype)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        results["weights_bytes"] = weights
        results["decode_floor_ms_3TBps"] = round(1e3 * weights / 3.0e12, 4)
        if "eager" in sections:
            run_section(results, "eager", partial(time_eager, model, args, device), out_file)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        common = (folder, work, args, device)
        graph = ",decode_batches=1+8" + ("" if args.quick else ",cuda_graph=true")
        table = {
            "peakc": partial(bench_peakc, *common, "default", "peakc", graph),
            "peakc-nograph": partial(bench_peakc_without_graph, args, device, "peakc"),
            "peakc-dynamic": partial(bench_peakc_without_graph, args, device, "peakc", False),
            "peakc-int4": partial(bench_peakc, *common, INT4_PIPELINE, "peakc-int4"),
            "optimize_model": partial(bench_optimize_model, *common, name),
            "genai": partial(bench_genai, *common, "fp32" if args.quick else "fp16"),
            "genai-int4": partial(bench_genai, *common, "int4"),
        }
        for key in sections:
            if key in table:
                run_section(results, key, table[key], out_file)
    print_table()
    log(f"wrote {out_file}")


def print_table() -> None:
    print(f"\n{'config':<14}{'who':<16}{'b':>3}{'prefill ms':>12}{'ms/token':>10}{'tok/s':>10}")
    for name, results in RESULTS.items():
        if name in ("meta", "diagnose"):
            continue
        for who, row in results.items():
            if not isinstance(row, dict):
                continue
            if "error" in row:
                print(f"{name:<14}{who:<16}  ERROR {row['error'][:100]}")
                continue
            for b in ("b1", "b8"):
                if b in row:
                    r = row[b]
                    print(
                        f"{name:<14}{who:<16}{b[1:]:>3}{r['prefill_ms']:>12.2f}"
                        f"{r['decode_ms_per_token']:>10.3f}{r['tokens_per_s']:>10.1f}"
                    )
            if "ops" in row:
                print(f"{'':<14}{who:<16} ops {row['ops']}")
        floor = results.get("decode_floor_ms_3TBps")
        print(f"{name:<14}decode floor (weights / 3.0 TB/s): {floor} ms")
    if "diagnose" in RESULTS:
        print("diagnose:", json.dumps(RESULTS["diagnose"])[:800])


if __name__ == "__main__":
    main()
