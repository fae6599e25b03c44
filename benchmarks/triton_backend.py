"""peakc's Triton backend against eager PyTorch, a torch.compile gpt-fast-style decode loop,
transformers' generate with a static cache and an AOTInductor package (issue 16, Speed).

One call per model, every peer in the same run: prefill latency (batch 1, --prefill tokens),
decode ms/token at each batch with a --context-token cache, the floor (bytes a decode step must
read over the device's copy bandwidth measured in this run), peakc's compile time, its load
time cold and warm (two fresh processes: the second finds the kernel caches), the cost model's
predicted decode step, and a per-step table of one peakc decode step (time, bytes, bandwidth).
Records are merged into --out (a run replaces its model's records on its device).

    python benchmarks/triton_backend.py --model llama-1b          # on the GPU
    python benchmarks/triton_backend.py --smoke                   # tiny model, CPU interpreter
    python benchmarks/triton_backend.py --table                   # RESULTS.md rows from --out
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_bench_models import gguf_model, random_model, sync  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "llama-1b", "llama-8b")
KEYS = ("date", "device", "model", "runtime", "batch", "prefill_ms", "decode_ms", "floor_ms")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- the floor ------------------------------------------------------------------------------


def copy_bandwidth(device: str) -> float:
    """Bytes per second a device-to-device copy moves (read + write), median of 10."""
    size = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start = sync(device)
        dst.copy_(src)
        times.append(sync(device) - start)
    return 2 * size / statistics.median(times)


def step_bytes(model, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once (a tied head counted once; an untied
    input embedding is gathered, not read) and the keys and values of `context` tokens."""
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    if not model.config.tie_word_embeddings:
        weights.pop(embedding.data_ptr(), None)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * context * head_dim
    return sum(weights.values()) + kv * embedding.element_size()


# --- peers ----------------------------------------------------------------------------------


def prompt_ids(vocab: int, batch: int, length: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def time_loop(step: Callable[[], None], steps: int, device: str) -> float:
    """Milliseconds per call of `step` run `steps` times back to back (one sync at the end)."""
    start = sync(device)
    for _ in range(steps):
        step()
    return (sync(device) - start) * 1e3 / steps


def eager_peer(model, args, batch: int, device: str) -> dict:
    """transformers' forward with its dynamic cache, uncompiled: prefill, then greedy steps."""
    ids = prompt_ids(model.config.vocab_size, batch, args.context, device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        state = {"cache": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

        def step() -> None:
            out = model(input_ids=state["token"], past_key_values=state["cache"], use_cache=True)
            state["cache"], state["token"] = out.past_key_values, out.logits[:, -1:].argmax(-1)

        step()
        return {"decode_ms": time_loop(step, args.steps, device)}


def torch_compile_peer(model, args, batch: int, device: str) -> dict:
    """gpt-fast's loop: a static cache, the one-token step compiled with reduce-overhead (CUDA
    graphs), tokens fed back on the device."""
    from transformers import StaticCache

    length = args.context + args.steps + 8
    cache = StaticCache(config=model.config, max_cache_len=length)
    ids = prompt_ids(model.config.vocab_size, batch, args.context, device)

    def forward(tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=tokens, past_key_values=cache, cache_position=position)
        return out.logits[:, -1:].argmax(-1)

    decode = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        token = forward(ids, torch.arange(args.context, device=device))
        state = {"token": token, "pos": torch.tensor([args.context], device=device)}

        def step() -> None:  # gpt-fast clones: the next replay reuses the output buffer
            state["token"] = decode(state["token"], state["pos"]).clone()
            state["pos"] += 1

        for _ in range(3):  # compile and capture outside the timing
            step()
        return {"decode_ms": time_loop(step, args.steps, device)}


def torch_compile_prefill(model, args, device: str) -> float:
    """torch.compile's prefill of one --prefill-token prompt (default mode, static shape)."""
    ids = prompt_ids(model.config.vocab_size, 1, args.prefill, device)
    prefill = torch.compile(lambda x: model(input_ids=x, use_cache=False).logits[:, -1])
    with torch.no_grad():
        for _ in range(2):
            prefill(ids)
        return time_loop(lambda: prefill(ids), 5, device)


def hf_generate_peer(model, args, batch: int, device: str) -> dict:
    """transformers' generate with cache_implementation="static": (all steps - one) / steps."""
    ids = prompt_ids(model.config.vocab_size, batch, args.context, device)
    options = dict(do_sample=False, cache_implementation="static", pad_token_id=0)

    def run(new: int) -> float:
        start = sync(device)
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **options)
        return sync(device) - start

    run(args.steps + 1)  # warm-up
    first, whole = run(1), run(args.steps + 1)
    return {"decode_ms": (whole - first) * 1e3 / args.steps}


def aoti_peer(model, args, batch: int, device: str) -> dict:
    """The model's KV-cache decoder (peakc's wrapper, uncompiled by peakc) at (batch, 1)
    packaged by AOTInductor, run in the same loop: the cache written after each step."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    from peakc.models import kv_cache
    from peakc.runtime.generate import write_cache

    length = args.context + args.steps + 8
    decoder, layout = kv_cache.wrap_for_generation(model, length, batch, args.model)

    shape = (layout.num_layers, batch, layout.num_kv_heads, layout.max_seq_len, layout.head_dim)
    k = torch.zeros(shape, dtype=getattr(torch, layout.dtype), device=device)
    v = torch.zeros_like(k)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), args.context, dtype=torch.long, device=device)
    with torch.no_grad():
        exported = torch.export.export(decoder, (ids, pos, k, v), strict=False)
        path = aoti_compile_and_package(exported, package_path=tempfile.mktemp(suffix=".pt2"))
        run = aoti_load_package(path)

        def step() -> None:
            logits, new_k, new_v = run(ids, pos, k, v)
            write_cache(k, v, new_k, new_v, pos)
            ids.copy_(logits[:, -1:].argmax(-1))

        step()
        return {"decode_ms": time_loop(step, args.steps, device)}


# --- peakc ----------------------------------------------------------------------------------


def compile_peakc(model, args, folder: Path, device: str) -> dict:
    """The model's KV-cache decoder compiled to the triton backend (captured from a host copy
    of the model, as a user compiles ahead of deployment) and saved: its compile time and
    report, and the transformed graph."""
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
    )
    compiled.save(folder, force=True)
    info = {"compile_s": round(time.perf_counter() - start, 2)}
    info["report"] = compiled.contents.report["triton"]
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


def step_table(artifact, batch: int, context: int, device: str) -> list[dict]:
    """One decode step of the decode_step program, each step timed alone: time, the bytes of
    the tensors it reads and writes, and the bandwidth that makes (views left out)."""
    program = artifact.program("decode_step")
    weights = [w.to(device) for w in artifact.weight_list("decode_step")]
    layout = artifact.manifest["generation"]
    shape = (layout["num_layers"], batch, layout["num_kv_heads"], layout["max_seq_len"])
    dtype = getattr(torch, layout["dtype"])
    k = torch.zeros((*shape, layout["head_dim"]), dtype=dtype, device=device)
    v = torch.zeros_like(k)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), context, dtype=torch.long, device=device)
    spec = program.spec
    env: list = [None] * spec["values"]
    for value_id, tensor in zip(spec["weights"] + spec["inputs"], [*weights, ids, pos, k, v]):
        env[value_id] = tensor
    rows = []
    with torch.no_grad():
        for step in program.steps:
            inputs = [a for a in _flat(program_args(step, env)) if isinstance(a, torch.Tensor)]
            start = sync(device)
            program.run_step(step, env)
            seconds = sync(device) - start
            outs = step.out if isinstance(step.out, list) else [step.out]
            results = [t for o in outs for t in _flat(env[o]) if isinstance(t, torch.Tensor)]
            if all(_is_view(t, inputs) for t in results):
                continue
            moved = sum(t.numel() * t.element_size() for t in inputs + results)
            rows.append({
                "step": step.entry.get("op") or step.entry["kind"],
                "kind": step.entry["kind"],
                "nodes": len(step.entry.get("nodes", [])),
                "us": round(seconds * 1e6, 2),
                "bytes": moved,
                "gb_per_s": round(moved / seconds / 1e9, 1) if seconds else None,
            })  # fmt: skip
    return rows


def program_args(step, env) -> list:
    from peakc.backends.triton.program import resolve

    return resolve(step.args, env)


def _flat(value) -> list:
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _flat(item)]
    return [value]


def _is_view(t: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(ptr == i.untyped_storage().data_ptr() for i in inputs)


# --- one model ------------------------------------------------------------------------------


def build_model(args, device: str):
    """The named model in --dtype on the device: SmolLM2's real weights from --gguf, else
    random weights; the 1B's head is tied to its embedding, as the issue's shape says."""
    dtype = getattr(torch, args.dtype)
    if args.gguf:
        return gguf_model(Path(args.gguf), args.model, device, dtype)
    model = random_model(args.model, device, dtype)
    if args.model in ("llama-1b", "tiny"):
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def run_peer(name: str, fn: Callable[..., dict], *args) -> dict:
    """`fn(*args)`'s numbers, or its error (a peer that does not build or run is reported, and
    the others still run)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - one peer's failure is a result, not a crash
        log(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def bench_model(args) -> list[dict]:
    """Every peer on one model (module docstring); the records in KEYS' shape plus details."""
    device = "cpu" if args.smoke else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    date = datetime.date.today().isoformat()
    bandwidth = copy_bandwidth(device)
    model = build_model(args, device)
    log(f"{args.model}: built; copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    records: list[dict] = []

    def record(runtime: str, batch: int, row: dict, prefill: float | None = None) -> None:
        floor = step_bytes(model, batch, args.context) / bandwidth * 1e3
        rec = {"date": date, "device": name, "model": args.model, "runtime": runtime}
        rec.update(batch=batch, prefill_ms=prefill, decode_ms=row.pop("decode_ms", None))
        rec.update(floor_ms=round(floor, 4), context=args.context, **row)
        if rec["decode_ms"] is not None:
            rec["decode_ms"] = round(rec["decode_ms"], 4)
        records.append(rec)
        merge(args.out, records)  # after every record: a run cut short keeps what it measured
        log(json.dumps({k: rec.get(k) for k in (*KEYS, "predicted_ms", "error")}))

    with tempfile.TemporaryDirectory(prefix="peakc-triton-bench-") as work:
        bench_peakc(args, model, Path(work) / "artifact", device, record)
    if not args.smoke and "aoti" not in args.skip:
        model.config.use_cache = False
        for batch in args.batches:
            record("aoti", batch, run_peer("aoti", aoti_peer, model, args, batch, device))
    model.config.use_cache = True
    if "eager" not in args.skip:
        for batch in args.batches:
            record("eager", batch, run_peer("eager", eager_peer, model, args, batch, device))
    if args.smoke:
        return records
    if "torch-compile" not in args.skip:
        prefill = run_peer("prefill", lambda: {"ms": torch_compile_prefill(model, args, device)})
        for batch in args.batches:
            row = run_peer("torch.compile", torch_compile_peer, model, args, batch, device)
            record("torch-compile", batch, row, prefill.get("ms") if batch == 1 else None)
    if "hf-generate" not in args.skip:
        for batch in args.batches:
            row = run_peer("hf generate", hf_generate_peer, model, args, batch, device)
            record("hf-generate", batch, row)
    return records


def bench_peakc(args, model, folder: Path, device: str, record: Callable) -> None:
    """Compile, load (cold and warm), prefill, decode per batch with the cost model's
    prediction, and the per-step table at the first batch."""
    import peakc
    from peakc.backends.triton.cost import predict_decode_ms
    from peakc.cost_model.hardware import resolve_profile
    from peakc.cost_model.predict import CostModel
    from peakc.runtime.generate import Generator

    built = run_peer("peakc compile", compile_peakc, model, args, folder, device)
    if "error" in built:
        record("peakc-triton", args.batches[0], built)
        return
    info = built["info"]
    info["load_s"] = run_peer("load", lambda: {"cold_warm": load_seconds(folder)})
    artifact = peakc.load(folder)
    generator = Generator.from_artifact(artifact, device)
    cost = CostModel(resolve_profile(args.target), runtime="graph")
    prefill = run_peer("peakc prefill", lambda: {"ms": peakc_prefill_ms(generator, args)})
    for batch in args.batches:
        row = run_peer("peakc", peakc_peer, args, batch, generator)
        row["predicted_ms"] = round(predict_decode_ms(built["graph"], cost, batch, args.context), 4)
        if batch == args.batches[0]:
            row.update(compile_s=info["compile_s"], load_s=info["load_s"], triton=info["report"])
            row["steps"] = run_peer(
                "steps", lambda b=batch: {"table": step_table(artifact, b, args.context, device)}
            )
        record("peakc-triton", batch, row, prefill.get("ms") if batch == 1 else None)


# --- results --------------------------------------------------------------------------------


def merge(path: Path, records: list[dict]) -> None:
    """Add the run's records to the file, replacing the same model's on the same device."""
    old = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["model"], r["device"]) for r in records}
    kept = [r for r in old if (r["model"], r["device"]) not in done]
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
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    parser.add_argument(
        "--skip",
        default="",
        help="peers left out, comma-separated: aoti, eager, torch-compile, hf-generate",
    )
    parser.add_argument("--table", action="store_true", help="print RESULTS.md rows from --out")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.skip = {s for s in args.skip.split(",") if s}
    if args.smoke:
        args.model, args.dtype, args.target = "tiny", "float32", "cpu"
        args.batches, args.context, args.prefill, args.steps = [1, 2], 12, 8, 2
        if args.out == parser.get_default("out"):
            args.out = Path(tempfile.gettempdir()) / "triton_backend_smoke.json"
    elif not torch.cuda.is_available():
        parser.error("the benchmark runs on a CUDA GPU (--smoke runs a tiny model on the CPU)")
    records = bench_model(args)
    merge(args.out, records)
    print(markdown_table(records))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
