"""Offload (issue 20, Speed): an 8B-shaped random bf16 Llama under GPU budgets, peakc's
planned, prefetching executor against transformers + accelerate `device_map="auto"` with the
same `max_memory`, in one run.

Rows: gpu_memory 4, 8 and 12 GB with the rest in pinned CPU memory, and one disk row
(gpu_memory 4 GB, cpu_memory 4 GB, the rest on this machine's disk under --disk). Per row:
prefill and decode tokens/s of both, peakc's predicted tokens/s, the transfer floor (bytes
streamed per decode token over the bandwidths measured at the start of the run) and peak GPU
memory (`torch.cuda.max_memory_allocated` for both runtimes, reset before each row; peakc's
plan counts its weights, caches, two transfer buffers, activations and a 0.1 GB reserve).

Prediction: the plan is made on the h200 profile with this run's host-to-device and disk
bandwidths, and `compute=measured`: each distinct unit (a layer, the embedding, the head) is
timed once on the GPU as the executor runs it, with the step's own work (KV write-back,
sampling); the predicted step is that placement run through the executor's schedule.

The disk row reads the disk, for both runtimes, every step: peakc reads its disk tier with
O_DIRECT where the file system takes it (else buffered reads whose pages it drops), and a
forward pre-hook on accelerate's model drops the pages of every file it reads offloaded
weights from (its offload folder and the checkpoint's safetensors, which it reads
disk-offloaded weights from in place) before each forward. The disk bandwidth is measured
the way peakc's executor reads (`DiskTier.read_into`). Each record's `page_cache` is the
largest share of those files found cached after a step (near 0: the disk was read).

Timing: a warm-up generation through the `Generator` (2 tokens; 1 on the disk row), then a
prefill from an idle device and `--decode-tokens` decode steps (`--disk-decode-tokens` on the
disk row), each step's end marked by a CUDA event (no synchronisation added); decode tokens/s
is one over the median step. accelerate: a warm-up of 2 tokens (none on the disk row), then
`--accelerate-decode-tokens` (1 on the disk row), median step. Every row runs under a time
guard (`--row-timeout`, and `--forward-timeout` per accelerate forward): a row that exceeds
it is recorded with the error, not waited for. Each row prints its estimated seconds first;
with `--time-budget` (default 480 s) a row that would end past it is skipped, with the reason
recorded. The JSON is written after every record.

`--int4` adds peakc rows for the model quantized to 4 bits (round-to-nearest, group 128: the
GPTQ layout, so the bytes streamed and the kernels are GPTQ's; the values do not change the
speed), planned and streamed at their packed size in the Triton kernels' repacked layout, the
linears run on the int4 kernels; each record's `linear_path` says which path ran ("triton", or
"reference" with the layers and reasons in `linear_reference_layers`). accelerate has no int4 row:
it has no 4-bit kernel on this machine (its GPTQ kernels come from packages it lacks); each
int4 record says so.

    python benchmarks/offload.py --disk /tmp --int4   # the full run, about 8 minutes
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
import os
import shutil
import signal
import statistics
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
    tier_bytes,
    unit_traffic,
)
from peakc.runtime.generate import Generator, SamplingConfig
from peakc.runtime.offload import (
    DISK_ALIGN,
    CudaTransfers,
    DiskTier,
    OffloadExecutor,
    OffloadStep,
    SimulatedTransfers,
    disk_aligned,
    executor_graph,
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

    def text(self) -> str:
        return f"gpu {self.gpu_gb} GB" + (f", cpu {self.cpu_gb} GB + disk" if self.disk else "")


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


@dataclasses.dataclass
class Machine:
    """What the run measures at its start, in bytes/s: host-to-device copies from pinned and
    pageable memory, page-locking host memory, and writing and reading a disk tier the way the
    executor does (`DiskTier`: written and dropped from the page cache, read with large reads
    on its threads into pinned staging, O_DIRECT where the file system takes it)."""

    h2d_pinned: float
    h2d_pageable: float
    pin: float
    disk_write: float
    disk_read: float
    disk_reads: str  # "direct" or "buffered"

    def text(self) -> str:
        rates = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, float)}
        return ", ".join(f"{k} {v / GB:.2f} GB/s" for k, v in rates.items()) + (
            f" (disk reads {self.disk_reads})"
        )


def measure_machine(smoke: bool, folder: Path) -> Machine:
    """The bandwidths the planner, the floor and the row estimates use, measured now."""
    size = (16 << 20) if smoke else (1 << 30)
    cuda = torch.cuda.is_available()
    host = torch.randint(0, 255, (size,), dtype=torch.uint8)
    started = time.perf_counter()
    pinned = host.pin_memory() if cuda else host.clone()
    pin = size / (time.perf_counter() - started)
    pinned_rate = size / median_seconds(lambda: copy_to_device(pinned), 5)
    pageable_rate = size / median_seconds(lambda: copy_to_device(host), 5)
    started = time.perf_counter()
    disk = DiskTier(folder, {f"part{i}": part for i, part in enumerate(host.chunk(8))})
    write = size / (time.perf_counter() - started)
    try:
        staging = disk_aligned(sum(disk.room(n) for n in disk.spans), pin=cuda)
        items, at = [], 0
        for name in disk.spans:
            items.append((name, staging[at : at + disk.room(name)]))
            at += disk.room(name)
        seconds = []
        for _ in range(3):
            evict([disk.path])
            started = time.perf_counter()
            disk.read_into(items)
            seconds.append(time.perf_counter() - started)
        reads = disk.reads
    finally:
        disk.close()
    return Machine(pinned_rate, pageable_rate, pin, write, size / statistics.median(seconds), reads)


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


def calibrated_profile(smoke: bool, machine: Machine):
    """The h200 profile (cpu for --smoke) with this run's measured transfer bandwidths."""
    profile = resolve_profile("cpu" if smoke else "h200")
    profile.h2d_bandwidth_pinned = machine.h2d_pinned
    profile.h2d_bandwidth_pageable = machine.h2d_pageable
    profile.disk_read_bandwidth = machine.disk_read
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
    (per-unit compute measured once on the device; each row changes only the budgets)."""

    graph: object
    runnable: object
    problem: object
    ctx: PassContext

    def at(self, row: Row) -> object:
        """The placement problem at `row`'s budgets."""
        return dataclasses.replace(
            self.problem,
            gpu_memory=row.gpu_gb * GB,
            cpu_memory=row.cpu_gb * GB,
            disk_memory=self.problem.disk_memory if row.disk else 0.0,
        )


def planning(graph, args, profile, disk: Path) -> Planning:
    ctx = PassContext(target=profile, device="cpu" if args.smoke else "cuda")
    runnable = executor_graph(graph)
    options = row_options(Row(0.0, 0.0, True), args, disk)
    problem = build_problem(graph, runnable, ctx, options)
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
        compute="measured",
    )


def compute_text(problem) -> str:
    """The measured compute the plans are made from, per step."""
    return (
        f"measured compute: prefill {1e3 * sum(problem.prefill):.1f} ms in units + "
        f"{1e3 * problem.prefill_step:.1f} ms around them, decode step "
        f"{1e3 * sum(problem.decode):.1f} ms + {1e3 * problem.decode_step:.1f} ms "
        f"(largest unit {1e3 * max(problem.decode):.2f} ms)"
    )


class RunClock:
    """Seconds since the run began, against `--time-budget` (0: none)."""

    def __init__(self, budget: float) -> None:
        self.started = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def refusal(self, estimate: float) -> str | None:
        """Why a row estimated at `estimate` seconds is skipped (None: it runs)."""
        if self.budget and self.elapsed() + estimate > self.budget:
            return (
                f"skipped: estimated {estimate:.0f} s from {self.elapsed():.0f} s would pass "
                f"--time-budget {self.budget:.0f} s"
            )
        return None

    def skipped(self, record: dict, estimate: float, records: list) -> bool:
        """Whether the row is skipped for the budget; if so, its record says why and is kept."""
        refusal = self.refusal(estimate)
        if refusal:
            record["skipped"] = refusal
            records.append(record)
            print(summary(record))
        return refusal is not None


def run_peakc(
    planned: Planning,
    row: Row,
    args,
    disk: Path,
    records: list,
    precision: str,
    machine: Machine,
    clock: RunClock,
):
    """Plan at this budget, run the executor, and record measured against predicted."""
    started = time.perf_counter()
    options = row_options(row, args, disk)
    problem = planned.at(row)
    profile = planned.ctx.target
    record = base_record(args, "peakc", precision, row)
    if precision == "int4":
        record.update(INT4_NOTES)
    try:
        solution: Solution = solve_placement(problem, options.time_limit)
    except PeakcError as exc:  # no placement fits: recorded, not hidden
        record.update(error=str(exc), seconds=round(time.perf_counter() - started, 1))
        records.append(record)
        print(summary(record))
        return
    cost = evaluate(problem, solution.placement)
    peer = accelerate_cost(problem, accelerate_placement(problem))
    plan = plan_record(problem, solution, cost, peer, planned.ctx, options)
    streamed, from_disk = unit_traffic(problem, solution.placement)
    floor_s = max(
        sum(streamed) / profile.h2d_bandwidth_pinned, sum(from_disk) / profile.disk_read_bandwidth
    )
    warm_up, tokens = (1, args.disk_decode_tokens) if row.disk else (2, args.decode_tokens)
    estimate = peakc_seconds(problem, solution.placement, cost, machine, warm_up, tokens)
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
        estimated_seconds=round(estimate, 1),
    )
    print(f"peakc {precision} {row.text()}: estimated {estimate:.0f} s")
    if clock.skipped(record, estimate, records):
        return
    transfers = SimulatedTransfers(memory=10**13) if args.smoke else CudaTransfers("cuda")
    # already allocated when the row began (cuBLAS workspaces of earlier rows): in
    # peak_gpu_gb, as for accelerate, but not in what the executor checks
    record["baseline_gpu_gb"] = gb(getattr(transfers, "baseline", None))
    executor = None
    try:
        with TimeGuard(args.row_timeout, "the row"):
            executor = OffloadExecutor(planned.runnable, plan, transfers)
            layout = planned.graph.info["generation"]
            step = OffloadStep(executor, layout)
            prompt = [list(range(1, args.prompt_len + 1))]
            generator = Generator(step, layout, transfers.device)
            generator.generate(prompt, SamplingConfig(max_new_tokens=warm_up))
            prefill, steps = timed_generation(step, args.prompt_len, tokens, transfers.device)
        record.update(
            prefill_tok_s=round(args.prompt_len / prefill, 2),
            decode_tok_s=round(1 / statistics.median(steps), 3),
            decode_ms=[round(1e3 * s, 2) for s in steps],
        )
        record["held_gpu_gb"] = gb(held_bytes(executor))
        if precision == "int4":
            record.update(linear_paths(executor))
        if executor.disk is not None:
            record["disk_reads"] = executor.disk.reads
            record["page_cache"] = round(page_cache_share([executor.disk.path]), 4)
    except (PeakcError, RowTimeout) as exc:  # over budget or too slow: recorded, not hidden
        record["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - out of memory, say: a result, recorded
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if executor is not None:
            record["peak_gpu_gb"] = gb(peak_gpu_bytes(executor))
            executor.close()
        else:
            transfers.close()
        record["seconds"] = round(time.perf_counter() - started, 1)
        del executor
        release()
    records.append(record)
    print(summary(record))


INT4_NOTES = {
    "quantization": "rtn 4-bit, group 128 (GPTQ's packed layout and size)",
    "peer": "no accelerate row: accelerate has no 4-bit kernel on this machine",
}


def linear_paths(executor: OffloadExecutor) -> dict:
    """Which path the int4 linears ran: "triton" when every layer ran the kernels (and they
    were launched), else "reference", with the layers that ran it and why."""
    report = executor.linear_wq_report()
    declined = {layer: why for layer, why in report["layers"].items() if why != "triton"}
    ran = report["kernel_launches"] > 0 and not declined
    return {
        "linear_path": "triton" if ran else "reference",
        "linear_reference_layers": declined,
        "kernel_launches": report["kernel_launches"],
    }


def peakc_seconds(problem, placement, cost, machine: Machine, warm_up: int, tokens: int) -> float:
    """A row's expected seconds: placing its tiers (resident weights copied from pageable
    memory, the CPU tier page-locked, the disk tier written) and its generations at the
    predicted speeds (the warm-up's and the timed one's prefills and decode steps)."""
    gpu, cpu, disk = tier_bytes(problem, placement)
    setup = gpu / machine.h2d_pageable + cpu / machine.pin + disk / machine.disk_write
    steps = (warm_up - 1) + tokens
    return setup + 2 * cost.prefill_seconds + steps * cost.decode_seconds


def timed_generation(
    step: OffloadStep, prompt_len: int, tokens: int, device: torch.device
) -> tuple[float, list[float]]:
    """Seconds of a greedy prefill from an idle device, and of each of `tokens` decode steps
    after it, run as the Generator's fixed-length decode runs them (tokens stay on the
    device); each step's end is marked by a CUDA event, so timing adds no synchronisation."""
    step.begin(1)
    ids = torch.arange(1, prompt_len + 1, device=device).view(1, -1)
    positions = torch.arange(prompt_len, device=device).view(1, -1)
    begin = synchronized(device)
    token = step(ids, positions)[:, -1].argmax(dim=-1)
    marks = [StepMark(device)]
    prefill = synchronized(device) - begin
    position = torch.full((1, 1), prompt_len, device=device)
    for _ in range(tokens):
        token = step(token.view(1, 1), position)[:, -1].argmax(dim=-1)
        position += 1
        marks.append(StepMark(device))
    synchronized(device)
    return prefill, [b.seconds_since(a) for a, b in zip(marks, marks[1:])]


class StepMark:
    """When the work queued so far on the device ends: a CUDA event, or the CPU's clock."""

    def __init__(self, device: torch.device) -> None:
        self.event = None
        self.time = time.perf_counter()
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()

    def seconds_since(self, earlier: StepMark) -> float:
        if self.event is not None:
            return earlier.event.elapsed_time(self.event) / 1e3
        return self.time - earlier.time


def synchronized(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class RowTimeout(Exception):
    """A row ran past its time guard."""


class TimeGuard:
    """SIGALRM guard for the main thread: RowTimeout when the block runs past `seconds`, or,
    between `limit` and `restore`, past that shorter limit (one forward). The alarm is
    handled at the next Python bytecode, so a row stuck in many short calls (a forward's
    modules) stops within one of them."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what

    def __enter__(self) -> TimeGuard:
        self.deadline = time.perf_counter() + self.seconds
        self.previous = signal.signal(signal.SIGALRM, self._expired)
        self.restore()
        return self

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)

    def limit(self, seconds: float, what: str) -> None:
        """Until `restore`: at most `seconds` (and never past the row's deadline)."""
        left = self.deadline - time.perf_counter()
        self.message = f"{what} took more than {min(seconds, left):.3g} s"
        signal.setitimer(signal.ITIMER_REAL, max(min(seconds, left), 1e-3))

    def restore(self) -> None:
        left = self.deadline - time.perf_counter()
        self.message = f"{self.what} took more than {self.seconds:.3g} s"
        signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))

    def _expired(self, signum, frame) -> None:
        raise RowTimeout(self.message)


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


def accelerate_seconds(planned: Planning, row: Row, machine: Machine, args) -> float:
    """An accelerate row's expected seconds: loading the checkpoint (its GPU share copied
    from pageable memory, its disk share written to the offload folder) and its generations
    at the speed the planner predicts for its greedy placement."""
    problem = planned.at(row)
    placement = accelerate_placement(problem)
    peer = accelerate_cost(problem, placement)
    gpu, _, disk = tier_bytes(problem, placement)
    load = gpu / machine.h2d_pageable + disk / machine.disk_write
    warm_up, tokens = (0, 1) if row.disk else (2, args.accelerate_decode_tokens)
    prefills = (2 if warm_up else 1) * peer["prefill_seconds"]
    return load + prefills + (max(warm_up - 1, 0) + tokens) * peer["decode_seconds"]


def run_accelerate(
    checkpoint: Path,
    row: Row,
    args,
    offload_dir: Path,
    records: list,
    estimate: float,
    clock: RunClock,
) -> None:
    """transformers.from_pretrained with device_map="auto" and the same max_memory."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    record = base_record(args, "accelerate", "bf16", row)
    record["estimated_seconds"] = round(estimate, 1)
    print(f"accelerate bf16 {row.text()}: estimated {estimate:.0f} s")
    if clock.skipped(record, estimate, records):
        return
    device = "cpu" if args.smoke else "cuda"
    max_memory = {"cpu": f"{row.cpu_gb:.6g}GB"}  # the budgets peakc planned for
    if not args.smoke:
        max_memory[0] = f"{row.gpu_gb}GB"
        torch.cuda.reset_peak_memory_stats()
    model = None
    try:
        with TimeGuard(args.row_timeout, "the row") as guard:
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
            timer = StepClock(device)
            if row.disk:
                timer.evict_before_each_step(model, files_under(checkpoint, offload_dir))
            model.register_forward_pre_hook(
                lambda *_: guard.limit(args.forward_timeout, "one accelerate forward")
            )
            model.register_forward_hook(lambda *_: guard.restore())
            ids = torch.arange(1, args.prompt_len + 1, device=device).view(1, -1)
            warm_up, tokens = (0, 1) if row.disk else (2, args.accelerate_decode_tokens)
            if warm_up:
                timer.generate(model, ids, warm_up)
            prefill, steps = timer.generate(model, ids, tokens + 1)
        record["prefill_tok_s"] = round(args.prompt_len / prefill, 2)
        record["decode_tok_s"] = round(1 / statistics.median(steps), 3)
        record["decode_ms"] = [round(1e3 * s, 2) for s in steps]
        if row.disk:
            record["page_cache"] = round(timer.cached, 4)
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

    def generate(self, model, ids: torch.Tensor, new: int) -> tuple[float, list[float]]:
        """Seconds to the first token, and of each token after it."""
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
        stamps = self.stamps
        return stamps[0] - begin, [b - a for a, b in zip(stamps, stamps[1:])]

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


def table_rows(args, problem) -> list[Row]:
    """The rows' budgets in GB: --budgets with the rest in CPU memory, and the --disk-row. On
    --smoke, for the tiny model's placement `problem`: GPU budgets of 4, 8, 12 GB become 1.0,
    1.1 and 1.2 times its weights plus its activations, so it streams but fits (an 8B model's
    layers are 3 % of it each, the smoke model's a third, and each needs two buffers; its
    activations, an int4 linear's dequantization above all, are as large as its weights),
    and the disk row's CPU budget of 4 GB half its weights plus two staging buffers (each
    tensor of the largest unit padded to DISK_ALIGN, most of such small tensors), so its disk
    tier is used."""
    weights = sum(problem.weights.values())
    staging = 2 * DISK_ALIGN * max(len(names) for names in problem.unit_weights())

    def scaled(gb: str, tier: str) -> float:
        if not args.smoke:
            return float(gb)
        if tier == "gpu":
            return round((weights * (0.9 + float(gb) / 40) + problem.activation_bytes) / GB, 9)
        return round((weights * (0.25 + float(gb) / 16) + staging) / GB, 9)

    rest = round(1.5 * weights / GB, 6)  # CPU rows: room for all that is not on the GPU
    rows = [Row(scaled(g, "gpu"), rest, False) for g in args.budgets.split(",") if g]
    if args.disk_row:
        g, c = args.disk_row.split(",")
        rows.append(Row(scaled(g, "gpu"), scaled(c, "cpu"), True))
    return rows


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
    if "linear_path" in r:
        text += f", linears {r['linear_path']}"
    if r["runtime"] == "peakc":
        text += (
            f" (planned {r.get('planned_gpu_gb')}, executor held {r.get('held_gpu_gb')}), "
            f"predicted {r['predicted_tok_s']}, "
            f"floor {r['floor_tok_s']}"
        )
    if "page_cache" in r:
        text += f", page cache {100 * r['page_cache']:.1f} %"
    text += f"  [{r.get('seconds')} s]"
    if "skipped" in r:
        text += f"  {r['skipped']}"
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


def int4_rows(graph, args, profile, work: Path, rows, records, machine, clock) -> None:
    """peakc's rows for the model quantized to 4 bits (quantized and measured first; a
    failure there is recorded on each row)."""
    began = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    try:
        small = planning(quantized(graph, device, 32 if args.smoke else 128), args, profile, work)
    except Exception as exc:  # noqa: BLE001 - out of memory, say: a result, recorded
        error = f"quantizing or measuring: {type(exc).__name__}: {exc}"[:300]
        for row in rows:
            record = {**base_record(args, "peakc", "int4", row), **INT4_NOTES, "error": error}
            records.append(record)
            print(summary(record))
        save(records, args.out)
        return
    print(
        f"quantized to int4 and measured in {time.perf_counter() - began:.0f} s; "
        f"{compute_text(small.problem)}"
    )
    for row in table_rows(args, small.problem):
        run_peakc(small, row, args, work, records, "int4", machine, clock)
        save(records, args.out)
    del small
    release()


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
    parser.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed")
    parser.add_argument("--disk-decode-tokens", type=int, default=3, help="on the disk row")
    parser.add_argument("--accelerate-decode-tokens", type=int, default=4, help="1 on disk")
    parser.add_argument("--time-limit", type=float, default=5.0, help="HiGHS seconds per plan")
    parser.add_argument("--int4", action="store_true", help="also peakc rows at 4 bits")
    parser.add_argument("--no-accelerate", action="store_true")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds; 0: none")
    parser.add_argument("--row-timeout", type=float, default=240.0, help="seconds per row")
    parser.add_argument("--forward-timeout", type=float, default=120.0, help="per accelerate")
    args = parser.parse_args()
    longest = max(args.decode_tokens, args.disk_decode_tokens, args.accelerate_decode_tokens)
    if longest >= args.gen_len:
        parser.error(f"{longest} decode tokens do not fit the cache: raise --gen-len above it")
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    if args.smoke:
        if args.out == parser.get_default("out"):
            args.out = Path(tempfile.gettempdir()) / "offload_smoke.json"  # not the results
        args.prompt_len, args.gen_len, args.decode_tokens = 8, 8, 3
    shape = SMOKE if args.smoke else LLAMA_8B
    clock = RunClock(args.time_budget)
    records: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="peakc-offload-bench-", dir=args.disk))
    try:
        machine = measure_machine(args.smoke, work)
        print(machine.text())
        profile = calibrated_profile(args.smoke, machine)
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
            + f"  [{clock.elapsed():.0f} s]"
        )
        checkpoint = work / "checkpoint"
        if not args.no_accelerate:
            model.save_pretrained(checkpoint, safe_serialization=True)
            print(f"checkpoint saved [{clock.elapsed():.0f} s]")
        graph = capture_decoder(model, args.prompt_len + args.gen_len)
        del model  # the graph holds the weights; the peer loads its own copy
        print(f"captured [{clock.elapsed():.0f} s]")
        planned = planning(graph, args, profile, work)
        print(f"{compute_text(planned.problem)}  [{clock.elapsed():.0f} s]")
        rows = table_rows(args, planned.problem)
        if args.disk_row:
            print(
                "disk row: both runtimes read the disk every step (peakc: O_DIRECT or pages "
                "dropped once read; accelerate: its files evicted before each forward)"
            )

        def peer(selected: list[Row]) -> None:
            for row in selected if not args.no_accelerate else []:
                estimate = accelerate_seconds(planned, row, machine, args)
                offload_dir = work / "accelerate-offload"
                run_accelerate(checkpoint, row, args, offload_dir, records, estimate, clock)
                save(records, args.out)

        for row in rows:
            run_peakc(planned, row, args, work, records, "bf16", machine, clock)
            save(records, args.out)
        peer([r for r in rows if not r.disk])
        if args.int4:
            int4_rows(graph, args, profile, work, rows, records, machine, clock)
        peer([r for r in rows if r.disk])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(records)} records -> {args.out}  [{clock.elapsed():.0f} s]")
    print(markdown_table(records))


if __name__ == "__main__":
    main()
