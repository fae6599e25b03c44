"""GPU benchmark of the ort backend (issue 8): peakc's ONNX artifact against the two tools ONNX
Runtime users run today, and eager PyTorch, on Llama-architecture models.

    python benchmarks/ort_backend.py --out DIR                     # smollm2-135m, llama-1b (CUDA)
    python benchmarks/ort_backend.py --configs smollm2-135m --gguf FILE --out DIR  # real weights
    python benchmarks/ort_backend.py --configs llama-8b --phase build --out DIR    # call 1 of 2
    python benchmarks/ort_backend.py --configs llama-8b --phase time --out DIR     # call 2 of 2
    python benchmarks/ort_backend.py --quick --out DIR             # tiny model on the CPU

Per config, `--phase build` (under --work/CONFIG): a transformers LlamaForCausalLM (random
weights, or SmolLM2-135M's from --gguf) created on the device in --dtype and saved as a Hugging
Face folder with a tokenizer; eager timing and its greedy tokens (the reference every peer's
tokens are compared with); GenAI's builders started in the background; peakc's compiles;
optionally the torch.onnx peer; build.json records each. `--phase time` loads what build left
and times each peer; `all` (default) does both in one process. Sections (each in try/except,
results appended to --out/ort_backend.json as they come):
- peakc: `--task generate` decoder, default pipeline, ort backend (static decode programs and
  CUDA graphs on the GPU), run by peakc's Generator; `peakc-nograph`/`peakc-dynamic`: that
  artifact without CUDA graphs / on the dynamic decoder; `peakc-int4`: INT4_PIPELINE, set to
  match GenAI's int4 (RTN, 4 bits, blocks of 32, symmetric, every linear incl. lm_head);
- eager: the transformers model with its DynamicCache, prefill then greedy decode;
- optimize_model: the KV-cache decoder as plain torch exported by torch.onnx, then
  `onnxruntime.transformers.optimizer.optimize_model(model_type=gpt2)`, same Generator (left
  out for llama-8b unless --optimize-model-8b: exporting and optimizing 16 GB through torch.onnx
  does not fit a 10-minute call);
- genai / genai-int4: `onnxruntime_genai.models.builder -p fp16|bf16|int4` from the HF folder
  and GenAI's own loop (append_tokens = prefill, generate_next_token = decode).
Each row: prefill ms, decode ms/token, tokens/s at batch 1 and 8 (--prompt-len random tokens,
--gen-len new tokens, greedy, medians of --repeats after a warm-up), greedy tokens against
eager's (first differing index per sequence), GPU memory in use after loading (driver view,
so onnxruntime's allocations count), fused-op counts, MatMulNBits count and bits/param.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import threading
import time
import traceback
from functools import partial
from pathlib import Path

import onnx
import torch
from ort_bench_models import (
    CONFIGS,
    DTYPES,
    compare_tokens,
    gib,
    gpu_used_bytes,
    load_hf_model,
    make_hf_folder,
    prompts,
    rates,
    sync,
    time_eager,
)

# Same footing as GenAI's builder -p int4 (its defaults, passed explicitly in GENAI_INT4):
# round-to-nearest, blocks of 32, symmetric, every linear including lm_head. Fused first: RTN
# rounds each output row on its own, so quantizing the fused q|k|v and gate|up weights gives
# the same codes, and the decode step reads one packed-QKV MatMulNBits per layer as GenAI's.
INT4_PIPELINE = (
    "cleanup,fuse,quantize{method=rtn,bits=4,group_size=32,sym=true,targets=layers|lm_head}"
)
# The compile-time parity of an int4 program: a deep random model amplifies fp16 rounding (the
# 8B shape's int4 program measured 1.8e-2 norm-wise on the H100, its fp16 program 6.4e-3), so
# these builds accept up to 5e-2 and record what they measured.
INT4_PARITY = ",parity_tol=0.05"
GENAI_INT4 = ["int4_block_size=32", "int4_is_symmetric=true", "int4_accuracy_level=0"]
GENAI_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
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
BUILT = ("peakc", "peakc-int4", "optimize_model", "genai", "genai-int4")
STARTED = time.perf_counter()


def log(*args) -> None:
    elapsed = time.perf_counter() - STARTED
    print(f"[{time.strftime('%H:%M:%S')} +{elapsed:.0f}s]", *args, flush=True)


def op_counts(path: Path) -> dict[str, int]:
    """Fused/contrib op counts of an ONNX file (graph and local functions)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    for node in nodes:
        if node.op_type in FUSED or node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def nbits_stats(path: Path, params: int) -> dict:
    """MatMulNBits count, its settings, bits per quantized weight (B, scales, zero points) and
    bits per model parameter for the model file and its external data together."""
    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            sizes[node.output[0]] = _tensor_bytes(node.attribute[0].t)
    count, qparams, qbytes, blocks, levels, zero_points = 0, 0, 0, set(), set(), 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        count += 1
        qparams += attrs["N"] * attrs["K"]
        qbytes += sum(sizes.get(name, 0) for name in node.input[1:4] if name)
        blocks.add(attrs.get("block_size"))
        levels.add(attrs.get("accuracy_level", 0))
        zero_points += len(node.input) > 3 and bool(node.input[3])
    on_disk = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))
    return {
        "matmul_nbits": count,
        "block_size": sorted(b for b in blocks if b is not None),
        "accuracy_level": sorted(levels),
        "with_zero_points": zero_points,
        "bits_per_quantized_weight": round(8 * qbytes / qparams, 3) if qparams else None,
        "bits_per_param_file": round(8 * on_disk / params, 3),
    }


def _tensor_bytes(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    bits = {onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT4: 4}
    bits.update({onnx.TensorProto.INT4: 4, onnx.TensorProto.FLOAT16: 16})
    bits.update({onnx.TensorProto.BFLOAT16: 16, onnx.TensorProto.FLOAT: 32})
    return n * bits.get(t.data_type, 32) // 8


def state_path(work: Path) -> Path:
    return work / "build.json"


def record_path(work: Path, key: str) -> Path:
    return work / f"{key}.record.json"


def read_state(work: Path) -> dict:
    """build.json, with the GenAI builders' records written beside it as they finish."""
    path = state_path(work)
    state = json.loads(path.read_text()) if path.exists() else {}
    for key in ("genai", "genai-int4"):
        if record_path(work, key).exists():  # the latest builder run's own record
            state[key] = json.loads(record_path(work, key).read_text())
    return state


def write_state(work: Path, state: dict) -> None:
    state_path(work).write_text(json.dumps(state, indent=1, default=str))


RESERVED: dict[str, int] = {}  # bytes a running build step may still write, by step


def disk_check(work: Path, need: int, what: str) -> None:
    """Refuse a build step that would not fit on the disk (2 GiB to spare) beside what the
    build steps running at the same time may still write; reserve its bytes until release."""
    free = shutil.disk_usage(work).free
    others = sum(n for k, n in RESERVED.items() if k != what)
    if free - others < need + 2**31:
        raise RuntimeError(
            f"{what}: {gib(free)} GiB free on {work}, {gib(others)} GiB reserved by steps "
            f"running beside it, needs about {gib(need)} GiB (+2)"
        )
    RESERVED[what] = need


def disk_free() -> float:
    return gib(shutil.disk_usage("/tmp").free)


def budget_check(args, what: str) -> None:
    """Refuse to start a build step after --budget-s seconds (a call's time limit)."""
    if args.budget_s and time.perf_counter() - STARTED > args.budget_s:
        raise RuntimeError(f"{what}: not started, past --budget-s {args.budget_s}")


def reference_for(reference: dict, batch: int):
    return reference.get(f"b{batch}")


def token_check(got: list[list[int]], reference: dict, batch: int) -> dict:
    want = reference_for(reference, batch)
    if want is None:
        return {"error": "no eager reference tokens (build phase without the model?)"}
    return compare_tokens(got, want)


def time_generator(generator, args, reference: dict) -> dict:
    """peakc Generator: prefill ms and decode ms/token, tokens/s per batch; greedy tokens
    against eager's."""
    from peakc.runtime.generate import SamplingConfig

    out: dict = {}
    vocab = generator.layout["vocab_size"]
    config = SamplingConfig(max_new_tokens=args.gen_len)
    for batch in args.batches:
        batch_prompts = prompts(vocab, batch, args.prompt_len)
        generator.generate(batch_prompts, config)  # warm-up (creates the batch's session)
        pre, dec = [], []
        for _ in range(args.repeats):
            r = generator.generate(batch_prompts, config)
            pre.append(r.prefill_seconds)
            dec.append(r.decode_seconds / max(r.decode_steps, 1))
        out[f"b{batch}"] = rates(pre, dec, batch)
        out[f"b{batch}"]["tokens"] = token_check(r.tokens, reference, batch)
    return out


def peakc_source(folder: Path, args):
    """The HF folder's model (loaded once, straight in --dtype on the host) wrapped as peakc's
    KV-cache decoder; returns (module, example inputs, dynamic shapes, cache layout)."""
    from peakc.models import kv_cache

    model = load_hf_model(folder, "cpu", DTYPES[args.dtype])
    model.config.use_cache = False
    max_len = args.prompt_len + args.gen_len + 1
    decoder, layout = kv_cache.wrap_for_generation(
        model, max_len, max(args.batches), f"hf:{folder}"
    )
    return decoder, kv_cache.example_inputs(layout), kv_cache.dynamic_shapes(layout), layout


def build_peakc(
    folder: Path, work: Path, args, device: str, pipeline: str, tag: str, options: str, hf: dict
) -> dict:
    """Compile the HF folder's decoder with `pipeline` to the ort backend; save under work/tag."""
    import peakc

    budget_check(args, tag)
    quantized = "quantize" in pipeline
    disk_check(work, int(hf["weights_bytes"] * (0.45 if quantized else 1.2)), tag)
    shutil.rmtree(work / tag, ignore_errors=True)
    start = time.perf_counter()
    module, inputs, dynamic, layout = peakc_source(folder, args)
    log(f"{tag}: model loaded in {time.perf_counter() - start:.1f} s")
    backend = f"ort{{device={device}{options}}}"
    compiled = peakc.compile(
        module,
        inputs,
        pipeline=pipeline,
        backend=backend,
        dynamic=dynamic,
        generation=layout.to_dict(),
        source=tag,
        parity=False,
    )
    del module, inputs
    gc.collect()
    log(f"{tag}: compiled in {time.perf_counter() - start:.1f} s")
    directory = compiled.save(work / tag, force=True)
    RESERVED.pop(tag, None)
    report = compiled.contents.report["ort"]
    row: dict = {"compile_s": round(time.perf_counter() - start, 1)}
    row["pipeline"] = pipeline
    row["backend"] = backend
    row["provider"] = report["provider"]
    row["ops"] = op_counts(directory / "decoder.onnx")
    row["ort_parity_rel_error_at_compile"] = report["parity_rel_error"]
    row["ort_parity_max_element_rel_error"] = report.get("parity_max_element_rel_error")
    row["static_decode_batches"] = report.get("static_decode_batches")
    row["shared_kv_buffers"] = report.get("shared_kv_buffers")
    if quantized:
        row["matmul_nbits_report"] = report.get("matmul_nbits")
        row["nbits"] = nbits_stats(directory / "decoder.onnx", hf["params"])
    del compiled
    gc.collect()
    return row


def built(state: dict, key: str, path: Path) -> dict:
    """The build record of a peer, or an error saying what is missing."""
    record = state.get(key)
    if record is not None and "error" in record:
        raise RuntimeError(f"build failed: {record['error'][:300]}")
    if record is None or not path.exists():
        raise RuntimeError(f"nothing built for {key} at {path}: run --phase build with it")
    return {k: v for k, v in record.items() if k != "section_s"}


def time_peakc(work: Path, args, device: str, tag: str, state: dict) -> dict:
    """Load a built artifact, time its Generator, check its tokens; GPU memory it holds."""
    import peakc
    from peakc.backends.ort.session import OrtProgram
    from peakc.runtime.generate import Generator

    directory = work / tag
    row = built(state, tag, directory / "manifest.json")
    base = gpu_used_bytes()
    start = time.perf_counter()
    artifact = peakc.load(directory)
    generator = Generator.from_artifact(artifact, device)
    row["load_s"] = round(time.perf_counter() - start, 1)
    row["gpu_gib_loaded"] = gib(gpu_used_bytes() - base)
    program = artifact.program("decoder")
    row["step"] = type(generator.step).__name__
    if isinstance(program, OrtProgram):
        row["session_providers"] = program.session.get_providers()
        row["cuda_graph"] = program.cuda_graph
    row.update(time_generator(generator, args, state.get("eager_tokens", {})))
    row["gpu_gib_after_runs"] = gib(gpu_used_bytes() - base)
    if isinstance(program, OrtProgram):
        row["decode_sessions_used"] = sorted(program.decode_sessions)
    del generator, artifact, program
    gc.collect()
    return row


def time_peakc_without_graph(work: Path, args, device: str, state: dict, static: bool) -> dict:
    """The peakc artifact loaded with cuda_graph=false (same buffers and fixed-address
    binding, no graph capture/replay): decode on the static decode programs, or with
    static=False on the dynamic decoder (run C's configuration)."""
    import peakc
    from peakc.backends.ort.session import OrtProgram
    from peakc.runtime.generate import Generator

    directory = work / "peakc"
    built(state, "peakc", directory / "manifest.json")
    manifest = peakc.load(directory).manifest
    layout = manifest["generation"]
    runtime = manifest["programs"]["decoder"].get("runtime", {})
    decode_programs = runtime.get("decode_programs") if static else None
    base = gpu_used_bytes()
    program = OrtProgram(directory / "decoder.onnx", device, "false", decode_programs)
    step = program.cache_owning_step(layout) or program
    generator = Generator(step, layout, device)
    row = {"cuda_graph": program.cuda_graph, "step": type(step).__name__}
    row["gpu_gib_loaded"] = gib(gpu_used_bytes() - base)
    row.update(time_generator(generator, args, state.get("eager_tokens", {})))
    row["gpu_gib_after_runs"] = gib(gpu_used_bytes() - base)
    row["decode_sessions_used"] = sorted(program.decode_sessions)
    del generator, program, step
    gc.collect()
    return row


def export_plain_decoder(folder: Path, path: Path, args):
    """The KV-cache decoder as plain torch exported by torch.onnx (no peakc passes or ops)."""
    from peakc.ir.ops import OPS

    module, inputs, _, layout = peakc_source(folder, args)
    max_len = args.prompt_len + args.gen_len + 1
    batch = torch.export.Dim("batch", min=1, max=max(args.batches))
    seq = torch.export.Dim("seq", min=1, max=max_len)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {1: batch}, {1: batch})
    with torch.no_grad():
        program = torch.export.export(module, inputs, dynamic_shapes=shapes, strict=False)
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
    return layout


def _cache_reference(q, k, v, k_cache, v_cache, positions, scale):
    from peakc.ir.ops import OPS

    return OPS["attention_cache"].reference(q, k, v, k_cache, v_cache, positions, scale)


def build_optimize_model(folder: Path, work: Path, args, device: str, name: str) -> dict:
    """torch.onnx export of the plain decoder, then optimize_model(model_type=gpt2)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from peakc.backends.ort.export import max_ir_version

    if name == "llama-8b" and not args.optimize_model_8b:
        raise RuntimeError(
            "skipped for llama-8b: exporting and optimizing 16 GB through torch.onnx does not "
            "fit a 10-minute call (--optimize-model-8b runs it anyway)"
        )
    budget_check(args, "optimize_model")
    c = CONFIGS[name]
    raw = work / "peer" / "decoder.onnx"
    raw.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    layout = export_plain_decoder(folder, raw, args)
    optimized = optimize_model(
        str(raw),
        model_type="gpt2",
        num_heads=c["heads"],
        hidden_size=c["hidden"],
        use_gpu=device == "cuda",
        opt_level=0,  # fusions only: onnxruntime's own graph optimizations run at session load
    )
    optimized.model.ir_version = min(optimized.model.ir_version, max_ir_version())
    out = work / "optimize_model" / "decoder.onnx"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(out), use_external_data_format=True)
    shutil.rmtree(raw.parent, ignore_errors=True)
    row: dict = {"export_s": round(time.perf_counter() - start, 1), "ops": op_counts(out)}
    row["fusion_stats"] = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    row["layout"] = layout.to_dict()
    return row


def time_optimize_model(work: Path, args, device: str, state: dict) -> dict:
    from peakc.backends.ort.session import OrtProgram
    from peakc.runtime.generate import Generator

    out = work / "optimize_model" / "decoder.onnx"
    row = built(state, "optimize_model", out)
    base = gpu_used_bytes()
    program = OrtProgram(out, device)
    row["gpu_gib_loaded"] = gib(gpu_used_bytes() - base)
    row["session_providers"] = program.session.get_providers()
    generator = Generator(program, row.pop("layout"), device)
    row.update(time_generator(generator, args, state.get("eager_tokens", {})))
    row["gpu_gib_after_runs"] = gib(gpu_used_bytes() - base)
    del generator, program
    gc.collect()
    return row


class GenaiBuilders:
    """GenAI's model builder (`python -m onnxruntime_genai.models.builder`) for each requested
    precision, one after another in a background thread (started before peakc's compiles)."""

    def __init__(self, folder: Path, work: Path, args, device: str, jobs: dict, hf: dict):
        self.folder, self.work, self.args, self.device = folder, work, args, device
        self.jobs, self.hf = jobs, hf  # {section key: precision}
        self.records: dict = {}
        self.stopped = False
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for key, precision in self.jobs.items():
            if self.stopped:
                return
            start = time.perf_counter()
            try:
                self.records[key] = self._build(key, precision)
            except Exception as exc:  # noqa: BLE001 - a failed build is reported, not raised
                self.records[key] = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
            self.records[key]["section_s"] = round(time.perf_counter() - start, 1)
            # on disk at once: a call cut off before build.json is written still keeps it
            record_path(self.work, key).write_text(json.dumps(self.records[key], default=str))
            log(f"genai builder {key} done: {json.dumps(self.records[key])[:300]}")

    def _build(self, key: str, precision: str) -> dict:
        need = self.hf["weights_bytes"] * (0.4 if precision == "int4" else 1.1)
        disk_check(self.work, int(need), f"{key} builder")
        out = self.work / key
        shutil.rmtree(out, ignore_errors=True)
        record_path(self.work, key).unlink(missing_ok=True)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m"]
        command += [str(self.folder), "-o", str(out), "-p", precision, "-e", self.device]
        command += ["-c", str(self.work / "genai-cache")]
        if precision == "int4":
            command += ["--extra_options", *GENAI_INT4]
        log(f"genai builder {key}: {' '.join(command[1:])}")
        start = time.perf_counter()
        log_path = self.work / f"{key}.log"
        try:
            with open(log_path, "w") as sink:
                self.proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
                code = self.proc.wait()
        finally:
            RESERVED.pop(f"{key} builder", None)
        if code != 0:
            raise RuntimeError(f"builder exit {code}: {log_path.read_text()[-1500:]}")
        model = next(out.glob("*.onnx"))
        row: dict = {"build_s": round(time.perf_counter() - start, 1), "command": command[1:]}
        row["ops"] = op_counts(model)
        if precision == "int4":
            row["nbits"] = nbits_stats(model, self.hf["params"])
        shutil.rmtree(self.work / "genai-cache", ignore_errors=True)
        return row

    def wait(self, timeout: float | None) -> dict:
        """Join the thread; past `timeout` seconds, stop the running builder and report it."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stopped = True
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()  # only the builder process this object started
            self.thread.join(60)
        for key in self.jobs:
            self.records.setdefault(key, {"error": "not built: stopped at --budget-s"})
        return self.records


def time_genai(work: Path, args, device: str, key: str, state: dict) -> dict:
    """GenAI's own loop: append_tokens + first generate_next_token = prefill, then one
    generate_next_token per token; tokens against eager's; GPU memory after loading."""
    out = work / key
    row = built(state, key, out / "genai_config.json")
    import numpy as np
    import onnxruntime_genai as og

    reference = state.get("eager_tokens", {})
    base = gpu_used_bytes()
    start = time.perf_counter()
    model = og.Model(str(out))
    row["load_s"] = round(time.perf_counter() - start, 1)
    row["gpu_gib_loaded"] = gib(gpu_used_bytes() - base)
    vocab = state["hf"]["vocab"]
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
            new = [generator.get_sequence(i).tolist()[-(steps + 1) :] for i in range(batch)]
            del generator
            return t1 - t0, (t2 - t1) / max(steps, 1), new, steps

        run()
        runs = [run() for _ in range(args.repeats)]
        row[f"b{batch}"] = rates([r[0] for r in runs], [r[1] for r in runs], batch)
        row[f"b{batch}"]["decode_steps"] = runs[-1][3]
        row[f"b{batch}"]["tokens"] = token_check(runs[-1][2], reference, batch)
    row["gpu_gib_after_runs"] = gib(gpu_used_bytes() - base)
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
    """Change the ort lowerings in the op registry in place (None: export through the
    reference); returns the undo."""
    import peakc.backends.ort.lower  # noqa: F401  (registers the ort lowerings)
    from peakc.ir.ops import OPS, register_lowering

    undo = {name: OPS[name].lowerings.get("ort") for name in changes}
    for name, fn in changes.items():
        if fn is None:
            OPS[name].lowerings.pop("ort", None)
        else:
            register_lowering(name, "ort", label="contrib/onnx")(fn)
    return undo


def undo_variant(undo: dict) -> None:
    from peakc.ir.ops import OPS

    for name, lowering in undo.items():
        if lowering is None:
            OPS[name].lowerings.pop("ort", None)
        else:
            OPS[name].lowerings["ort"] = lowering


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
                    source,
                    backend=f"ort{{device={device}}}",
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
            source,
            backend=backend,
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
    results[key]["disk_free_gib"] = disk_free()
    log(f"done {key} in {results[key]['section_s']} s: {json.dumps(results[key])[:400]}")
    out_file.write_text(json.dumps(RESULTS, indent=1, default=str))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peakc_options(args, device: str) -> str:
    """Backend options of the peakc rows: static decode programs for the timed batch sizes,
    replayed as CUDA graphs on the GPU."""
    sizes = ",".join(str(b) for b in args.batches)
    return f",decode_batches=[{sizes}]" + (",cuda_graph=true" if device == "cuda" else "")


def build_config(name: str, work: Path, args, device: str, results: dict, out: Path) -> None:
    """HF folder, eager timing and reference tokens, GenAI builders (background), peakc's
    compiles, the torch.onnx peer; each recorded in work/build.json."""
    sections = args.sections
    folder = work / "hf"
    state = read_state(work)  # earlier builds' records stay (same seed: same weights)
    holder: dict = {}

    def hf_step() -> dict:
        shutil.rmtree(folder, ignore_errors=True)
        base = gpu_used_bytes()
        start = time.perf_counter()
        gguf = Path(args.gguf) if args.gguf and name == "smollm2-135m" else None
        model, info = make_hf_folder(name, folder, device, DTYPES[args.dtype], gguf)
        info["vocab"] = model.config.vocab_size
        info["decode_floor_ms_3TBps"] = round(1e3 * info["weights_bytes"] / 3.0e12, 4)
        info["create_save_s"] = round(time.perf_counter() - start, 1)
        del model
        gc.collect()
        # eager runs the folder's model as every peer loads it (buffers included)
        holder["model"] = load_hf_model(folder, device, DTYPES[args.dtype])
        info["gpu_gib_model"] = gib(gpu_used_bytes() - base)
        return info

    weights = list(folder.glob("*.safetensors"))
    if (
        args.reuse_hf
        and weights
        and "eager_tokens" in state
        and "error" not in state.get("hf", {"error": 1})
    ):
        log(f"reusing {folder} and its eager reference tokens (--reuse-hf)")
        results["hf"] = state["hf"]
        results["eager"] = state.get("eager", {})
    else:
        _make_hf_and_eager(state, holder, hf_step, results, out, work, args, device)
    if "error" in state["hf"]:
        return

    precision = GENAI_PRECISION[args.dtype]
    jobs = {k: p for k, p in (("genai", precision), ("genai-int4", "int4")) if k in sections}
    builders = GenaiBuilders(folder, work, args, device, jobs, state["hf"]) if jobs else None
    options = peakc_options(args, device)
    common = (folder, work, args, device)
    table = {
        "peakc": partial(build_peakc, *common, "default", "peakc", options, state["hf"]),
        "peakc-int4": partial(
            build_peakc, *common, INT4_PIPELINE, "peakc-int4", options + INT4_PARITY, state["hf"]
        ),
        "optimize_model": partial(build_optimize_model, *common, name),
    }
    for key in sections:
        if key in table:
            run_section(results, f"build {key}", table[key], out)
            RESERVED.pop(key, None)
            state[key] = results[f"build {key}"]
            write_state(work, state)
    if builders is not None:
        left = args.budget_s - (time.perf_counter() - STARTED) if args.budget_s else None
        log(f"waiting for GenAI's builders ({', '.join(jobs)})")
        for key, record in builders.wait(None if left is None else max(left, 5.0)).items():
            results[f"build {key}"] = state[key] = record
        write_state(work, state)
    failed = [k for k in sections if k in BUILT and "error" in state.get(k, {})]
    keep = args.keep_hf if args.keep_hf is not None else name != "llama-8b" or bool(failed)
    if not keep:
        for file in folder.glob("*.safetensors*"):
            file.unlink()
        log(f"deleted the HF folder's weights ({folder}); --keep-hf keeps them")
    state["hf_weights_kept"] = keep
    write_state(work, state)


def _make_hf_and_eager(state, holder, hf_step, results, out, work, args, device) -> None:
    """The hf section, then eager's timing (with --sections eager) and reference tokens."""
    run_section(results, "hf", hf_step, out)
    state["hf"] = results["hf"]
    if "model" not in holder:
        write_state(work, state)
        return

    def eager_step() -> dict:
        timed = "eager" in args.sections  # the reference tokens are needed either way
        row, tokens = time_eager(holder["model"], args, device, timed)
        state["eager_tokens"] = tokens
        row["gpu_gib_model"] = state["hf"]["gpu_gib_model"]
        return row

    run_section(results, "eager", eager_step, out)
    state["eager"] = results["eager"]
    del holder["model"]
    gc.collect()
    write_state(work, state)


def time_config(name: str, work: Path, args, device: str, results: dict, out: Path) -> None:
    """Time each requested peer from what build left under work."""
    state = read_state(work)
    if not state:
        results["error"] = {"error": f"no {state_path(work)}: run --phase build first"}
        return
    results.setdefault("hf", state.get("hf", {}))
    if "eager" in args.sections and "eager" in state:
        results["eager"] = dict(state["eager"], measured="in the build phase")
    table = {
        "peakc": partial(time_peakc, work, args, device, "peakc", state),
        "peakc-nograph": partial(time_peakc_without_graph, work, args, device, state, True),
        "peakc-dynamic": partial(time_peakc_without_graph, work, args, device, state, False),
        "peakc-int4": partial(time_peakc, work, args, device, "peakc-int4", state),
        "optimize_model": partial(time_optimize_model, work, args, device, state),
        "genai": partial(time_genai, work, args, device, "genai", state),
        "genai-int4": partial(time_genai, work, args, device, "genai-int4", state),
    }
    for key in args.sections:
        if key in table:
            run_section(results, key, table[key], out)


RESULTS: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--configs", default="smollm2-135m,llama-1b")
    parser.add_argument(
        "--sections", default="eager,peakc,optimize_model,genai,peakc-int4,genai-int4"
    )
    parser.add_argument("--phase", choices=("build", "time", "all"), default="all")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    parser.add_argument("--gguf", default="", help="SmolLM2-135M GGUF: smollm2-135m's weights")
    parser.add_argument(
        "--keep-hf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the HF folder's weights after the build (default: kept unless llama-8b "
        "built everything it was asked to)",
    )
    parser.add_argument(
        "--reuse-hf", action="store_true", help="build from the HF folder an earlier build left"
    )
    parser.add_argument("--optimize-model-8b", action="store_true")
    parser.add_argument("--budget-s", type=float, default=0, help="start no build step after")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=".")
    parser.add_argument("--work", default="/tmp/ort-bench")
    parser.add_argument("--variant", default="", help="a translation variant to apply (diagnose)")
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    names = args.configs.split(",")
    if args.quick:
        names = ["tiny"] if args.configs == parser.get_default("configs") else names
        if args.prompt_len == parser.get_default("prompt_len"):
            args.prompt_len, args.gen_len, args.repeats = 24, 6, 1
    args.dtype = args.dtype or ("float32" if device == "cpu" else "float16")
    args.batches = (1, 8)
    args.sections = args.sections.split(",")
    out_file = Path(args.out) / "ort_backend.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    if device == "cuda" and hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()  # CUDA/cuDNN from the nvidia wheels torch brought
    RESULTS["meta"] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "argv": sys.argv,
        "phase": args.phase,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
        "disk_free_gib": disk_free(),
    }
    log(f"{RESULTS['meta']['device']}, {disk_free()} GiB free on /tmp, sections {args.sections}")
    if args.variant:
        apply_variant(translation_variants()[args.variant])
        RESULTS["meta"]["variant"] = args.variant
    if "diagnose" in args.sections:
        diag: dict = {}
        RESULTS["diagnose"] = diag
        run_section(
            diag, "parity", partial(diagnose_parity, Path(args.work), args, device), out_file
        )
    for name in names:
        work = Path(args.work) / name
        work.mkdir(parents=True, exist_ok=True)
        results: dict = {}
        RESULTS[name] = results
        log(f"== {name} ({args.phase})")
        if args.phase in ("build", "all"):
            build_config(name, work, args, device, results, out_file)
        if args.phase in ("time", "all"):
            time_config(name, work, args, device, results, out_file)
    out_file.write_text(json.dumps(RESULTS, indent=1, default=str))
    print_table()
    log(f"wrote {out_file}")


SHORT = {
    "GroupQueryAttention": "GQA",
    "MultiHeadAttention": "MHA",
    "SimplifiedLayerNormalization": "SLN",
    "SkipSimplifiedLayerNormalization": "SkipSLN",
    "RotaryEmbedding": "Rot",
    "MatMulNBits": "MNB",
}


def tokens_cell(row: dict) -> str:
    """'ok' when every sequence matches eager's greedy tokens, else matches/total and the
    earliest differing index; '-' without a comparison."""
    check = row.get("tokens")
    if not isinstance(check, dict) or "first_diff" not in check:
        return "-"
    first = check["first_diff"]
    if check["all_match"]:
        return "ok"
    bad = [d for d in first if d != -1]
    return f"{len(first) - len(bad)}/{len(first)}@{min(bad)}"


def print_table() -> None:
    head = f"{'config':<13}{'who':<15}{'b':>2}{'prefill':>9}{'ms/tok':>8}{'tok/s':>9}"
    print(f"\n{head}{'tokens':>9}{'GiB':>7}  (tokens: vs eager greedy; GiB: GPU after runs)")
    for name, results in RESULTS.items():
        if name in ("meta", "diagnose"):
            continue
        for who, row in results.items():
            build_row = who.startswith("build ")
            if not isinstance(row, dict) or who == "hf":
                continue
            if build_row and RESULTS["meta"]["phase"] != "build":
                continue  # the timed row says "build failed" when it did
            if "error" in row:
                print(f"{name:<13}{who:<15} ERROR {row['error'][:110]}")
                continue
            gpu = row.get("gpu_gib_after_runs", row.get("gpu_gib_model", ""))
            for b in ("b1", "b8"):
                if b in row:
                    r = row[b]
                    print(
                        f"{name:<13}{who:<15}{b[1:]:>2}{r['prefill_ms']:>9.2f}"
                        f"{r['decode_ms_per_token']:>8.3f}{r['tokens_per_s']:>9.1f}"
                        f"{tokens_cell(r):>9}{gpu:>7}"
                    )
            extra = []
            if "ops" in row:
                extra.append(" ".join(f"{SHORT.get(k, k)}{v}" for k, v in row["ops"].items()))
            nbits = row.get("nbits")
            if nbits:
                extra.append(
                    f"bits/w {nbits['bits_per_quantized_weight']} file bits/param "
                    f"{nbits['bits_per_param_file']} block {nbits['block_size']}"
                )
            for key in ("compile_s", "build_s", "export_s", "load_s"):
                if key in row:
                    extra.append(f"{key} {row[key]}")
            if extra:
                print(f"{'':<13}{who:<15} " + "; ".join(extra)[:150])
        hf = results.get("hf", {})
        if "weights_bytes" in hf:
            print(
                f"{name:<13}{hf.get('weights')}, {gib(hf['weights_bytes'])} GiB, decode floor "
                f"(weights / 3.0 TB/s) {hf.get('decode_floor_ms_3TBps')} ms"
            )
    if "diagnose" in RESULTS:
        print("diagnose:", json.dumps(RESULTS["diagnose"])[:800])


if __name__ == "__main__":
    main()
