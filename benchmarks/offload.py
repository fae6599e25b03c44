"""Offload (issue 20, Speed): an 8B-shaped random bf16 Llama under GPU budgets, peakc's
planned, prefetching executor against transformers + accelerate `device_map="auto"` with the
same `max_memory`, in one run.

Rows: gpu_memory 4, 8 and 12 GB with the rest in pinned CPU memory, and one disk row
(gpu_memory 4 GB, cpu_memory 4 GB, the rest on this machine's disk under --disk). Per row:
prefill and decode tokens/s of both, peakc's predicted tokens/s (its plan, on the h200
profile with the host-to-device and disk bandwidths measured at the start of the run), the
transfer floor (bytes streamed per decode token over those bandwidths) and peak GPU memory
(`torch.cuda.max_memory_allocated` for both runtimes, reset before each row; peakc's plan
counts its weights, caches, two transfer buffers, activations and a 0.1 GB reserve).

The disk row reads the disk, for both runtimes, every step: peakc drops each disk-tier
tensor's pages from the page cache once read (unmapped, then POSIX_FADV_DONTNEED), and a
forward pre-hook on accelerate's model drops the pages of every file it reads offloaded
weights from (its offload folder and the checkpoint's safetensors, which it reads disk-offloaded
weights from in place) before each forward. Without that, this machine's RAM would serve the
"disk" from its page cache. Each record's `page_cache` is the largest share of those files
found cached after an eviction (near 0: the eviction worked; pages the process keeps mapped,
such as accelerate's CPU tier if it maps the checkpoint, cannot be dropped and stay counted).

Timing: a warm-up generation (2 tokens; 1 on the disk row), then one generation of the prompt
and `--decode-tokens` (peakc) or `--accelerate-decode-tokens` (accelerate) new tokens, 2 on the
disk row; prefill is the time to the first token, decode the rest per token. The defaults
finish in about 3 minutes on an H200.
`--int4` adds peakc rows for the model quantized to 4 bits (round-to-nearest, group 128; the
executor streams the packed tensors, the linears run peakc's reference linear_wq); accelerate
has no int4 row here (its GPTQ kernels come from packages this machine does not have).

    python benchmarks/offload.py [--out benchmarks/results/offload.json] [--layers 32]
    python benchmarks/offload.py --smoke    # a tiny model on the CPU (simulated transfers)
    python benchmarks/offload.py --table    # RESULTS.md rows from --out

The model is built on the meta device and materialised directly in bf16 (uniform random
weights); `--layers N` keeps the 8B layer shapes with N of its 32 layers (the output says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from peakc.cost_model.hardware import resolve_profile
from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.models import kv_cache
from peakc.passes.base import PassContext
from peakc.passes.offload import (
    OffloadOptions,
    Solution,
    accelerate_cost,
    accelerate_placement,
    build_problem,
    evaluate,
    plan_record,
    solve_placement,
    unit_traffic,
)
from peakc.runtime.generate import Generator, SamplingConfig
from peakc.runtime.offload import (
    CudaTransfers,
    OffloadExecutor,
    OffloadStep,
    SimulatedTransfers,
    executor_graph,
    offload_units,
    page_cache_share,
)

GB = 1e9
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
)
SMOKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)


@dataclasses.dataclass
class Row:
    """One budget: GPU and CPU memory in GB, and whether the rest goes to disk."""

    gpu_gb: float
    cpu_gb: float
    disk: bool


def build_model(shape: dict, layers: int | None):
    """A random bf16 Llama of `shape`, built on the meta device and materialised on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})})
    config.torch_dtype = torch.bfloat16
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    pattern = torch.empty(1 << 24, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=gen)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                fill_tiled(param.view(-1), pattern)
        model.model.rotary_emb.inv_freq = model.model.rotary_emb.original_inv_freq.clone()
    return model.eval()


def fill_tiled(flat: torch.Tensor, pattern: torch.Tensor) -> None:
    """Copy a random pattern over and over (drawing 8e9 random numbers takes minutes; the
    speed measured does not depend on the values)."""
    for start in range(0, flat.numel(), pattern.numel()):
        part = flat[start : start + pattern.numel()]
        part.copy_(pattern[: part.numel()])


def measure_bandwidths(smoke: bool, folder: Path) -> dict[str, float]:
    """Host-to-device bytes/s from pinned and pageable memory, and disk reads of a file just
    written and dropped from the page cache (the figures the planner and the floor use)."""
    size = (16 << 20) if smoke else (1 << 30)
    host = torch.randint(0, 255, (size,), dtype=torch.uint8)
    pinned = host.pin_memory() if torch.cuda.is_available() else host
    out = {}
    for name, src in (("h2d_pinned", pinned), ("h2d_pageable", host)):
        out[name] = size / median_seconds(lambda src=src: copy_to_device(src), 5)
    path = folder / "peakc-bench-disk.bin"
    host.numpy().tofile(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        started = time.perf_counter()
        pinned.numpy()[:] = memoryview(mapped)
        out["disk_read"] = size / (time.perf_counter() - started)
        mapped.close()
    path.unlink()
    return out


def files_under(*folders: Path) -> list[Path]:
    """Every regular file under the folders (those that exist)."""
    return sorted(p for f in folders if f.exists() for p in f.rglob("*") if p.is_file())


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache: the next read comes from the disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def copy_to_device(src: torch.Tensor) -> None:
    if torch.cuda.is_available():
        src.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
    else:
        src.clone()


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def calibrated_profile(smoke: bool, bandwidths: dict[str, float]):
    """The h200 profile (cpu for --smoke) with this run's measured transfer bandwidths."""
    profile = resolve_profile("cpu" if smoke else "h200")
    profile.h2d_bandwidth_pinned = bandwidths["h2d_pinned"]
    profile.h2d_bandwidth_pageable = bandwidths["h2d_pageable"]
    profile.disk_read_bandwidth = bandwidths["disk_read"]
    profile.sources["h2d/disk"] = "measured by benchmarks/offload.py in the same run"
    return profile


def capture_decoder(model, max_seq_len: int):
    decoder, layout = kv_cache.wrap_for_generation(model, max_seq_len, 1, "bench")
    inputs = kv_cache.example_inputs(layout)
    graph = capture(
        decoder, inputs, name="llama-8b-shaped", dynamic=kv_cache.dynamic_shapes(layout)
    )
    graph.info["generation"] = layout.to_dict()
    return graph


def quantized(graph, device: str, group_size: int):
    """The graph with its layers' linears quantized to 4 bits (RTN, `group_size` columns)."""
    from peakc.passes.pipeline import Pipeline

    spec = f"quantize{{method=rtn,bits=4,group_size={group_size}}}"
    out, _ = Pipeline.parse(spec).run(graph, PassContext(device=device))
    return out


@dataclasses.dataclass
class Planning:
    """A graph ready to plan: its executor graph and the placement problem at the workload
    (the cost model's per-unit estimates are made once; each row changes only the budgets)."""

    graph: object
    runnable: object
    problem: object
    ctx: PassContext


def planning(graph, args, profile, disk: Path) -> Planning:
    ctx = PassContext(target=profile)
    runnable = executor_graph(graph)
    options = row_options(Row(0.0, 0.0, True), args, disk)
    problem = build_problem(graph, offload_units(runnable), ctx, options)
    return Planning(graph, runnable, problem, ctx)


def row_options(row: Row, args, disk: Path) -> OffloadOptions:
    return OffloadOptions(
        gpu_memory=row.gpu_gb,
        cpu_memory=row.cpu_gb,
        disk_path=str(disk) if row.disk else "",
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        time_limit=args.time_limit,
        reserve=0.0 if args.smoke else OffloadOptions.reserve,
    )


def run_peakc(planned: Planning, row: Row, args, disk: Path, records: list, precision: str):
    """Plan at this budget, run the executor, and record measured against predicted."""
    started = time.perf_counter()
    options = row_options(row, args, disk)
    problem = dataclasses.replace(
        planned.problem,
        gpu_memory=row.gpu_gb * GB,
        cpu_memory=row.cpu_gb * GB,
        disk_memory=planned.problem.disk_memory if row.disk else 0.0,
    )
    profile = planned.ctx.target
    solution: Solution = solve_placement(problem, options.time_limit)
    cost = evaluate(problem, solution.placement)
    peer = accelerate_cost(problem, accelerate_placement(problem))
    plan = plan_record(problem, solution, cost, peer, planned.ctx, options)
    streamed, from_disk = unit_traffic(problem, solution.placement)
    floor_s = max(
        sum(streamed) / profile.h2d_bandwidth_pinned, sum(from_disk) / profile.disk_read_bandwidth
    )
    transfers = SimulatedTransfers(memory=10**13) if args.smoke else CudaTransfers("cuda")
    record = base_record(args, "peakc", precision, row)
    record.update(
        predicted_tok_s=round(plan["predicted"]["decode_tok_s"], 3),
        predicted_prefill_tok_s=round(plan["predicted"]["prefill_tok_s"], 2),
        predicted_accelerate_tok_s=round(peer["decode_tok_s"], 3),
        floor_tok_s=round(1 / floor_s, 3) if floor_s else None,
        streamed_gb_per_token=gb(sum(streamed)),
        solver_seconds=round(solution.seconds, 2),
        solver_gap=solution.gap,
        planned_gpu_gb=gb(plan["predicted"]["gpu_bytes"]),
        planned_activation_gb=gb(plan["activation_bytes"]),
        # already allocated when the row began (cuBLAS workspaces of earlier rows): in
        # peak_gpu_gb, as for accelerate, but not in what the executor checks
        baseline_gpu_gb=gb(getattr(transfers, "baseline", None)),
    )
    executor = None
    try:
        executor = OffloadExecutor(planned.runnable, plan, transfers)
        layout = planned.graph.info["generation"]
        generator = Generator(OffloadStep(executor, layout), layout, transfers.device)
        record.update(measure(generator, args, row))
        record["held_gpu_gb"] = gb(held_bytes(executor))
        if executor.disk is not None:
            record["page_cache"] = round(page_cache_share([executor.disk.path]), 4)
    except PeakcError as exc:  # over budget, say: recorded, not hidden
        record["error"] = str(exc)
    finally:
        if executor is not None:
            record["peak_gpu_gb"] = gb(peak_gpu_bytes(executor))
        record["seconds"] = round(time.perf_counter() - started, 1)
        if executor is not None:
            executor.close()
        del executor
        release()
    records.append(record)
    print(summary(record))


def held_bytes(executor: OffloadExecutor) -> int:
    """What the executor holds on the device: resident weights and caches, both buffers
    (peak_gpu_gb less this is what the activations and libraries took at most)."""
    resident = sum(t.untyped_storage().nbytes() for t in executor.resident.values())
    return resident + sum(slot.numel() for slot in executor.slots)


def peak_gpu_bytes(executor: OffloadExecutor) -> int | None:
    """On CUDA, all the process allocated at most since the row began (its transfers reset the
    peak), as for accelerate; on --smoke, the simulated device's peak."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return executor.transfers.memory_peak()


def timed_steps(args, row: Row, peer: bool = False) -> tuple[int, int]:
    """(warm-up tokens, timed decode steps) of a row: fewer on the disk row, whose steps take
    seconds each when the disk is really read."""
    if row.disk:
        return 1, 2
    return 2, args.accelerate_decode_tokens if peer else args.decode_tokens


def measure(generator: Generator, args, row: Row) -> dict[str, float]:
    """Prefill and decode tokens/s of one prompt (after a warm-up generation)."""
    warm_up, steps = timed_steps(args, row)
    prompt = [list(range(1, args.prompt_len + 1))]
    generator.generate(prompt, SamplingConfig(max_new_tokens=warm_up))
    result = generator.generate(prompt, SamplingConfig(max_new_tokens=steps + 1))
    return {
        "prefill_tok_s": round(args.prompt_len / result.prefill_seconds, 2),
        "decode_tok_s": round(result.decode_steps / result.decode_seconds, 3),
    }


def run_accelerate(checkpoint: Path, row: Row, args, offload_dir: Path, records: list) -> None:
    """transformers.from_pretrained with device_map="auto" and the same max_memory."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    record = base_record(args, "accelerate", "bf16", row)
    device = "cpu" if args.smoke else "cuda"
    max_memory = {"cpu": f"{row.cpu_gb:.6g}GB"}  # the budgets peakc planned for
    if not args.smoke:
        max_memory[0] = f"{row.gpu_gb}GB"
        torch.cuda.reset_peak_memory_stats()
    model = None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint,
            dtype=torch.bfloat16,
            device_map="auto",
            max_memory=max_memory,
            offload_folder=str(offload_dir) if row.disk else None,
        )
        record["device_map"] = dict(
            collections_count(getattr(model, "hf_device_map", {"": device}))
        )
        clock = StepClock(device)
        if row.disk:
            clock.evict_before_each_step(model, files_under(checkpoint, offload_dir))
        ids = torch.arange(1, args.prompt_len + 1, device=device).view(1, -1)
        warm_up, steps = timed_steps(args, row, peer=True)
        clock.generate(model, ids, warm_up)
        prefill, decode = clock.generate(model, ids, steps + 1)
        record["prefill_tok_s"] = round(args.prompt_len / prefill, 2)
        record["decode_tok_s"] = round(steps / decode, 3)
        if row.disk:
            record["page_cache"] = round(clock.cached, 4)
        if device == "cuda":
            record["peak_gpu_gb"] = gb(torch.cuda.max_memory_allocated())
    except Exception as exc:  # noqa: BLE001 - the peer's failure is a result, recorded
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        model = None
        release()
        shutil.rmtree(offload_dir, ignore_errors=True)
        record["seconds"] = round(time.perf_counter() - started, 1)
    records.append(record)
    print(summary(record))


class StepClock:
    """Times each token of a transformers generation (a stopping criterion that never stops
    notes when each token is out), less the time the benchmark's own eviction hook took."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []
        self.hook_seconds = 0.0
        self.cached = 0.0  # the largest cached share of the offload files after an eviction

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter() - self.hook_seconds)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def generate(self, model, ids: torch.Tensor, new: int) -> tuple[float, float]:
        """Seconds to the first token, and from it to the last."""
        from transformers import StoppingCriteriaList

        self.stamps = []
        begin = time.perf_counter() - self.hook_seconds
        with torch.no_grad():
            model.generate(
                ids,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([self]),
            )
        return self.stamps[0] - begin, self.stamps[-1] - self.stamps[0]

    def evict_before_each_step(self, model, files: list[Path]) -> None:
        """Drop `files` from the page cache before every forward (not timed)."""

        def hook(module, args) -> None:
            began = time.perf_counter()
            evict(files)
            self.cached = max(self.cached, page_cache_share(files))
            self.hook_seconds += time.perf_counter() - began

        model.register_forward_pre_hook(hook)


def collections_count(device_map: dict) -> dict[str, int]:
    """Modules per device in accelerate's map ({"0": 12, "cpu": 20, "disk": 3})."""
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def budget(gb: str, weights: int, args, tier: str = "gpu") -> float:
    """A row's budget in GB. --smoke maps GPU budgets of 4, 8, 12 GB to 1.0, 1.1 and 1.2 times
    its tiny model, so it streams but fits (an 8B model's layers are 3 % of it each, the smoke
    model's a third, and each needs two buffers: the 8B's 25-75 % would not fit it), and the
    disk row's CPU budget of 4 GB to half of it (room for two staging buffers and a little
    more), so its disk tier is used."""
    if not args.smoke:
        return float(gb)
    share = 0.9 + float(gb) / 40 if tier == "gpu" else 0.25 + float(gb) / 16
    return round(weights / GB * share, 9)


def base_record(args, runtime: str, precision: str, row: Row) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "runtime": runtime,
        "precision": precision,
        "gpu_memory_gb": row.gpu_gb,
        "cpu_memory_gb": row.cpu_gb if row.disk else None,
        "disk": row.disk,
        "layers": args.layers or (SMOKE if args.smoke else LLAMA_8B)["num_hidden_layers"],
        "prompt_len": args.prompt_len,
        "decode_tok_s": None,
        "prefill_tok_s": None,
        "floor_tok_s": None,
        "predicted_tok_s": None,
        "peak_gpu_gb": None,
    }


def gb(nbytes: float | None) -> float | None:
    """GB to 4 significant digits (--smoke's are kB)."""
    return None if nbytes is None else float(f"{nbytes / GB:.4g}")


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summary(r: dict) -> str:
    where = f"gpu {r['gpu_memory_gb']} GB" + (
        f", cpu {r['cpu_memory_gb']} GB + disk" if r["disk"] else ""
    )
    text = (
        f"{r['runtime']:10s} {r['precision']:4s} {where:28s} decode {r['decode_tok_s']} tok/s, "
        f"prefill {r['prefill_tok_s']} tok/s, peak {r['peak_gpu_gb']} GB"
    )
    if r["runtime"] == "peakc":
        text += (
            f" (planned {r['planned_gpu_gb']}, executor held {r.get('held_gpu_gb')}), "
            f"predicted {r['predicted_tok_s']}, "
            f"floor {r['floor_tok_s']}"
        )
    if "page_cache" in r:
        text += f", page cache {100 * r['page_cache']:.1f} %"
    text += f"  [{r.get('seconds')} s]"
    return text + (f"  ERROR {r['error']}" if "error" in r else "")


def markdown_table(records: list[dict]) -> str:
    """RESULTS.md rows: per precision and budget, peakc against accelerate (never typed by hand)."""
    lines = [
        "| precision | budget | peakc decode tok/s | accelerate decode tok/s | speedup "
        "| floor tok/s | of floor | predicted tok/s | peakc prefill tok/s "
        "| accelerate prefill tok/s | peak GPU GB (peakc / accelerate) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    keys = sorted(
        {(r["precision"], r["gpu_memory_gb"], r["disk"]) for r in records},
        key=lambda k: (k[0], k[2], k[1]),
    )
    for precision, gpu, disk in keys:
        by = {
            r["runtime"]: r
            for r in records
            if (r["precision"], r["gpu_memory_gb"], r["disk"]) == (precision, gpu, disk)
        }
        ours, peer = by.get("peakc", {}), by.get("accelerate", {})
        budget = f"{gpu} GB" + (
            f" + {ours.get('cpu_memory_gb') or peer.get('cpu_memory_gb')} GB CPU + disk"
            if disk
            else ""
        )
        speed = ratio(ours.get("decode_tok_s"), peer.get("decode_tok_s"), "x")
        of_floor = ratio(ours.get("decode_tok_s"), ours.get("floor_tok_s"), "")
        lines.append(
            f"| {precision} | {budget} | {ours.get('decode_tok_s', '-')} | "
            f"{peer.get('decode_tok_s', '-')} | {speed} | {ours.get('floor_tok_s', '-')} | "
            f"{of_floor} | {ours.get('predicted_tok_s', '-')} | {ours.get('prefill_tok_s', '-')} | "
            f"{peer.get('prefill_tok_s', '-')} | {ours.get('peak_gpu_gb', '-')} / "
            f"{peer.get('peak_gpu_gb', '-')} |"
        )
    return "\n".join(lines)


def ratio(a, b, suffix: str) -> str:
    return f"{a / b:.2f}{suffix}" if a and b else "-"


def save(records: list[dict], out: Path) -> None:
    """The records so far (after every row: a run cut short keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=root / "results" / "offload.json")
    parser.add_argument("--table", action="store_true", help="print --out as markdown and exit")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--layers", type=int, default=None, help="8B layers to keep (of 32)")
    parser.add_argument("--budgets", default="4,8,12", help="gpu_memory GB of the CPU rows")
    parser.add_argument("--disk-row", default="4,4", help="gpu,cpu GB of the disk row ('' none)")
    parser.add_argument("--disk", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128, help="the plan's workload")
    parser.add_argument("--decode-tokens", type=int, default=4, help="decode steps timed")
    parser.add_argument("--accelerate-decode-tokens", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=5.0, help="HiGHS seconds per plan")
    parser.add_argument("--int4", action="store_true", help="also peakc rows at 4 bits")
    parser.add_argument("--no-accelerate", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    if args.smoke:
        if args.out == parser.get_default("out"):
            args.out = Path(tempfile.gettempdir()) / "offload_smoke.json"  # not the results
        args.prompt_len, args.gen_len, args.decode_tokens = 8, 8, 3
    shape = SMOKE if args.smoke else LLAMA_8B
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="peakc-offload-bench-", dir=args.disk))
    try:
        bandwidths = measure_bandwidths(args.smoke, work)
        print({k: f"{v / GB:.2f} GB/s" for k, v in bandwidths.items()})
        profile = calibrated_profile(args.smoke, bandwidths)
        model = build_model(shape, args.layers)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        layers = model.config.num_hidden_layers
        print(
            f"model: {layers} layers of {'a tiny' if args.smoke else 'Llama-3-8B'} shape, "
            f"{weights / GB:.2f} GB bf16"
            + (
                f" (scaled down from 32 layers: --layers {layers})"
                if layers != shape["num_hidden_layers"]
                else ""
            )
            + f"  [{time.perf_counter() - started:.0f} s]"
        )
        rows = [Row(budget(g, weights, args), 0.0, False) for g in args.budgets.split(",") if g]
        if args.disk_row:
            g, c = args.disk_row.split(",")
            g, c = budget(g, weights, args), budget(c, weights, args, "cpu")
            rows.append(Row(g, c, True))
        for row in rows:
            row.cpu_gb = row.cpu_gb or round(1.5 * weights / GB, 6)  # CPU rows: room for the rest
        checkpoint = work / "checkpoint"
        if not args.no_accelerate:
            model.save_pretrained(checkpoint, safe_serialization=True)
            print(f"checkpoint saved [{time.perf_counter() - started:.0f} s]")
        graph = capture_decoder(model, args.prompt_len + args.gen_len)
        print(f"captured [{time.perf_counter() - started:.0f} s]")
        records: list[dict] = []
        planned = planning(graph, args, profile, work)
        print(f"planned [{time.perf_counter() - started:.0f} s]")
        if args.disk_row:
            print(
                "disk row: both runtimes read the disk every step (page cache dropped: peakc "
                "after each read, accelerate's offload folder and checkpoint before each forward)"
            )
        for row in rows:
            run_peakc(planned, row, args, work, records, "bf16")
            save(records, args.out)
        if args.int4:
            small = planning(
                quantized(graph, "cpu" if args.smoke else "cuda", 32 if args.smoke else 128),
                args,
                profile,
                work,
            )
            for row in rows:
                run_peakc(small, row, args, work, records, "int4")
                save(records, args.out)
            del small
        del graph, model, planned  # the peer loads its own copy
        release()
        if not args.no_accelerate:
            for row in rows:
                run_accelerate(checkpoint, row, args, work / "accelerate-offload", records)
                save(records, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(records)} records -> {args.out}  [{time.perf_counter() - started:.0f} s]")
    print(markdown_table(records))


if __name__ == "__main__":
    main()
