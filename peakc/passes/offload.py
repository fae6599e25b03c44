"""offload: where each weight and each layer's KV cache lives (GPU, pinned CPU memory, disk),
planned by a mixed-integer program over the cost model, for models larger than the GPU budget.

The graph is cut into units (a layer with its glue nodes, `runtime.offload.offload_units`).
A unit's time is the largest of its compute (for prefill and for one decode step: the cost
model's per-node estimate on the target, or with `compute=measured` each unit timed on the
device as the executor runs it, `runtime.offload.measure_compute`), the host-to-device copy of
what it reads that is not resident (pinned bandwidth), and the disk read of what it reads from
disk: the executor (peakc/runtime/offload.py) prefetches the next unit while the current one
computes, so the three overlap. HiGHS (`scipy.optimize.milp`) picks one tier per weight and per
cache layer to minimise the sum of those unit times per generated token (the prefill and
`gen_len - 1` decode steps), subject to the budgets: GPU memory holds the resident tensors, two
transfer buffers as large as the largest streamed unit (each tensor padded as the executor lays
it out), the activations (`activation_bytes`) and a stated safety margin (`reserve`); pinned CPU
memory the CPU tier and two disk staging buffers; the disk its tier. Weights are placed at
their stored size, so a quantized model's packed `linear_wq` tensors stream at their
compressed size: in the Triton kernels' repacked layout where the kernels take the layer (the
executor runs them on the streamed tensors, and their scratch, not the reference's, is counted
in the activations), else in peakc's (the reference runs; the plan says why, per layer).

The predicted tokens/s are the chosen placement run through the executor's own schedule
(`pipeline_seconds`): what does not overlap is counted, such as the first copy of a step, a
compute waiting for its buffer, and the step's work outside the units (the KV write-back and
sampling, measured with `compute=measured`; a host-tier cache makes the host wait for it).

The report sets the plan beside the placement accelerate's `device_map="auto"` would make
(units whole, in order, onto the GPU until it is full less the largest unit, then CPU, then
disk; each offloaded weight copied from pageable memory when its module runs, no prefetch)
and both predicted tokens/s. The plan goes to `graph.info["offload"]` and the artifact's
manifest; the runtime follows it when the artifact runs on a GPU.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from peakc.errors import PeakcError
from peakc.passes.base import Pass, PassContext, PassResult, register_pass

# The declaration stays light for `peakc passes`: torch, scipy and the cost model load in run().
if TYPE_CHECKING:
    from peakc.ir.graph import Graph
    from peakc.runtime.offload import OffloadUnit

GB = 1e9
ALIGN = 256  # bytes each streamed tensor is padded to in a transfer buffer (runtime.offload.ALIGN)
DISK_ALIGN = 4096  # and each disk-tier tensor in a staging buffer (runtime.offload.DISK_ALIGN)
TIERS = ("gpu", "cpu", "disk")
KV_TIERS = ("gpu", "cpu")  # a layer's cache is written every step: never on disk


@dataclass
class OffloadOptions:
    gpu_memory: float = 0.0  # GB the model may use on the GPU; 0: the target's device memory
    cpu_memory: float = 0.0  # GB of pinned host memory for the CPU tier; 0: the target's host
    disk_path: str = ""  # folder for the disk tier; empty: no disk tier
    batch: int = 1  # workload the plan is made for: sequences per batch
    prompt_len: int = 128  # workload: prompt tokens per sequence
    gen_len: int = 128  # workload: generated tokens per sequence
    time_limit: float = 20.0  # seconds HiGHS may search; the best plan found is kept
    # GB of gpu_memory kept as a safety margin for what no node makes: cuBLAS/cuBLASLt
    # workspaces (32 MiB each per stream on sm90), the caching allocator's 512-byte rounding
    # of every block, the small tensors the Generator holds (ids, positions, sampled tokens)
    reserve: float = 0.1
    # seconds of each unit's compute: the cost model's estimate, or measured on the compute
    # device (CUDA when there is one; each distinct unit timed as the executor runs it, and
    # the step's own work around the units)
    compute: Literal["predicted", "measured"] = "predicted"


@dataclass
class PlacementProblem:
    """Plain numbers the planner needs: units with their compute seconds, tensors with their
    bytes and readers, capacities and bandwidths (bytes/s). No torch, so tests can build it."""

    units: list[str]
    prefill: list[float]  # seconds of each unit's compute for the prefill
    decode: list[float]  # and for one decode step
    weights: dict[str, int]  # bytes of each weight
    readers: dict[str, list[int]]  # units that read each weight
    kv: list[int] = field(default_factory=list)  # bytes of each layer's K and V
    kv_unit: list[int] = field(default_factory=list)  # the unit that reads each layer's cache
    gpu_memory: float = 0.0
    cpu_memory: float = 0.0
    disk_memory: float = 0.0  # 0: no disk tier
    activation_bytes: float = 0.0  # the most the executor's running units hold at once
    reserve_bytes: float = 0.0  # GPU memory kept free as a safety margin
    h2d: float = 25e9  # pinned
    h2d_pageable: float = 10e9
    disk_read: float = 2e9
    decode_steps: int = 0
    batch: int = 1
    prompt_len: int = 1
    # seconds per call outside the units (the runner's setup, the KV write-back, sampling)
    prefill_step: float = 0.0
    decode_step: float = 0.0
    # per linear_wq layer: "triton" (placed at its repacked size, run on the kernels) or why not
    linear_wq: dict[str, str] = field(default_factory=dict)

    def overhead(self) -> float:
        """GPU bytes besides tensors and buffers: activations and the safety margin."""
        return self.activation_bytes + self.reserve_bytes

    def unit_weights(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in self.units]
        for name, units in self.readers.items():
            for u in units:
                out[u].append(name)
        return out


@dataclass
class Placement:
    """A tier per weight and per cache layer."""

    weights: dict[str, str]
    kv: list[str]


@dataclass
class PlanCost:
    """What a placement costs: seconds per phase as the executor schedules it, each unit's
    time (the largest of its compute, copy and disk read: what the program sums), and bytes
    per tier."""

    prefill_seconds: float
    decode_seconds: float  # one decode step, in the steady state of a generation
    unit_prefill: list[float]
    unit_decode: list[float]
    gpu_bytes: float
    cpu_bytes: float
    disk_bytes: float
    buffer_bytes: float  # each of the two transfer buffers
    staging_bytes: float  # each of the two pinned disk staging buffers
    fits: bool

    def objective(self, problem: PlacementProblem) -> float:
        """The program's objective: per generated token, the prefill's and the decode steps'
        sums of unit times."""
        steps = problem.decode_steps
        return (sum(self.unit_prefill) + steps * sum(self.unit_decode)) / (steps + 1)

    def tokens_per_second(self, problem: PlacementProblem) -> dict[str, float]:
        return {
            "decode_tok_s": problem.batch / self.decode_seconds,
            "prefill_tok_s": problem.batch * problem.prompt_len / self.prefill_seconds,
        }


# --- costing a placement ---------------------------------------------------------------------


def evaluate(problem: PlacementProblem, placement: Placement) -> PlanCost:
    """The prefetching executor's predicted times and memory for `placement`: each unit's
    time the largest of its compute, its copy and its disk read; each phase as the executor
    schedules it (`pipeline_seconds`); buffers hold the largest unit, laid out as the
    executor lays it out (each tensor padded to ALIGN bytes, DISK_ALIGN in staging)."""
    streamed, from_disk = unit_traffic(problem, placement)
    laid_out, staged = unit_traffic(problem, placement, pad=True)
    buffer, staging = max(laid_out, default=0), max(staged, default=0)
    host = [s - d for s, d in zip(streamed, from_disk)]
    sync = "cpu" in placement.kv  # writing a host-tier cache back waits for the step
    times, scheduled = {}, {}
    for phase, compute, step, calls in (
        ("prefill", problem.prefill, problem.prefill_step, 1),
        ("decode", problem.decode, problem.decode_step, 3),
    ):
        times[phase] = [
            max(c, s / problem.h2d, d / problem.disk_read)
            for c, s, d in zip(compute, streamed, from_disk)
        ]
        scheduled[phase] = pipeline_seconds(problem, compute, host, from_disk, step, sync, calls)
    gpu, cpu, disk = tier_bytes(problem, placement)
    gpu += 2 * buffer + problem.overhead()
    cpu += 2 * staging
    fits = (
        gpu <= problem.gpu_memory * (1 + 1e-9)
        and cpu <= problem.cpu_memory * (1 + 1e-9)
        and disk <= problem.disk_memory * (1 + 1e-9)
    )
    return PlanCost(
        scheduled["prefill"],
        scheduled["decode"],
        times["prefill"],
        times["decode"],
        gpu,
        cpu,
        disk,
        buffer,
        staging,
        fits,
    )


def unit_traffic(
    problem: PlacementProblem, placement: Placement, pad: bool = False
) -> tuple[list[int], list[int]]:
    """Per unit: bytes copied to the GPU (its non-resident weights and cache), bytes from disk;
    with `pad`, the room they take in the executor's buffers (each tensor padded to ALIGN) and
    staging buffers (to DISK_ALIGN)."""
    size = padded if pad else int
    staged = disk_room if pad else int
    streamed, from_disk = [0] * len(problem.units), [0] * len(problem.units)
    for name, units in problem.readers.items():
        tier = placement.weights[name]
        for u in units:
            if tier != "gpu":
                streamed[u] += size(problem.weights[name])
            if tier == "disk":
                from_disk[u] += staged(problem.weights[name])
    for kv, u, tier in zip(problem.kv, problem.kv_unit, placement.kv):
        if tier != "gpu":
            streamed[u] += 2 * size(kv // 2)  # K and V, two tensors
    return streamed, from_disk


def padded(nbytes: int) -> int:
    """Bytes a tensor takes in a transfer buffer: its own, rounded up to ALIGN."""
    return -(-int(nbytes) // ALIGN) * ALIGN


def disk_room(nbytes: int) -> int:
    """Bytes a disk-tier tensor takes in a staging buffer: rounded up to DISK_ALIGN."""
    return -(-int(nbytes) // DISK_ALIGN) * DISK_ALIGN


def pipeline_seconds(
    problem: PlacementProblem,
    compute: list[float],
    host: list[int],
    disk: list[int],
    step: float,
    sync: bool,
    calls: int,
) -> float:
    """Seconds of the last of `calls` executor calls in a row, scheduled as the executor
    issues them (runtime.offload.OffloadExecutor): the streamed units (those with `host`
    bytes, from pinned memory, or `disk` bytes to move) take turns in two device buffers and
    two staging buffers. A call begins with the disk reads of streamed units 0 and 1 and the
    pinned copy of unit 0; when streamed unit k begins, the host waits for its read and
    copies it from staging, then issues the pinned copy of unit k+1 and the read of unit
    k+2, then unit k's compute, which waits for its copies. A copy into a buffer waits for the
    compute that last read it, a read into a staging buffer for the copy that last read it.
    Copies share one stream, reads one reader and compute one stream. After the units the
    call's own work (`step`) runs on the compute stream; with `sync` the host waits for it."""
    streamed = [u for u in range(len(compute)) if host[u] or disk[u]]
    turn = {u: k for k, u in enumerate(streamed)}
    clock = dict.fromkeys(("copy", "read", "compute", "host"), 0.0)
    slot_free, staging_free = [0.0, 0.0], [0.0, 0.0]
    reads: dict[int, float] = {}
    copies: dict[int, float] = {}

    def issue(kind: str, seconds: float, after: float) -> float:
        clock[kind] = max(clock[kind], clock["host"], after) + seconds
        return clock[kind]

    def read(k: int) -> None:
        if disk[streamed[k]]:
            reads[k] = issue("read", disk[streamed[k]] / problem.disk_read, staging_free[k % 2])

    def host_copy(k: int) -> None:
        nbytes = host[streamed[k]]
        copies[k] = issue("copy", nbytes / problem.h2d, slot_free[k % 2]) if nbytes else 0.0

    ends = [0.0]
    for _ in range(calls):
        for k in range(min(2, len(streamed))):
            read(k)
        if streamed:
            host_copy(0)
        for u, seconds in enumerate(compute):
            k = turn.get(u)
            ready = 0.0
            if k is not None:
                if disk[u]:
                    clock["host"] = max(clock["host"], reads.pop(k))
                    copies[k] = issue("copy", disk[u] / problem.h2d, slot_free[k % 2])
                    staging_free[k % 2] = copies[k]
                if k + 1 < len(streamed):
                    host_copy(k + 1)
                if k + 2 < len(streamed):
                    read(k + 2)
                ready = copies.pop(k)
            clock["compute"] = max(clock["compute"], clock["host"], ready) + seconds
            if k is not None:
                slot_free[k % 2] = clock["compute"]
        clock["compute"] += step
        if sync:
            clock["host"] = max(clock["host"], clock["compute"])
        ends.append(clock["compute"])
    return ends[-1] - ends[-2]


def tier_bytes(problem: PlacementProblem, placement: Placement) -> tuple[float, float, float]:
    """Bytes of weights and caches homed on each tier."""
    total = dict.fromkeys(TIERS, 0.0)
    for name, tier in placement.weights.items():
        total[tier] += problem.weights[name]
    for size, tier in zip(problem.kv, placement.kv):
        total[tier] += size
    return total["gpu"], total["cpu"], total["disk"]


# --- the mixed-integer program ---------------------------------------------------------------


@dataclass
class Solution:
    placement: Placement
    seconds: float  # solver time
    gap: float  # HiGHS' relative MIP gap of the returned plan
    status: str


def solve_placement(
    problem: PlacementProblem, time_limit: float = 20.0, gap: float = 1e-3
) -> Solution:
    """The placement minimising seconds per generated token within the budgets (HiGHS).

    Variables: a binary per weight and tier and per cache layer and tier; the transfer buffer
    and staging sizes; and per unit and phase its time, bounded below by its compute, its copy
    and its disk read (the max, modelled by those three lower bounds). Bytes in GB and seconds
    in ms keep the coefficients near 1."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(problem.weights)
    nw, nl, nu = len(names), len(problem.kv), len(problem.units)
    xw = {(i, t): i * 3 + t for i in range(nw) for t in range(3)}
    yl = {(j, t): 3 * nw + j * 2 + t for j in range(nl) for t in range(2)}
    buf, stage = 3 * nw + 2 * nl, 3 * nw + 2 * nl + 1
    pre = [stage + 1 + u for u in range(nu)]
    dec = [stage + 1 + nu + u for u in range(nu)]
    size = [problem.weights[n] / GB for n in names]
    kv = [b / GB for b in problem.kv]
    ms_per_gb = {"h2d": 1e12 / problem.h2d, "disk": 1e12 / problem.disk_read}
    rows: list[tuple[dict[int, float], float, float]] = []

    for i in range(nw):
        rows.append(({xw[i, t]: 1.0 for t in range(3)}, 1.0, 1.0))
    for j in range(nl):
        rows.append(({yl[j, t]: 1.0 for t in range(2)}, 1.0, 1.0))
    gpu = {xw[i, 0]: size[i] for i in range(nw)} | {yl[j, 0]: kv[j] for j in range(nl)}
    rows.append(({**gpu, buf: 2.0}, -np.inf, (problem.gpu_memory - problem.overhead()) / GB))
    cpu = {xw[i, 1]: size[i] for i in range(nw)} | {yl[j, 1]: kv[j] for j in range(nl)}
    rows.append(({**cpu, stage: 2.0}, -np.inf, problem.cpu_memory / GB))
    rows.append(({xw[i, 2]: size[i] for i in range(nw)}, -np.inf, problem.disk_memory / GB))
    index = {n: i for i, n in enumerate(names)}
    for u, members in enumerate(problem.unit_weights()):
        streamed: dict[int, float] = {}  # bytes moved, for the times
        disk: dict[int, float] = {}
        laid_out: dict[int, float] = {}  # room taken in the buffers, for the memory
        staged: dict[int, float] = {}
        for name in members:
            i = index[name]
            room = padded(problem.weights[name]) / GB
            for tier in (1, 2):
                streamed[xw[i, tier]] = streamed.get(xw[i, tier], 0.0) + size[i]
                laid_out[xw[i, tier]] = laid_out.get(xw[i, tier], 0.0) + room
            disk[xw[i, 2]] = disk.get(xw[i, 2], 0.0) + size[i]
            staged[xw[i, 2]] = staged.get(xw[i, 2], 0.0) + disk_room(problem.weights[name]) / GB
        for j in range(nl):
            if problem.kv_unit[j] == u:
                streamed[yl[j, 1]] = streamed.get(yl[j, 1], 0.0) + kv[j]
                room = 2 * padded(problem.kv[j] // 2) / GB
                laid_out[yl[j, 1]] = laid_out.get(yl[j, 1], 0.0) + room
        rows.append(({**laid_out, buf: -1.0}, -np.inf, 0.0))
        rows.append(({**staged, stage: -1.0}, -np.inf, 0.0))
        for t in (pre[u], dec[u]):
            copy = {k: v * ms_per_gb["h2d"] for k, v in streamed.items()}
            read = {k: v * ms_per_gb["disk"] for k, v in disk.items()}
            rows.append(({**copy, t: -1.0}, -np.inf, 0.0))
            rows.append(({**read, t: -1.0}, -np.inf, 0.0))

    count = stage + 1 + 2 * nu
    matrix = np.zeros((len(rows), count))
    for r, (coefs, _, _) in enumerate(rows):
        for col, value in coefs.items():
            matrix[r, col] = value
    lower = np.zeros(count)
    upper = np.ones(count)
    upper[[buf, stage, *pre, *dec]] = np.inf
    if problem.disk_memory <= 0:
        upper[[xw[i, 2] for i in range(nw)]] = 0.0
    lower[pre] = [c * 1e3 for c in problem.prefill]
    lower[dec] = [c * 1e3 for c in problem.decode]
    objective = np.zeros(count)
    objective[pre] = 1.0
    objective[dec] = float(problem.decode_steps)
    integrality = np.zeros(count)
    integrality[: 3 * nw + 2 * nl] = 1
    started = time.perf_counter()
    result = milp(
        objective,
        constraints=LinearConstraint(matrix, [r[1] for r in rows], [r[2] for r in rows]),
        integrality=integrality,
        bounds=Bounds(lower, upper),
        options={"time_limit": time_limit, "mip_rel_gap": gap},
    )
    seconds = time.perf_counter() - started
    if result.x is None:
        raise PeakcError(explain_infeasible(problem, result.message))
    x = np.round(result.x)
    placement = Placement(
        {n: TIERS[int(np.argmax([x[xw[i, t]] for t in range(3)]))] for i, n in enumerate(names)},
        [KV_TIERS[int(np.argmax([x[yl[j, t]] for t in range(2)]))] for j in range(nl)],
    )
    return Solution(
        placement, seconds, float(getattr(result, "mip_gap", 0.0) or 0.0), result.message
    )


def explain_infeasible(problem: PlacementProblem, message: str) -> str:
    """The one-line reason no placement fits: the unit the GPU cannot double-buffer, or the
    tier capacities that cannot hold everything, else the solver's own message."""
    streamed = Placement(dict.fromkeys(problem.weights, "cpu"), ["cpu"] * len(problem.kv))
    unit_bytes, _ = unit_traffic(problem, streamed, pad=True)
    largest = max(range(len(unit_bytes)), key=unit_bytes.__getitem__)
    need = problem.overhead() + 2 * unit_bytes[largest]
    if problem.gpu_memory < need:
        return (
            f"pass 'offload': gpu_memory {size_text(problem.gpu_memory)} cannot hold block "
            f"'{problem.units[largest]}' ({size_text(unit_bytes[largest])}) twice for the "
            f"prefetch buffers plus {size_text(problem.activation_bytes)} of activations and "
            f"{size_text(problem.reserve_bytes)} of reserve (needs {size_text(need)})"
        )
    total = sum(problem.weights.values()) + sum(problem.kv)
    room = problem.gpu_memory + problem.cpu_memory + problem.disk_memory
    if total > room - problem.overhead():
        disk = "" if problem.disk_memory else "; give disk_path for a disk tier"
        return (
            f"pass 'offload': the weights and KV cache need {size_text(total)}, but gpu_memory, "
            f"cpu_memory and the disk hold {size_text(room)} (less activations and buffers)"
            f"{disk}"
        )
    return f"pass 'offload': no placement fits the budgets ({message})"


def size_text(nbytes: float) -> str:
    """`12.35 GB`, `1.2 MB`, `3.5 kB`: sizes in errors, readable at any scale."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


# --- accelerate's greedy rule ----------------------------------------------------------------


def accelerate_placement(problem: PlacementProblem) -> Placement:
    """accelerate's `infer_auto_device_map`: units whole, in order, onto the GPU while they fit
    in its budget less the largest unit (kept free to run offloaded units), then the CPU, then
    the disk; a tier once left is not returned to. The KV cache stays on the GPU."""
    owner: dict[str, int] = {name: min(units) for name, units in problem.readers.items()}
    own: list[list[str]] = [[] for _ in problem.units]
    for name, u in owner.items():
        own[u].append(name)
    sizes = [sum(problem.weights[n] for n in names) for names in own]
    budgets = [
        problem.gpu_memory - max(sizes, default=0),
        problem.cpu_memory,
        problem.disk_memory if problem.disk_memory > 0 else float("inf"),
    ]
    tier, used = 0, 0.0
    weights: dict[str, str] = {}
    for names, size in zip(own, sizes):
        while tier < 2 and used + size > budgets[tier]:
            tier, used = tier + 1, 0.0
        used += size
        weights.update(dict.fromkeys(names, TIERS[tier]))
    return Placement(weights, ["gpu"] * len(problem.kv))


def accelerate_cost(problem: PlacementProblem, placement: Placement) -> dict[str, float]:
    """Predicted seconds per phase when each unit first fetches its offloaded weights from
    pageable memory (disk ones read first), then computes: nothing overlaps."""
    fetch = [0.0] * len(problem.units)
    for name, units in problem.readers.items():
        tier = placement.weights[name]
        seconds = 0.0
        if tier != "gpu":
            seconds += problem.weights[name] / problem.h2d_pageable
        if tier == "disk":
            seconds += problem.weights[name] / problem.disk_read
        for u in units:
            fetch[u] += seconds
    prefill = sum(c + f for c, f in zip(problem.prefill, fetch))
    decode = sum(c + f for c, f in zip(problem.decode, fetch))
    return {
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "decode_tok_s": problem.batch / decode,
        "prefill_tok_s": problem.batch * problem.prompt_len / prefill,
    }


def brute_force(problem: PlacementProblem) -> tuple[Placement, PlanCost] | None:
    """Every placement tried (tiny problems only: tests check the program against this)."""
    names = list(problem.weights)
    tiers = TIERS if problem.disk_memory > 0 else TIERS[:2]
    best = None
    for weights in itertools.product(tiers, repeat=len(names)):
        for kv in itertools.product(KV_TIERS, repeat=len(problem.kv)):
            placement = Placement(dict(zip(names, weights)), list(kv))
            cost = evaluate(problem, placement)
            if cost.fits and (best is None or cost.objective(problem) < best[1].objective(problem)):
                best = (placement, cost)
    return best


# --- the pass --------------------------------------------------------------------------------


@register_pass
class OffloadPass(Pass):
    """Place weights and KV cache on GPU, pinned CPU memory and disk (MILP over the cost model)."""

    name: ClassVar[str] = "offload"
    Options: ClassVar[type] = OffloadOptions
    parity_tol: ClassVar[float | None] = 0.0  # records a plan; the program is unchanged

    def validate(self) -> None:
        o = self.options
        for option in ("gpu_memory", "cpu_memory", "time_limit", "reserve"):
            if getattr(o, option) < 0:
                raise PeakcError(f"pass 'offload': option '{option}' must be >= 0")
        for option in ("batch", "prompt_len", "gen_len"):
            if getattr(o, option) < 1:
                raise PeakcError(f"pass 'offload': option '{option}' must be at least 1")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from peakc.runtime.offload import executor_graph

        disk_space(self.options.disk_path)  # a bad folder fails before any costing
        problem = build_problem(graph, executor_graph(graph), ctx, self.options)
        solution = solve_placement(problem, self.options.time_limit)
        cost = evaluate(problem, solution.placement)
        greedy = accelerate_placement(problem)
        peer = accelerate_cost(problem, greedy)
        graph.info["offload"] = plan_record(problem, solution, cost, peer, ctx, self.options)
        predicted = cost.tokens_per_second(problem)
        gpu, cpu, disk = tier_bytes(problem, solution.placement)
        stats = {
            "gpu_mb": round(gpu / 1e6, 3),
            "cpu_mb": round(cpu / 1e6, 3),
            "disk_mb": round(disk / 1e6, 3),
            "kv_on_cpu": solution.placement.kv.count("cpu"),
            "linear_wq.triton": list(problem.linear_wq.values()).count("triton"),
            "linear_wq.reference": sum(p != "triton" for p in problem.linear_wq.values()),
            "predicted_decode_tok_s": round(predicted["decode_tok_s"], 2),
            "accelerate_decode_tok_s": round(peer["decode_tok_s"], 2),
        }
        report = {
            "plan": unit_table(problem, solution.placement, cost),
            "predicted": {k: round(v, 3) for k, v in predicted.items()},
            "accelerate": {
                "placement": unit_table(problem, greedy, None),
                **{k: round(v, 6) for k, v in peer.items()},
            },
            "solver": {"seconds": round(solution.seconds, 3), "gap": solution.gap},
            "compute": self.options.compute,
            "linear_wq": problem.linear_wq,
        }
        return PassResult(graph, modified=False, stats=stats, report=report)


def build_problem(
    graph: Graph, runnable: Graph, ctx: PassContext, options: OffloadOptions
) -> PlacementProblem:
    """The placement problem of `graph` on the target, over the units of its executor graph
    `runnable` (`runtime.offload.executor_graph`): per-unit compute at the workload's shapes
    (`options.compute`), tensor bytes as the executor stores them (linear_wq weights the
    Triton kernels take in their repacked layout), the budgets and the profile's bandwidths."""
    from peakc.runtime.offload import LINEAR_KEY, kv_layer, offload_units

    profile = ctx.target
    units = offload_units(runnable)
    compute = unit_compute(graph, runnable, units, ctx, options)
    # the tensors as the executor holds them (linear_wq weights in the kernels' layout)
    weights = {n: int(t.numel() * t.element_size()) for n, t in runnable.weights().items()}
    readers: dict[str, list[int]] = {}
    kv_unit: dict[int, int] = {}
    for u, unit in enumerate(units):
        for name in unit.weights:
            layer = kv_layer(name)
            if layer is None:
                readers.setdefault(name, []).append(u)
            else:
                kv_unit.setdefault(layer, u)
    kv = [kv_layer_bytes(graph, options.batch)] * len(kv_unit)
    generation = "generation" in graph.info
    return PlacementProblem(
        units=[u.name for u in units],
        prefill=compute.prefill,
        decode=compute.decode,
        weights={n: weights[n] for n in readers},
        readers=readers,
        kv=kv,
        kv_unit=[kv_unit[layer] for layer in sorted(kv_unit)],
        gpu_memory=budget(options.gpu_memory, profile, "device", "gpu_memory"),
        cpu_memory=budget(options.cpu_memory, profile, "host", "cpu_memory"),
        disk_memory=disk_space(options.disk_path),
        activation_bytes=compute.activations,
        reserve_bytes=options.reserve * GB,
        h2d=profile.h2d_bandwidth_pinned,
        h2d_pageable=profile.h2d_bandwidth_pageable,
        disk_read=profile.disk_read_bandwidth,
        decode_steps=options.gen_len - 1 if generation else 0,
        batch=options.batch if generation else int(graph.example_inputs[0].shape[0]),
        prompt_len=options.prompt_len if generation else _tokens(graph),
        prefill_step=compute.prefill_step,
        decode_step=compute.decode_step,
        linear_wq=dict(runnable.info.get(LINEAR_KEY, {})),
    )


@dataclass
class UnitCompute:
    """Per unit: compute seconds of the prefill and of one decode step; the most activation
    bytes any unit holds; and seconds per call outside the units (measured only)."""

    prefill: list[float]
    decode: list[float]
    activations: float
    prefill_step: float = 0.0
    decode_step: float = 0.0


def unit_compute(
    graph: Graph,
    runnable: Graph,
    units: list[OffloadUnit],
    ctx: PassContext,
    options: OffloadOptions,
) -> UnitCompute:
    """Per unit: compute seconds of the prefill and of one decode step (at half the
    generation's context), from the cost model or measured on the device; and the most
    activation bytes any unit holds during the prefill (from the cost model's shapes)."""
    generation = graph.info.get("generation")
    if generation is None:
        estimate = ctx.cost.estimate(graph)
        times = unit_times(estimate, units)
        compute = UnitCompute(times, times, activation_bytes(graph, units, kernel_nodes(runnable)))
    else:
        slots = int(graph.example_inputs[2].shape[3])
        if options.prompt_len + options.gen_len > slots:
            raise PeakcError(
                f"pass 'offload': prompt_len {options.prompt_len} + gen_len {options.gen_len} "
                f"exceeds the KV cache of {slots} tokens"
            )
        if options.batch > generation["max_batch"]:
            raise PeakcError(
                f"pass 'offload': batch {options.batch} exceeds the captured limit "
                f"{generation['max_batch']}"
            )
        b, p = options.batch, options.prompt_len
        shaped, prefill = ctx.cost.decoder_estimate(graph, "prefill", b, p, p)
        _, decode = ctx.cost.decoder_estimate(graph, "decode", b, 1, p + options.gen_len // 2)
        compute = UnitCompute(
            unit_times(prefill, units),
            unit_times(decode, units),
            activation_bytes(shaped, units, kernel_nodes(runnable)),
        )
    if options.compute == "measured":
        prefill_times, decode_times = measured_compute(graph, runnable, ctx, options)
        compute.prefill, compute.prefill_step = prefill_times.units, prefill_times.step
        compute.decode, compute.decode_step = decode_times.units, decode_times.step
    return compute


def measured_compute(
    graph: Graph, runnable: Graph, ctx: PassContext, options: OffloadOptions
) -> tuple[Any, Any]:
    """`runtime.offload.ComputeTimes` of the prefill and of a decode step (at half the
    generation's context) on the compute device (as calibrating passes choose it: CUDA when
    there is one); a graph without a KV cache once, at its inputs."""
    import torch

    from peakc.passes.calibration import compute_device
    from peakc.runtime.offload import layer_caches, measure_compute

    device = compute_device(ctx.device)
    generation = graph.info.get("generation")
    if generation is None:
        times = measure_compute(runnable, tuple(graph.example_inputs), device)
        return times, times
    ids, positions = graph.example_inputs[:2]
    b, p = options.batch, options.prompt_len
    caches = layer_caches(generation, b)
    prompt = (
        torch.zeros(b, p, dtype=ids.dtype),
        torch.arange(p, dtype=positions.dtype).expand(b, p).contiguous(),
    )
    step = (
        torch.zeros(b, 1, dtype=ids.dtype),
        torch.full((b, 1), p + options.gen_len // 2, dtype=positions.dtype),
    )
    return (
        measure_compute(runnable, prompt, device, caches),
        measure_compute(runnable, step, device, caches),
    )


def unit_times(estimate: Any, units: list[OffloadUnit]) -> list[float]:
    """Sum of the estimate's node times per unit (nodes matched by name)."""
    unit_of = {n.name: u for u, unit in enumerate(units) for n in unit.block.nodes}
    times = [0.0] * len(units)
    for node in estimate.nodes:
        if node.name in unit_of:
            times[unit_of[node.name]] += node.time
    return times


def kernel_nodes(runnable: Graph) -> set[str]:
    """Names of the linear_wq nodes the executor runs on the Triton kernels (their weights
    repacked by `runtime.offload.repack_linears`)."""
    from peakc.runtime.offload import KERNEL_KEY

    return {n.name for n in runnable.call_nodes() if n.meta.get(KERNEL_KEY)}


def activation_bytes(
    shaped: Graph, units: list[OffloadUnit], kernels: set[str] = frozenset()
) -> float:
    """An upper bound on the activation memory of running `shaped` unit by unit: the block
    interpreter keeps every value a unit makes until the unit ends, and the values that cross
    units until their last reader; so the largest unit's values and the scratch of its
    hungriest op, plus every crossing value. The linear_wq nodes named in `kernels` run the
    Triton kernels: their scratch is the kernels' (`kernel_scratch`), not the reference's."""
    from peakc.cost_model.op_costs import is_view, nbytes, val

    unit_of = {n.name: u for u, unit in enumerate(units) for n in unit.block.nodes}
    made = [0.0] * len(units)
    scratch = [0.0] * len(units)
    crossing = 0.0
    for node in shaped.call_nodes():
        u = unit_of.get(node.name)
        if u is None or is_view(node):
            continue
        value = val(node)
        size = nbytes(value) if hasattr(value, "element_size") else 0.0
        made[u] += size
        own = linear_kernel_scratch(node) if node.name in kernels else hidden_scratch(node)
        scratch[u] = max(scratch[u], own)
        if any(unit_of.get(user.name) != u for user in node.users):
            crossing += size
    return max((m + s for m, s in zip(made, scratch)), default=0.0) + crossing


def linear_kernel_scratch(node: Any) -> float:
    """Bytes the Triton kernels allocate inside a `peakc.linear_wq` node they run
    (`runtime.offload.kernel_scratch`, at the node's rows of x)."""
    from peakc.cost_model.op_costs import val
    from peakc.runtime.offload import kernel_scratch

    x = val(node.args[0])
    if x is None:
        return 0.0
    rows = int(x.numel() // x.shape[-1])
    out_features = int(val(node.args[2]).shape[0])  # scales [N, groups]
    bits, in_features = int(node.args[6]), int(node.args[8])
    return float(kernel_scratch(rows, out_features, in_features, bits, x.element_size()))


def hidden_scratch(node: Any) -> float:
    """Bytes an op allocates and frees inside itself, which no node's value shows, in the
    reference the eager backend runs. `peakc.attention_cache`: both caches scattered with the
    new keys and values, their repeats for grouped-query heads, the causal mask, and one fp32
    score matrix [B, Hq, S, T] (SDPA without a fused kernel). `peakc.linear_wq` [N, K]: the
    codes unpacked to int64 (the shifts promote them), and at the peak the codes, the zero
    points gathered per column and their difference, 3 x 8 bytes per weight. Other ops: none."""
    from peakc.cost_model.op_costs import nbytes, op_name, val

    if op_name(node.target) == "peakc.linear_wq":
        qweight, scales = val(node.args[1]), val(node.args[2])
        if qweight is None or scales is None:
            return 0.0
        rows, columns = int(scales.shape[0]), int(node.args[8])
        words = 4.0 * rows * (int(qweight.shape[1]) + 1)  # the packed bytes widened to int32
        return max(words + 20.0 * rows * columns, 24.0 * rows * columns)
    if op_name(node.target) != "peakc.attention_cache":
        return 0.0
    q, k_cache = val(node.args[0]), val(node.args[3])
    if q is None or k_cache is None:
        return 0.0
    batch, heads, seq, _ = (int(d) for d in q.shape)
    slots = int(k_cache.shape[2])
    groups = heads // int(k_cache.shape[1])
    caches = 2 * nbytes(k_cache) * (1 + (groups if groups > 1 else 0))
    return caches + batch * seq * slots + 4.0 * batch * heads * seq * slots


def kv_layer_bytes(graph: Graph, batch: int) -> int:
    """Bytes of one layer's K and V for `batch` sequences (every slot, as the runtime holds it)."""
    if "generation" not in graph.info:
        return 0
    k_cache = graph.example_inputs[2]
    per_sequence = k_cache[0, 0].numel() * k_cache.element_size()
    return 2 * batch * int(per_sequence)


def budget(gb: float, profile: Any, tier: str, option: str) -> float:
    """The option in bytes, or the target's capacity when 0; above the capacity is an error."""
    capacity = profile.memory_capacity.get(tier, float("inf"))
    if gb == 0:
        return capacity
    if gb * GB > capacity:
        raise PeakcError(
            f"pass 'offload': {option} {gb} GB exceeds target '{profile.name}' {tier} memory "
            f"{capacity / GB:.1f} GB"
        )
    return gb * GB


def disk_space(path: str) -> float:
    """Free bytes under the disk tier's folder (0 without one); a folder that is missing or
    not writable is an error now, not when the artifact first runs."""
    if not path:
        return 0.0
    folder = Path(path)
    if not folder.is_dir():
        raise PeakcError(f"pass 'offload': disk_path {path} is not an existing folder")
    if not os.access(folder, os.W_OK):
        raise PeakcError(f"pass 'offload': disk_path {path} is not writable")
    return float(shutil.disk_usage(folder).free)


def plan_record(
    problem: PlacementProblem,
    solution: Solution,
    cost: PlanCost,
    peer: dict[str, float],
    ctx: PassContext,
    options: OffloadOptions,
) -> dict[str, Any]:
    """The JSON plan the runtime follows (graph.info["offload"], the manifest's "offload")."""
    placement = solution.placement
    return {
        "format": 1,
        "target": ctx.target.name,
        "gpu_memory": problem.gpu_memory,
        "cpu_memory": problem.cpu_memory,
        "disk_path": str(Path(options.disk_path).resolve()) if options.disk_path else "",
        "workload": {
            "batch": problem.batch,
            "prompt_len": problem.prompt_len,
            "gen_len": problem.decode_steps + 1,
        },
        "units": problem.units,
        "weights": {
            n: {"tier": placement.weights[n], "bytes": problem.weights[n]} for n in problem.weights
        },
        "kv_cache": {
            str(layer): {"tier": tier, "bytes": size}
            for layer, (tier, size) in enumerate(zip(placement.kv, problem.kv))
        },
        "buffer_bytes": cost.buffer_bytes,
        "staging_bytes": cost.staging_bytes,
        "activation_bytes": problem.activation_bytes,
        "reserve_bytes": problem.reserve_bytes,
        "compute": options.compute,
        # per linear_wq: "triton" (streamed in the kernels' layout, run on them) or why not
        "linear_wq": dict(problem.linear_wq),
        "step_seconds": {"prefill": problem.prefill_step, "decode": problem.decode_step},
        "predicted": {
            **cost.tokens_per_second(problem),
            "decode_seconds": cost.decode_seconds,
            "prefill_seconds": cost.prefill_seconds,
            "gpu_bytes": cost.gpu_bytes,  # all of it: what the executor holds and the overhead
            "held_bytes": cost.gpu_bytes - problem.overhead(),  # resident, caches, 2 buffers
        },
        "accelerate": peer,
    }


def unit_table(
    problem: PlacementProblem, placement: Placement, cost: PlanCost | None
) -> list[dict[str, Any]]:
    """Per unit: MB of the weights it reads on each tier, its cache's tier, and (for the plan)
    its predicted decode-step milliseconds against its compute."""
    rows = []
    kv_tier = dict(zip(problem.kv_unit, placement.kv))
    for u, (name, members) in enumerate(zip(problem.units, problem.unit_weights())):
        row: dict[str, Any] = {"unit": name}
        for tier in TIERS:
            size = sum(problem.weights[n] for n in members if placement.weights[n] == tier)
            row[f"{tier}_mb"] = round(size / 2**20, 3)
        if u in kv_tier:
            row["kv"] = kv_tier[u]
        if cost is not None:
            row["decode_ms"] = round(cost.unit_decode[u] * 1e3, 4)
            row["compute_ms"] = round(problem.decode[u] * 1e3, 4)
        rows.append(row)
    return rows


def _tokens(graph: Graph) -> int:
    first = graph.example_inputs[0]
    return int(first.shape[1]) if first.dim() > 1 else 1
