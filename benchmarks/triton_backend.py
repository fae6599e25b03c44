"""peakc's Triton backend against eager PyTorch, a torch.compile gpt-fast-style decode loop,
transformers' generate with a static cache and an AOTInductor package (issue 16, Speed).

One call per model, every peer in the same run: prefill latency (batch 1, --prefill tokens),
decode ms/token at each batch with a --context-token cache, the floor (bytes a decode step must
read over the device's copy bandwidth measured in this run), peakc's compile time, its load
time cold and warm (two fresh processes: the second finds the kernel caches), the cost model's
predicted decode step, and per-kernel profiles (torch.profiler) of one peakc decode step (its
CUDA graph replayed) and of the prefill: time, share of the step, bytes and bandwidth per op.
Each peer runs in its own process with what is left of --budget-s, so a peer that does not
build or runs out of time is an error row and the others still run; each phase logs its wall
time. Records are merged into --out after each one (a run replaces the records of the runtimes
it measured, on its model and device).

    python benchmarks/triton_backend.py --model llama-1b          # on the GPU
    python benchmarks/triton_backend.py --model smollm2-135m --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/triton_backend.py --model llama-8b --skip aoti,hf-generate   # then:
    python benchmarks/triton_backend.py --model llama-8b --skip peakc-triton,eager,torch-compile
    python benchmarks/triton_backend.py --smoke                   # tiny model, CPU interpreter
    python benchmarks/triton_backend.py --table                   # RESULTS.md rows from --out
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_bench_models import gguf_model, random_model, sync  # noqa: E402

from peakc.runtime.bench import copy_bandwidth  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "llama-1b", "llama-8b")
KEYS = ("date", "device", "model", "runtime", "batch", "prefill_ms", "decode_ms", "floor_ms")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- the floor ------------------------------------------------------------------------------


def step_bytes(model, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once (a tied head counted once; an untied
    input embedding is gathered, not read) and the keys and values of `context` tokens."""
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    if not model.config.tie_word_embeddings:
        weights.pop(embedding.data_ptr(), None)
    return sum(weights.values()) + kv_cache_bytes(model, batch, context)


def kv_cache_bytes(model, batch: int, context: int) -> int:
    """Bytes of the keys and values of `context` tokens, every layer, in the model's dtype."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * context * head_dim
    return kv * model.get_input_embeddings().weight.element_size()


# --- peers ----------------------------------------------------------------------------------
#
# Each peer runs in its own process (`--peer NAME`), so its build time is bounded: the run's
# --budget-s left when it starts is its time limit, and a peer that does not build, crashes or
# runs out of time is an error row while the others still run. A peer yields (batch, row) as it
# measures, and the child prints each row at once, so a peer cut short keeps its first batches.


def prompt_ids(vocab: int, batch: int, length: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def time_loop(step: Callable[[], None], steps: int, device: str) -> float:
    """Milliseconds per call of `step` run `steps` times back to back (one sync at the end)."""
    start = sync(device)
    for _ in range(steps):
        step()
    return (sync(device) - start) * 1e3 / steps


def eager_peer(model, args, device: str) -> Iterator[tuple[int, dict]]:
    """transformers' forward with its dynamic cache, uncompiled: prefill, then greedy steps."""
    model.config.use_cache = True
    for batch in args.batches:
        yield batch, {"decode_ms": eager_decode_ms(model, args, batch, device)}


def eager_decode_ms(model, args, batch: int, device: str) -> float:
    ids = prompt_ids(model.config.vocab_size, batch, args.context, device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        state = {"cache": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

        def step() -> None:
            out = model(input_ids=state["token"], past_key_values=state["cache"])
            state["cache"], state["token"] = out.past_key_values, out.logits[:, -1:].argmax(-1)

        step()
        return time_loop(step, args.steps, device)


def torch_compile_peer(model, args, device: str) -> Iterator[tuple[int, dict]]:
    """gpt-fast's loop: a static cache, the one-token step compiled with reduce-overhead (CUDA
    graphs), tokens fed back on the device; and the prefill of one --prefill-token prompt
    (default mode, static shape) on the batch-1 row."""
    model.config.use_cache = True
    ids = prompt_ids(model.config.vocab_size, 1, args.prefill, device)
    prefill = torch.compile(lambda x: model(input_ids=x, use_cache=False).logits[:, -1])
    with torch.no_grad():
        for _ in range(2):
            prefill(ids)
        prefill_ms = time_loop(lambda: prefill(ids), 5, device)
    for batch in args.batches:
        row = {"decode_ms": compiled_decode_ms(model, args, batch, device)}
        yield batch, {**row, "prefill_ms": prefill_ms} if batch == 1 else row


def compiled_decode_ms(model, args, batch: int, device: str) -> float:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=args.context + args.steps + 8)

    def forward(tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=tokens, past_key_values=cache, cache_position=position)
        return out.logits[:, -1:].argmax(-1)

    decode = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    ids = prompt_ids(model.config.vocab_size, batch, args.context, device)
    with torch.no_grad():
        token = forward(ids, torch.arange(args.context, device=device))
        state = {"token": token, "pos": torch.tensor([args.context], device=device)}

        def step() -> None:  # gpt-fast clones: the next replay reuses the output buffer
            state["token"] = decode(state["token"], state["pos"]).clone()
            state["pos"] += 1

        for _ in range(3):  # compile and capture outside the timing
            step()
        return time_loop(step, args.steps, device)


def hf_generate_peer(model, args, device: str) -> Iterator[tuple[int, dict]]:
    """transformers' generate with cache_implementation="static": (all steps - one) / steps."""
    model.config.use_cache = True
    options = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    for batch in args.batches:
        ids = prompt_ids(model.config.vocab_size, batch, args.context, device)
        run = functools.partial(generate_seconds, model, ids, device, **options)
        run(args.steps + 1)  # warm-up
        first, whole = run(1), run(args.steps + 1)
        yield batch, {"decode_ms": (whole - first) * 1e3 / args.steps}


def generate_seconds(model, ids: torch.Tensor, device: str, new: int, **options) -> float:
    start = sync(device)
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, **options)
    return sync(device) - start


def aoti_peer(model, args, device: str) -> Iterator[tuple[int, dict]]:
    """The KV-cache decoder peakc compiles (peakc's wrapper of the same model) exported with a
    dynamic batch, its attention op decomposed into ATen (the op's reference: the package
    calls no Python), packaged once by AOTInductor and run in peakc's decode loop: one token
    per sequence, the cache written after each step."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    from peakc.ir.ops import find_op
    from peakc.models import kv_cache

    model.config.use_cache = False
    length = args.context + args.steps + 8
    decoder, layout = kv_cache.wrap_for_generation(model, length, max(args.batches), args.model)
    started = time.perf_counter()
    dim = torch.export.Dim("batch", min=1, max=max(2, *args.batches))
    dynamic = ({0: dim}, {0: dim}, {1: dim}, {1: dim})
    attention = torch.ops.peakc.attention_cache.default
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="peakc-aoti-") as folder:
        example = aoti_inputs(layout, args, 2, device)
        exported = torch.export.export(decoder, example, dynamic_shapes=dynamic, strict=False)
        exported = exported.run_decompositions({attention: find_op("attention_cache").reference})
        run = aoti_load_package(aoti_compile_and_package(exported, package_path=f"{folder}/d.pt2"))
        build_s = round(time.perf_counter() - started, 1)
        log(f"aoti: built in {build_s} s")
        for batch in args.batches:
            values = aoti_inputs(layout, args, batch, device)
            row = {"decode_ms": cache_loop_ms(run, values, args.steps, device), "build_s": build_s}
            yield batch, row


def aoti_inputs(layout, args, batch: int, device: str) -> tuple[torch.Tensor, ...]:
    """(ids, positions at --context, empty caches) for `batch` sequences."""
    shape = (layout.num_layers, batch, layout.num_kv_heads, layout.max_seq_len, layout.head_dim)
    k = torch.zeros(shape, dtype=getattr(torch, layout.dtype), device=device)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), args.context, dtype=torch.long, device=device)
    return ids, pos, k, torch.zeros_like(k)


def cache_loop_ms(run: Callable, values: tuple, steps: int, device: str) -> float:
    """peakc's decode loop around a decoder `run(ids, positions, k, v)`: ms per step."""
    from peakc.runtime.generate import write_cache

    ids, pos, k, v = values

    def step() -> None:
        logits, new_k, new_v = run(ids, pos, k, v)
        write_cache(k, v, new_k, new_v, pos)
        ids.copy_(logits[:, -1:].argmax(-1))

    with torch.no_grad():
        step()
        return time_loop(step, steps, device)


PEERS = {
    "eager": eager_peer,
    "torch-compile": torch_compile_peer,
    "hf-generate": hf_generate_peer,
    "aoti": aoti_peer,
}


def peer_main(args) -> None:
    """`--peer NAME` (a child of the run): build the model, print one `PEER {json}` line per
    batch as it is measured (an error, as the row of every batch left)."""
    device = "cpu" if args.smoke else "cuda"
    done = set()
    try:
        model = build_model(args, device)
        for batch, row in PEERS[args.peer](model, args, device):
            done.add(batch)
            print("PEER " + json.dumps({"batch": batch, **row}), flush=True)
    except Exception as exc:  # noqa: BLE001 - a peer that does not build or run is a result
        error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        log(f"{args.peer}: {error}")
        for batch in args.batches:
            if batch not in done:
                print("PEER " + json.dumps({"batch": batch, "error": error}), flush=True)


def run_peer_process(name: str, args, seconds: float) -> list[dict]:
    """The peer's rows from a child process given `seconds` (then it and its compile workers
    are killed: the batches it did not finish get a timeout error)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--peer", name,
            "--dtype", args.dtype, "--batches", ",".join(map(str, args.batches)),
            "--context", str(args.context), "--prefill", str(args.prefill),
            "--steps", str(args.steps)]  # fmt: skip
    argv += ["--model", args.model] if args.model in MODELS else []  # else: the smoke's tiny
    argv += ["--gguf", args.gguf] if args.gguf else []
    argv += ["--smoke"] if args.smoke else []
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = child.communicate(timeout=seconds)
        failure = f"exit status {child.returncode}" if child.returncode else "no row printed"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        failure = f"not done in the {seconds:.0f} s left of --budget-s"
    rows = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("PEER ")]
    measured = {row["batch"] for row in rows}
    rows += [{"batch": b, "error": failure} for b in args.batches if b not in measured]
    return sorted(rows, key=lambda row: args.batches.index(row["batch"]))


# --- peakc ----------------------------------------------------------------------------------


def compile_peakc(
    model, args, folder: Path, device: str, pipeline: str = "default", calibration_data=None
) -> dict:
    """The model's KV-cache decoder compiled to the triton backend (captured from a host copy
    of the model, as a user compiles ahead of deployment) through `pipeline` and saved: its
    compile time and report, and the transformed graph."""
    import copy

    import peakc
    from peakc.models import kv_cache

    start = time.perf_counter()
    host = copy.deepcopy(model).to("cpu")
    host.config.use_cache = False
    # room for the prefill prompt too (decode attends to `context` slots; the kernels read
    # only the filled prefix, so a longer cache costs no decode time)
    length = max(args.context, args.prefill) + args.steps + 8
    decoder, layout = kv_cache.wrap_for_generation(host, length, max(args.batches), args.model)
    backend = "triton"
    if device == "cuda":
        batches = ",".join(map(str, args.batches))
        backend = f"triton{{cuda_graph=true,tune=true,decode_batches=[{batches}]}}"
    compiled = peakc.compile(
        decoder,
        kv_cache.example_inputs(layout),
        backend=backend,
        target=args.target,
        dynamic=kv_cache.dynamic_shapes(layout),
        generation=layout.to_dict(),
        source=args.model,
        parity=False,
        pipeline=pipeline,
        calibration_data=calibration_data,
    )
    compiled.save(folder, force=True)
    info = {"compile_s": round(time.perf_counter() - start, 2)}
    report = json.loads(json.dumps(compiled.contents.report["triton"]))
    for program in report["programs"].values():  # per-launch work stays in the artifact
        if isinstance(program["cost"], dict):
            program["cost"].pop("launches", None)
            program["cost"].pop("shapes", None)
    info["report"] = report
    return {"info": info, "graph": compiled.graph}


LOAD_SCRIPT = """
import sys, time, torch
start = time.perf_counter()
import peakc
from peakc.runtime.generate import Generator, SamplingConfig
artifact = peakc.load(sys.argv[1])
generator = Generator.from_artifact(artifact)
generator.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=2))
print(time.perf_counter() - start)
"""


def load_seconds(folder: Path) -> list[float]:
    """Seconds from `peakc.load` to a first decode step in a fresh process, twice: cold (empty
    kernel caches, as after install) and warm (the second finds them)."""
    seconds = []
    with tempfile.TemporaryDirectory(prefix="peakc-triton-caches-") as caches:
        env = dict(os.environ, PEAKC_TRITON_CACHE=f"{caches}/peakc", TRITON_CACHE_DIR=caches)
        for _ in range(2):
            run = subprocess.run(
                [sys.executable, "-c", LOAD_SCRIPT, str(folder)], env=env, capture_output=True,
                text=True, check=True,
            )  # fmt: skip
            seconds.append(round(float(run.stdout.strip().splitlines()[-1]), 3))
    return seconds


def peakc_peer(args, batch: int, generator) -> dict:
    """The artifact's Generator: prompts of --context tokens, then --steps greedy steps."""
    from peakc.runtime.generate import SamplingConfig

    vocab = generator.layout["vocab_size"]
    prompts = prompt_ids(vocab, batch, args.context, "cpu").tolist()
    config = SamplingConfig(max_new_tokens=args.steps + 1)
    generator.generate(prompts, config)  # captures this batch's CUDA graph
    result = generator.generate(prompts, config)
    return {"decode_ms": result.decode_seconds * 1e3 / result.decode_steps}


def peakc_prefill_ms(generator, args) -> float:
    from peakc.runtime.generate import SamplingConfig

    prompt = prompt_ids(generator.layout["vocab_size"], 1, args.prefill, "cpu").tolist()
    config = SamplingConfig(max_new_tokens=1)
    generator.generate(prompt, config)
    runs = [generator.generate(prompt, config).prefill_seconds for _ in range(5)]
    return statistics.median(runs) * 1e3


# --- the per-kernel profile -----------------------------------------------------------------
#
# torch.profiler around a few replays of the decode step's CUDA graph (and one eager call of the
# prefill program): per kernel name, launches and device time per step, and its share of the
# step measured without the profiler; the rest of the step is launch gaps and host time. Bytes
# come from the cost model's launches of the program (report.json, interpolated to the
# profiled batch and context), summed per op: a Triton kernel's op is known from the program's
# launchers; other kernels are cuBLAS GEMMs or ATen ops, told apart by name. On the CPU (the
# Triton interpreter runs kernels as Python) the rows are the top-level CPU ops instead.

GEMM_NAMES = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk", "aten::mm",
              "aten::addmm", "aten::linear", "aten::bmm", "aten::matmul")  # fmt: skip


def kernel_times(run: Callable[[], None], calls: int, device: str) -> dict[str, list[float]]:
    """Per kernel name, the microseconds of each of its launches over `calls` calls of `run`:
    CUDA kernels on a GPU, top-level CPU ops on the CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    with profile(activities=[activity]) as prof, torch.no_grad():
        for _ in range(calls):
            run()
        sync(device)
    times: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == kind and (cuda or event.cpu_parent is None):
            times.setdefault(event.name, []).append(event.time_range.elapsed_us())
    return times


def program_kernel_ops(program) -> dict[str, str]:
    """Kernel function name -> the op of the program step that launches it (a peakc op, or
    "fusion group" for a generated kernel)."""
    names = {}
    for step in program.steps:
        if step.kernel is None:
            continue
        op = step.entry.get("op") or "fusion group"
        for kernel in getattr(program.launchers[step.kernel], "kernels", ()):
            names[getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))] = op
    return names


def kernel_op(name: str, triton: dict[str, str]) -> str:
    """The op a profiled kernel runs: a Triton kernel's by its function name (or a name it
    starts, should triton suffix it), else a cuBLAS GEMM or an ATen op by its name."""
    known = [t for t in triton if name == t or name.startswith(t + "_")]
    if known:
        return triton[max(known, key=len)]
    return "gemm" if any(g in name.lower() for g in GEMM_NAMES) else "aten"


def launch_op(launch: dict, triton_ops: set[str]) -> str:
    """The op a cost-model launch belongs to, in kernel_op's terms."""
    short = launch["op"].split(".")[-1] if "." in launch["op"] else launch["op"]
    if launch["op"] == "fusion group" or short in triton_ops:
        return "fusion group" if launch["op"] == "fusion group" else short
    return "gemm" if launch["kind"] == "gemm" else "aten"


def kernel_table(
    times: dict[str, list[float]],
    calls: int,
    step_us: float,
    triton: dict[str, str],
    launches: list[dict] | None,
    profile=None,
) -> dict:
    """The profile as rows per kernel (launches and us per step, share of the step) and per op
    (with the cost model's bytes, achieved GB/s and predicted us when `launches` are known),
    kernel time against the measured step."""
    from peakc.backends.triton.cost import price_launches

    rows = []
    for name, spans in times.items():
        us = sum(spans) / calls
        rows.append({"kernel": name, "op": kernel_op(name, triton),
                     "launches": round(len(spans) / calls, 2), "us": round(us, 2),
                     "share": round(us / step_us, 4)})  # fmt: skip
    rows.sort(key=lambda row: -row["us"])
    ops: dict[str, dict] = {}

    def of(name: str) -> dict:
        return ops.setdefault(name, {"op": name, "kernels": 0, "launches": 0.0, "us": 0.0})

    for row in rows:
        op = of(row["op"])
        op["kernels"] += 1
        op["launches"] = round(op["launches"] + row["launches"], 2)
        op["us"] = round(op["us"] + row["us"], 2)
    for launch in launches or []:
        op = of(launch_op(launch, set(triton.values())))
        op["bytes"] = op.get("bytes", 0.0) + launch["bytes"]
        if profile is not None:
            seconds = price_launches([launch], profile)
            op["predicted_us"] = op.get("predicted_us", 0.0) + seconds * 1e6
    for op in ops.values():
        if op.get("bytes") and op["us"]:
            op["gb_per_s"] = round(op["bytes"] / op["us"] / 1e3, 1)
        for key in ("bytes", "predicted_us"):
            if key in op:
                op[key] = round(op[key], 1)
    for row in rows:  # a kernel alone in its op gets the op's bytes
        op = ops[row["op"]]
        if op["kernels"] == 1 and op.get("bytes"):
            row["bytes"], row["gb_per_s"] = op["bytes"], op["gb_per_s"]
    kernel_us = sum(row["us"] for row in rows)
    return {
        "step_us": round(step_us, 2),
        "kernel_us": round(kernel_us, 2),
        "gap_us": round(step_us - kernel_us, 2),
        "rows": rows,
        "by_op": sorted(ops.values(), key=lambda op: -op["us"]),
    }


def profile_decode(artifact, generator, args, batch: int, device: str) -> dict:
    """The decode step at `batch`, after the Generator decoded at it: on a GPU its captured
    CUDA graph replayed (the cache position the last decode left), on the CPU the decode_step
    program called eagerly at --context."""
    from peakc.backends.triton.cost import launches_at

    program = artifact.program("decode_step")
    source = "the decode_step program, called eagerly"
    if device == "cuda":
        graph, _, positions, _ = generator.step.graphs[batch]
        run, context = graph.replay, int(positions.max()) + 1
        source = "the decode step's CUDA graph, replayed"
    else:
        context = args.context
        run = decode_step_call(artifact, batch, context, device)
    calls = 2 if args.smoke else 20
    run()
    step_us = time_loop(run, calls, device) * 1e3
    times = kernel_times(run, calls, device)
    if device == "cuda" and not times:  # a profiler that does not see inside CUDA graphs
        source = "the decode_step program, called eagerly (no kernels seen in the CUDA graph)"
        times = kernel_times(decode_step_call(artifact, batch, context, device), calls, device)
    sampled = artifact_cost(artifact, "decode_step").get("shapes")
    launches = launches_at(sampled, batch, context) if isinstance(sampled, dict) else None
    table = kernel_table(times, calls, step_us, program_kernel_ops(program), launches,
                         resolve_target(args))  # fmt: skip
    return {"phase": "decode", "batch": batch, "context": context, "calls": calls,
            "profiled": source, **table}  # fmt: skip


def profile_prefill(artifact, generator, args, device: str) -> dict:
    """The prefill of one --prefill-token prompt: on a GPU its CUDA graph replayed when the
    Generator captured one for it (cuda_graphs' prefill buckets), else one eager call of the
    prefill program (after a warm-up)."""
    from peakc.backends.triton.cost import launches_at
    from peakc.backends.triton.cuda_graphs import prefill_bucket

    program = artifact.program("decoder")
    graphs = getattr(generator.step, "prefill_graphs", {})
    slots = artifact.manifest["generation"]["max_seq_len"]
    bucket = prefill_bucket(args.prefill, args.prefill - 1, slots)
    if device == "cuda" and (1, bucket) in graphs:
        run, source = graphs[(1, bucket)][0].replay, "the prefill's CUDA graph, replayed"
    else:
        weights = [w.to(device) for w in artifact.weight_list("decoder")]
        k, v = empty_cache(artifact, 1, device)
        ids = prompt_ids(artifact.manifest["generation"]["vocab_size"], 1, args.prefill, device)
        positions = torch.arange(args.prefill, device=device)[None]
        run = functools.partial(program, *weights, ids, positions, k, v)
        source = "the prefill program, called eagerly"
    run()
    step_us = time_loop(run, 1 if args.smoke else 3, device) * 1e3
    times = kernel_times(run, 1, device)
    tokens = bucket if source.startswith("the prefill's CUDA graph") else args.prefill
    sampled = artifact_cost(artifact, "decoder").get("shapes")
    launches = launches_at(sampled, 1, tokens) if isinstance(sampled, dict) else None
    table = kernel_table(times, 1, step_us, program_kernel_ops(program), launches,
                         resolve_target(args))  # fmt: skip
    return {"phase": "prefill", "batch": 1, "tokens": tokens, "calls": 1, "profiled": source,
            **table}  # fmt: skip


def decode_step_call(artifact, batch: int, context: int, device: str) -> Callable[[], None]:
    """A call of the decode_step program on its own: `batch` tokens at position `context`."""
    program = artifact.program("decode_step")
    weights = [w.to(device) for w in artifact.weight_list("decode_step")]
    k, v = empty_cache(artifact, batch, device)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), context, dtype=torch.long, device=device)
    return lambda: program(*weights, ids, pos, k, v)


def empty_cache(artifact, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    layout = artifact.manifest["generation"]
    shape = (layout["num_layers"], batch, layout["num_kv_heads"], layout["max_seq_len"],
             layout["head_dim"])  # fmt: skip
    k = torch.zeros(shape, dtype=getattr(torch, layout["dtype"]), device=device)
    return k, torch.zeros_like(k)


def artifact_cost(artifact, program: str) -> dict:
    report = json.loads((artifact.directory / "report.json").read_text())
    cost = report["triton"]["programs"][program]["cost"]
    return cost if isinstance(cost, dict) else {}


def resolve_target(args):
    from peakc.cost_model.hardware import resolve_profile

    return resolve_profile(args.target)


def log_kernels(table: dict, top: int = 15) -> None:
    """The profile's top rows and its sum against the step, in the log."""
    log(f"{table['phase']} kernels (batch {table['batch']}): step {table['step_us']:.1f} us, "
        f"kernels {table['kernel_us']:.1f} us, gaps and host {table['gap_us']:.1f} us")  # fmt: skip
    log(f"  {'us/step':>9} {'share':>6} {'launches':>8} {'GB/s':>7}  op / kernel")
    for row in table["rows"][:top]:
        rate = f"{row['gb_per_s']:.0f}" if "gb_per_s" in row else "-"
        log(f"  {row['us']:>9.1f} {row['share']:>6.1%} {row['launches']:>8g} {rate:>7}  "
            f"{row['op']} / {row['kernel'][:70]}")  # fmt: skip
    for op in table["by_op"]:
        rate = f"{op['gb_per_s']:.1f} GB/s" if "gb_per_s" in op else "-"
        predicted = f", predicted {op['predicted_us']:.1f} us" if "predicted_us" in op else ""
        log(f"  op {op['op']}: {op['us']:.1f} us, {op.get('bytes', 0) / 1e6:.2f} MB, {rate}"
            f"{predicted}")  # fmt: skip


# --- one model ------------------------------------------------------------------------------


def build_model(args, device: str):
    """The named model in --dtype on the device: SmolLM2's real weights from --gguf, else
    random weights; the 1B's head is tied to its embedding, as the issue's shape says. A smoke
    run keeps the first two layers of a GGUF model (real weights, seconds under the
    interpreter)."""
    dtype = getattr(torch, args.dtype)
    if args.gguf:
        model = gguf_model(Path(args.gguf), args.model, device, dtype)
        if args.smoke:
            model.model.layers = model.model.layers[:2]
            model.config.num_hidden_layers = 2
        return model
    model = random_model(args.model, device, dtype)
    if args.model in ("llama-1b", "tiny"):
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


class Phases:
    """Wall time of each phase of the run, logged as it ends, and what is left of --budget-s."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            now = time.perf_counter()
            log(f"[{name}: {now - start:.1f} s; run {now - self.started:.1f} s, "
                f"{self.left():.0f} s of --budget-s left]")  # fmt: skip


def run_step(name: str, fn: Callable[..., dict], *args) -> dict:
    """`fn(*args)`'s numbers, or its error (a failed part is reported, the others still run)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - one part's failure is a result, not a crash
        log(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
        return {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}


def bench_model(args) -> list[dict]:
    """Every peer on one model (module docstring); the records in KEYS' shape plus details."""
    device = "cpu" if args.smoke else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    date = datetime.date.today().isoformat()
    clock = Phases(args.budget_s)
    with clock.phase("model and copy bandwidth"):
        bandwidth = copy_bandwidth(device)
        model = build_model(args, device)
        floors = {b: step_bytes(model, b, args.context) / bandwidth * 1e3 for b in args.batches}
    log(f"{args.model}: built; copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    records: list[dict] = []

    def record(runtime: str, batch: int, row: dict) -> None:
        rec = {"date": date, "device": name, "model": args.model, "runtime": runtime}
        rec.update(batch=batch, prefill_ms=row.pop("prefill_ms", None))
        rec.update(decode_ms=row.pop("decode_ms", None), floor_ms=round(floors[batch], 4))
        rec.update(context=args.context, **row)
        for key in ("prefill_ms", "decode_ms"):
            if rec[key] is not None:
                rec[key] = round(rec[key], 4)
        records.append(rec)
        merge(args.out, records)  # after every record: a run cut short keeps what it measured
        log(json.dumps({k: rec.get(k) for k in (*KEYS, "predicted_ms", "error")}))

    if "peakc-triton" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="peakc-triton-bench-") as work:
            bench_peakc(args, model, Path(work) / "artifact", device, record, clock)
    del model  # the peers build their own, in their processes
    if device == "cuda":
        torch.cuda.empty_cache()
    for peer in PEERS:
        if peer in args.skip or (args.smoke and peer != "eager"):
            continue  # the smoke run's CPU has no CUDA graphs nor time to build packages
        if clock.left() < 30:
            log(f"{peer}: not run, {clock.left():.0f} s of --budget-s left")
            continue
        with clock.phase(peer):
            for row in run_peer_process(peer, args, clock.left() - 10):
                record(peer, row.pop("batch"), row)
    return records


def bench_peakc(args, model, folder: Path, device: str, record: Callable, clock: Phases) -> None:
    """Compile, load (cold and warm), prefill, decode per batch with the cost model's
    prediction, and the per-kernel profile of a decode step at the first batch and of the
    prefill."""
    import peakc
    from peakc.backends.triton.cost import predict_decode_ms
    from peakc.cost_model.predict import CostModel
    from peakc.runtime.generate import Generator

    with clock.phase("peakc compile"):
        built = run_step("peakc compile", compile_peakc, model, args, folder, device)
    if "error" in built:
        record("peakc-triton", args.batches[0], built)
        return
    info = built["info"]
    with clock.phase("peakc load, cold and warm"):
        info["load_s"] = run_step("load", lambda: {"cold_warm": load_seconds(folder)})
    artifact = peakc.load(folder)
    generator = Generator.from_artifact(artifact, device)
    cost = CostModel(resolve_target(args), runtime="graph")
    with clock.phase("peakc prefill"):
        prefill = run_step("peakc prefill", lambda: {"ms": peakc_prefill_ms(generator, args)})
    for batch in args.batches:
        with clock.phase(f"peakc decode, batch {batch}"):
            row = run_step("peakc", peakc_peer, args, batch, generator)
            row["predicted_ms"] = round(
                predict_decode_ms(built["graph"], cost, batch, args.context), 4
            )
        if batch == args.batches[0]:
            row.update(compile_s=info["compile_s"], load_s=info["load_s"], triton=info["report"])
            with clock.phase("peakc kernel profiles"):
                row["kernels"] = {
                    "decode": run_step("decode profile", profile_decode, artifact, generator,
                                       args, batch, device),
                    "prefill": run_step("prefill profile", profile_prefill, artifact,
                                        generator, args, device),
                }  # fmt: skip
            for table in row["kernels"].values():
                if "rows" in table:
                    log_kernels(table)
        if batch == 1:
            row["prefill_ms"] = prefill.get("ms")
        record("peakc-triton", batch, row)


# --- results --------------------------------------------------------------------------------


def merge(path: Path, records: list[dict]) -> None:
    """Add the run's records to the file, replacing those of the runtimes it measured on the
    same model and device (so a model can be measured over several calls, some peers each)."""
    old = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["model"], r["device"], r["runtime"]) for r in records}
    kept = [r for r in old if (r["model"], r["device"], r["runtime"]) not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept + records, indent=1) + "\n")


def markdown_table(records: list[dict]) -> str:
    lines = [
        "| date | device | model | runtime | batch | prefill ms | decode ms/token | floor ms | "
        "% of floor | predicted ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        decode = r.get("decode_ms")
        share = f"{100 * r['floor_ms'] / decode:.0f} %" if decode else "-"
        cells = [
            r["date"], r["device"], r["model"], r["runtime"], r["batch"],
            _cell(r.get("prefill_ms")), _cell(decode) if decode else r.get("error", "-")[:60],
            _cell(r["floor_ms"]), share, _cell(r.get("predicted_ms")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-1b")
    parser.add_argument("--gguf", help="SmolLM2-135M's real weights: its GGUF file")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--target", default="h200", help="the cost model's hardware profile")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "triton_backend.json")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the CPU under the Triton interpreter: a tiny model, or with --gguf the first two "
        "layers of the GGUF's",
    )
    parser.add_argument(
        "--skip",
        default="",
        help=f"runtimes left out, comma-separated: peakc-triton, {', '.join(PEERS)}",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540,
        help="wall seconds for the whole run: each peer's process gets what is left when it "
        "starts (one GPU call is 600 s)",
    )
    parser.add_argument("--peer", choices=sorted(PEERS), help=argparse.SUPPRESS)  # a child
    parser.add_argument("--table", action="store_true", help="print RESULTS.md rows from --out")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - {"peakc-triton", *PEERS}
    if unknown:
        parser.error(f"--skip: unknown runtime(s) {', '.join(sorted(unknown))}")
    if args.gguf and args.model != "smollm2-135m":
        parser.error("--gguf holds SmolLM2-135M's weights: use it with --model smollm2-135m")
    if args.smoke:
        args.model = args.model if args.gguf else "tiny"
        args.dtype, args.target = "float32", "cpu"
        args.batches, args.context, args.prefill, args.steps = [1, 2], 12, 8, 2
        if args.out == parser.get_default("out"):
            args.out = Path(tempfile.gettempdir()) / "triton_backend_smoke.json"
    elif not torch.cuda.is_available():
        parser.error("the benchmark runs on a CUDA GPU (--smoke runs a tiny model on the CPU)")
    if args.peer:
        peer_main(args)
        return
    records = bench_model(args)
    merge(args.out, records)
    print(markdown_table(records))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
