"""partition: cut the graph into pipeline stages from the cost model, before any GPU is touched.

The graph's cut units (prologue, each layer, epilogue: `peakc.ir.stages`) and the tensors
crossing between them form a networkx DAG; the bytes live across each cut come from its edges.
A dynamic program over the units picks the cut that minimizes the slowest stage (throughput)
or the fill-drain time of one batch of microbatches (latency), where a stage costs its units'
predicted time plus sending what crosses its outgoing cut over the target's interconnect,
subject to each device's memory: weights, the KV cache of its layers, and the activations of
the microbatches in flight under the schedule. The pass records the plan in
`graph.info["partition"]` (JSON); the backend writes one program and one weights file per
stage from it, and `peakc launch` runs them on torch.distributed.pipelining.

Memory per stage = weights + KV cache of its layers (at the capture's max batch and length) +
the working set of one microbatch (the largest unit's peak activations) + the inputs of the
microbatches in flight: all of them under gpipe, `stages - s` under 1f1b and interleaved.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from peakc.errors import PeakcError
from peakc.passes.base import Pass, PassContext, PassResult, register_pass

if TYPE_CHECKING:
    import networkx as nx

    from peakc.ir.graph import Graph
    from peakc.ir.stages import StageUnit

GiB = 2**30
SCHEDULES = ("gpipe", "1f1b", "interleaved")
CHUNKS_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved": 2}  # model chunks each process holds


@dataclass
class PartitionOptions:
    stages: Literal["auto"] | int = "auto"  # processes (devices); auto: fewest that fit memory
    objective: Literal["throughput", "latency"] = "throughput"  # slowest stage | fill-drain
    microbatches: int = 4  # a batch's microbatches; the captured batch is one microbatch
    schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"  # interleaved: 2 chunks a rank
    memory_limit: Literal["auto"] | float = "auto"  # GiB per device; auto: the target's memory
    link: Literal["auto", "nvlink", "pcie", "network"] = "auto"  # auto: fastest in the profile
    balance: Literal["predicted", "measured"] = "predicted"  # measured: time blocks on device


@dataclass
class CostTable:
    """What the solver needs per unit (index i) and per cut (index k: before unit k)."""

    names: list[str]
    seconds: list[float]  # predicted (or measured) seconds of one microbatch
    weights: list[float]  # bytes
    kv_cache: list[float]  # bytes
    working: list[float]  # peak activation bytes of one microbatch inside the unit
    cut_bytes: list[float]  # bytes crossing cut k (k = 0: the graph's inputs)
    link_bandwidth: float  # bytes/s between two stages

    def __len__(self) -> int:
        return len(self.names)

    def transfer(self, cut: int) -> float:
        """Seconds to send what crosses cut `cut` (none after the last unit)."""
        return self.cut_bytes[cut] / self.link_bandwidth if 0 < cut < len(self) else 0.0

    def stage_seconds(self, lo: int, hi: int) -> float:
        """Units lo..hi-1 plus sending their outputs to the next stage."""
        return sum(self.seconds[lo:hi]) + self.transfer(hi)

    def stage_bytes(self, lo: int, hi: int, in_flight: int) -> float:
        return (
            sum(self.weights[lo:hi])
            + sum(self.kv_cache[lo:hi])
            + max(self.working[lo:hi])
            + in_flight * self.cut_bytes[lo]
        )

    def unit_bytes(self, i: int) -> float:
        return self.weights[i] + self.kv_cache[i] + self.working[i] + self.cut_bytes[i]


@dataclass
class Plan:
    """A cut: stage s holds units boundaries[s]..boundaries[s+1]-1."""

    boundaries: list[int]
    seconds: list[float]
    memory: list[float]

    @property
    def bottleneck(self) -> float:
        return max(self.seconds)

    @property
    def imbalance(self) -> float:
        """Slowest stage over the mean stage: 1.0 is perfect balance."""
        mean = sum(self.seconds) / len(self.seconds)
        return self.bottleneck / mean if mean > 0 else 1.0


def in_flight(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Microbatches whose stage inputs a stage holds at once under the schedule."""
    if schedule == "gpipe":
        return microbatches
    return max(1, min(stages - stage, microbatches))


def bubble_fraction(schedule: str, ranks: int, microbatches: int) -> float:
    """Idle share of a fill-drain pipeline: (p - 1) / (v * m + p - 1), v chunks per rank."""
    chunks = CHUNKS_PER_RANK[schedule]
    return (ranks - 1) / (chunks * microbatches + ranks - 1)


def plan_for(
    table: CostTable, boundaries: list[int], schedule: str, microbatches: int, limit: float
) -> Plan:
    stages = len(boundaries) - 1
    spans = list(zip(boundaries, boundaries[1:]))
    return Plan(
        boundaries=list(boundaries),
        seconds=[table.stage_seconds(lo, hi) for lo, hi in spans],
        memory=[
            table.stage_bytes(lo, hi, in_flight(schedule, s, stages, microbatches))
            for s, (lo, hi) in enumerate(spans)
        ],
    )


def objective_value(plan: Plan, objective: str, microbatches: int) -> float:
    """throughput: the slowest stage; latency: one batch's fill-drain time,
    sum of stage times + (microbatches - 1) * the slowest stage."""
    if objective == "throughput":
        return plan.bottleneck
    return sum(plan.seconds) + (microbatches - 1) * plan.bottleneck


def solve_partition(
    table: CostTable,
    stages: int,
    objective: str = "throughput",
    microbatches: int = 1,
    schedule: str = "1f1b",
    limit: float = math.inf,
) -> Plan:
    """The optimal cut into `stages` contiguous stages by dynamic programming.

    For a bound B on every stage's time, `_min_sum_cut` finds the feasible cut (memory within
    `limit`) with the least total time; the objective is then minimized over the O(n²)
    candidate bounds (every stage's possible time): by bisection for throughput (ties broken
    by total time), by a scan with an early stop for latency.
    """
    n = len(table)
    if stages > n:
        raise PeakcError(
            f"partition: stages={stages} but the graph has only {n} blocks to place "
            f"({', '.join(table.names)})"
        )
    check_units_fit(table, limit)
    bounds = sorted({table.stage_seconds(lo, hi) for lo in range(n) for hi in range(lo + 1, n + 1)})
    if _min_sum_cut(table, stages, math.inf, schedule, microbatches, limit) is None:
        raise no_fit_error(table, limit, f"no cut into {stages} stages fits")
    if objective == "throughput":
        lo, hi = 0, len(bounds) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if _min_sum_cut(table, stages, bounds[mid], schedule, microbatches, limit):
                hi = mid
            else:
                lo = mid + 1
        cut = _min_sum_cut(table, stages, bounds[lo], schedule, microbatches, limit)
        return plan_for(table, cut, schedule, microbatches, limit)
    best: Plan | None = None
    floor = sum(table.seconds)
    for bound in bounds:
        if best is not None and floor + (microbatches - 1) * bound >= objective_value(
            best, objective, microbatches
        ):
            break
        cut = _min_sum_cut(table, stages, bound, schedule, microbatches, limit)
        if cut is None:
            continue
        plan = plan_for(table, cut, schedule, microbatches, limit)
        if best is None or objective_value(plan, objective, microbatches) < objective_value(
            best, objective, microbatches
        ):
            best = plan
    return best


def _min_sum_cut(
    table: CostTable, stages: int, bound: float, schedule: str, microbatches: int, limit: float
) -> list[int] | None:
    """Boundaries of the cut with the least total stage time among those whose every stage
    takes <= bound and fits `limit`; None when there is none. best[s][b]: s stages over
    units 0..b-1."""
    n = len(table)
    eps = 1e-12 * max(1.0, bound if math.isfinite(bound) else 1.0)
    best: list[list[tuple[float, int] | None]] = [[None] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, -1)
    for s in range(1, stages + 1):
        flight = in_flight(schedule, s - 1, stages, microbatches)
        for hi in range(s, n - (stages - s) + 1):
            for lo in range(s - 1, hi):
                prev = best[s - 1][lo]
                if prev is None:
                    continue
                seconds = table.stage_seconds(lo, hi)
                if seconds > bound + eps or table.stage_bytes(lo, hi, flight) > limit:
                    continue
                total = prev[0] + seconds
                if best[s][hi] is None or total < best[s][hi][0]:
                    best[s][hi] = (total, lo)
    if best[stages][n] is None:
        return None
    cut, at = [n], n
    for s in range(stages, 0, -1):
        at = best[s][at][1]
        cut.append(at)
    return cut[::-1]


def brute_force_partition(
    table: CostTable,
    stages: int,
    objective: str,
    microbatches: int,
    schedule: str,
    limit: float,
) -> Plan | None:
    """Every cut tried (small tables only): the reference the dynamic program is tested on."""
    best = None
    for inner in itertools.combinations(range(1, len(table)), stages - 1):
        plan = plan_for(table, [0, *inner, len(table)], schedule, microbatches, limit)
        if max(plan.memory) > limit:
            continue
        if best is None or objective_value(plan, objective, microbatches) < objective_value(
            best, objective, microbatches
        ):
            best = plan
    return best


def check_units_fit(table: CostTable, limit: float) -> None:
    """Each unit must fit a device by itself, or no cut can."""
    largest = max(range(len(table)), key=table.unit_bytes)
    if table.unit_bytes(largest) > limit:
        raise no_fit_error(table, limit, f"block '{table.names[largest]}' alone does not fit")


def no_fit_error(table: CostTable, limit: float, what: str) -> PeakcError:
    largest = max(range(len(table)), key=table.unit_bytes)
    return PeakcError(
        f"partition: {what} the memory limit of {limit / GiB:.3g} GiB per device "
        f"(largest block '{table.names[largest]}' needs {table.unit_bytes(largest) / GiB:.3g} "
        "GiB with its inputs); raise memory_limit or use more stages"
    )


def fewest_stages(table: CostTable, schedule: str, microbatches: int, limit: float) -> int:
    """stages=auto: the fewest processes whose stages (chunks) all fit the limit."""
    check_units_fit(table, limit)
    chunks = CHUNKS_PER_RANK[schedule]
    for ranks in range(1, len(table) // chunks + 1):
        if _min_sum_cut(table, ranks * chunks, math.inf, schedule, microbatches, limit):
            return ranks
    raise no_fit_error(table, limit, f"no cut into at most {len(table)} stages fits")


def equal_blocks_cut(table: CostTable, stages: int) -> list[int]:
    """The hand-written baseline: layers split evenly, the prologue on the first stage and the
    epilogue on the last."""
    n = len(table)
    first = 1 if table.names[0] == "prologue" and n > stages else 0
    last = n - 1 if table.names[-1] == "epilogue" and n - first > stages else n
    layers = last - first
    inner = [first + round(s * layers / stages) for s in range(1, stages)]
    return _strictly_increasing([0, *inner, n])


def equal_params_cut(table: CostTable, stages: int) -> list[int]:
    """The other baseline: each stage about 1/stages of the weights (cumulative split)."""
    total = sum(table.weights) or 1.0
    running, inner = 0.0, []
    for i, w in enumerate(table.weights[:-1]):
        running += w
        while len(inner) < stages - 1 and running >= total * (len(inner) + 1) / stages:
            inner.append(i + 1)
    while len(inner) < stages - 1:
        inner.append(len(table) - 1)
    return _strictly_increasing([0, *inner, len(table)])


def _strictly_increasing(cut: list[int]) -> list[int]:
    """Nudge boundaries apart so every stage holds at least one unit."""
    n, stages = cut[-1], len(cut) - 1
    out = [0]
    for s in range(1, stages):
        out.append(min(max(cut[s], out[-1] + 1), n - (stages - s)))
    return [*out, n]


@register_pass
class PartitionPass(Pass):
    """Cut the model into pipeline stages by the cost model (one program per stage)."""

    name: ClassVar[str] = "partition"
    Options: ClassVar[type] = PartitionOptions

    def validate(self) -> None:
        o = self.options
        if o.stages != "auto" and o.stages < 1:
            raise PeakcError(f"pass 'partition': option 'stages' must be >= 1, got {o.stages}")
        if o.microbatches < 1:
            raise PeakcError(
                f"pass 'partition': option 'microbatches' must be >= 1, got {o.microbatches}"
            )
        if o.memory_limit != "auto" and not o.memory_limit > 0:
            raise PeakcError(
                f"pass 'partition': option 'memory_limit' must be > 0 GiB, got {o.memory_limit}"
            )
        if o.schedule == "interleaved" and o.stages != "auto" and o.microbatches % o.stages != 0:
            raise PeakcError(
                "pass 'partition': schedule=interleaved needs microbatches a multiple of "
                f"stages ({o.microbatches} microbatches, {o.stages} stages)"
            )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        table, units = cost_table(graph, ctx, self.link_bandwidth(ctx))
        limit = self.memory_limit(ctx)
        ranks = (
            fewest_stages(table, o.schedule, o.microbatches, limit)
            if o.stages == "auto"
            else o.stages
        )
        chunks = ranks * CHUNKS_PER_RANK[o.schedule]
        predicted = solve_partition(table, chunks, o.objective, o.microbatches, o.schedule, limit)
        report: dict[str, Any] = {"predicted": stage_rows(predicted, table)}
        chosen = predicted
        if o.balance == "measured":
            measured_table = measured_costs(graph, units, table, ctx.device)
            chosen = solve_partition(
                measured_table, chunks, o.objective, o.microbatches, o.schedule, limit
            )
            report["measured"] = stage_rows(chosen, measured_table)
            report["predicted_cut_measured"] = stage_rows(
                plan_for(measured_table, predicted.boundaries, o.schedule, o.microbatches, limit),
                measured_table,
            )
        report["baselines"] = {
            name: stage_rows(
                plan_for(table, cut(table, chunks), o.schedule, o.microbatches, limit), table
            )
            for name, cut in (
                ("equal-blocks", equal_blocks_cut),
                ("equal-params", equal_params_cut),
            )
        }
        graph.info["partition"] = {
            "world_size": ranks,
            "schedule": o.schedule,
            "microbatches": o.microbatches,
            "boundaries": chosen.boundaries,
            "units": [u.name for u in units],
            "balance": o.balance,
        }
        bubble = bubble_fraction(o.schedule, ranks, o.microbatches)
        stats: dict[str, float | int | str] = {
            "stages": chunks,
            "world_size": ranks,
            "stage_ms": ", ".join(f"{t * 1e3:.4g}" for t in chosen.seconds),
            "stage_gib": ", ".join(f"{b / GiB:.4g}" for b in chosen.memory),
            "bottleneck_ms": round(chosen.bottleneck * 1e3, 4),
            "imbalance": round(chosen.imbalance, 4),
            "bubble_fraction": round(bubble, 4),
            "equal_blocks_imbalance": report["baselines"]["equal-blocks"]["imbalance"],
            "equal_params_imbalance": report["baselines"]["equal-params"]["imbalance"],
        }
        report["bubble_fraction"] = bubble
        report["memory_limit_gib"] = limit / GiB
        report["link_gb_s"] = table.link_bandwidth / 1e9
        return PassResult(graph, modified=False, stats=stats, report=report)

    def memory_limit(self, ctx: PassContext) -> float:
        if self.options.memory_limit != "auto":
            return float(self.options.memory_limit) * GiB
        return ctx.target.memory_capacity.get("device", math.inf)

    def link_bandwidth(self, ctx: PassContext) -> float:
        """Bytes/s between stages: the chosen link, or (auto) the fastest the profile lists;
        a profile without interconnect figures falls back to its host-device bandwidth."""
        links = ctx.target.interconnect_bandwidth
        if self.options.link == "auto":
            return max(links.values(), default=ctx.target.h2d_bandwidth_pinned)
        if self.options.link not in links:
            raise PeakcError(
                f"pass 'partition': target '{ctx.target.name}' has no '{self.options.link}' "
                f"bandwidth (it lists: {', '.join(links) or 'none'})"
            )
        return links[self.options.link]


def stage_rows(plan: Plan, table: CostTable) -> dict[str, Any]:
    """A plan as the report shows it: per stage its units, time, memory and send size."""
    spans = list(zip(plan.boundaries, plan.boundaries[1:]))
    return {
        "boundaries": plan.boundaries,
        "imbalance": round(plan.imbalance, 4),
        "stages": [
            {
                "stage": s,
                "units": [table.names[lo], table.names[hi - 1]],
                "predicted_ms": round(plan.seconds[s] * 1e3, 4),
                "memory_gib": round(plan.memory[s] / GiB, 4),
                "send_mb": round((table.cut_bytes[hi] if hi < len(table) else 0.0) / 2**20, 4),
            }
            for s, (lo, hi) in enumerate(spans)
        ],
    }


def block_dag(graph: Graph, units: list[StageUnit]) -> nx.DiGraph:
    """Units as nodes (plus `inputs`), an edge u -> v per unit pair with the values v reads
    from u; a value read by several later units is one tensor, counted once per cut."""
    import networkx as nx

    from peakc.ir.stages import CACHE_INPUTS, cache_layers

    caches = cache_layers(graph)
    skipped = set(caches.stacking) if caches else set()
    if caches:  # each stage keeps its layers' cache: it never crosses a cut
        skipped |= {graph.input_nodes()[i] for i in CACHE_INPUTS}
    unit_of = {n: i for i, u in enumerate(units) for n in u.nodes}
    dag = nx.DiGraph()
    dag.add_node("inputs", index=-1)
    for i, unit in enumerate(units):
        dag.add_node(unit.name, index=i)
    dag.add_node("outputs", index=len(units))
    names = ["inputs", *(u.name for u in units), "outputs"]
    for node in graph.graph.nodes:
        if node.op == "get_attr" or node in skipped:
            continue
        src = -1 if node.op == "placeholder" else unit_of.get(node)
        if src is None:
            continue
        for user in node.users:
            if user in skipped:
                continue
            dst = len(units) if user.op == "output" else unit_of[user]
            if dst == src:
                continue
            a, b = names[src + 1], names[dst + 1]
            if not dag.has_edge(a, b):
                dag.add_edge(a, b, values={})
            dag.edges[a, b]["values"][node.name] = _value_bytes(node)
    return dag


def cut_bytes(dag: nx.DiGraph, count: int) -> list[float]:
    """Bytes crossing each cut k (before unit k; k = 0: the graph's inputs): the distinct
    values on edges from units < k to units >= k."""
    index = dag.nodes(data="index")
    out = []
    for k in range(count):
        crossing: dict[str, float] = {}
        for a, b, values in dag.edges(data="values"):
            if index[a] < k <= index[b]:
                crossing.update(values)
        out.append(float(sum(crossing.values())))
    return out


def cost_table(
    graph: Graph, ctx: PassContext, link_bandwidth: float
) -> tuple[CostTable, list[StageUnit]]:
    """Per unit its predicted time, weights, cache and working set; per cut its bytes."""
    from peakc.ir.stages import stage_units

    shaped = _concrete(graph)
    units = stage_units(shaped)
    estimate = ctx.cost.estimate(shaped)
    node_seconds = {n.name: n.time for n in estimate.nodes}
    dag = block_dag(shaped, units)
    cache_per_layer = _cache_bytes_per_layer(graph)
    table = CostTable(
        names=[u.name for u in units],
        seconds=[sum(node_seconds.get(n.name, 0.0) for n in u.nodes) for u in units],
        weights=[_unit_weight_bytes(shaped, u) for u in units],
        kv_cache=[cache_per_layer * _layers_in(shaped, u) for u in units],
        working=[_unit_peak_activations(u) for u in units],
        cut_bytes=cut_bytes(dag, len(units)),
        link_bandwidth=link_bandwidth,
    )
    return table, stage_units(graph)


def _concrete(graph: Graph) -> Graph:
    """The graph with concrete recorded shapes (a dynamic decoder at its example shape)."""
    if not graph.info.get("dynamic"):
        return graph
    from peakc.cost_model.predict import concrete

    return concrete(graph, [(tuple(t.shape), t.dtype, t.device) for t in graph.example_inputs])


def _value_bytes(node: Any) -> float:
    from peakc.cost_model.op_costs import nbytes, val

    value = val(node)
    return nbytes(value) if hasattr(value, "element_size") else 0.0


def _unit_weight_bytes(graph: Graph, unit: StageUnit) -> float:
    """Bytes of the distinct weights the unit's nodes read (a tied weight counts in each)."""
    from peakc.cost_model.op_costs import nbytes, val

    read = {
        arg.target: nbytes(val(arg))
        for node in unit.nodes
        for arg in node.all_input_nodes
        if arg.op == "get_attr"
    }
    return float(sum(read.values()))


def _unit_peak_activations(unit: StageUnit) -> float:
    """Most bytes of the unit's own intermediates alive at once (views share storage; a value
    read outside the unit lives to the unit's end)."""
    from peakc.cost_model.op_costs import is_view

    inside = [n for n in unit.nodes if n.op == "call_function"]
    position = {n: i for i, n in enumerate(inside)}
    last = {}
    for node in inside:
        if is_view(node):
            continue
        uses = [position.get(u, len(inside)) for u in node.users]
        last[node] = max(uses, default=position[node])
    live = peak = 0.0
    frees: dict[int, float] = {}
    for i, node in enumerate(inside):
        if node in last:
            size = _value_bytes(node)
            live += size
            peak = max(peak, live)
            frees[last[node]] = frees.get(last[node], 0.0) + size
        live -= frees.pop(i, 0.0)
    return peak


def _cache_bytes_per_layer(graph: Graph) -> float:
    """K and V of one layer at the capture's max batch and length (what a stage allocates)."""
    layout = graph.info.get("generation")
    if not layout:
        return 0.0
    k_cache = graph.example_inputs[2]
    per_sequence = k_cache[0, 0].numel() * k_cache.element_size()
    return 2.0 * per_sequence * layout["max_batch"]


def _layers_in(graph: Graph, unit: StageUnit) -> int:
    from peakc.ir.stages import cache_layers

    caches = cache_layers(graph)
    return len(caches.layers_of(set(unit.nodes))) if caches else 0


def measured_costs(
    graph: Graph, units: list[StageUnit], table: CostTable, device: str
) -> CostTable:
    """The table with each unit's seconds measured on `device` (torchgpipe's balance_by_time):
    the graph is interpreted node by node, the clock read at every unit boundary; median of 5
    runs after a warm-up."""
    import statistics

    runs = [_time_units(graph, units, device) for _ in range(6)][1:]
    seconds = [statistics.median(run[i] for run in runs) for i in range(len(units))]
    return CostTable(
        names=table.names,
        seconds=seconds,
        weights=table.weights,
        kv_cache=table.kv_cache,
        working=table.working,
        cut_bytes=table.cut_bytes,
        link_bandwidth=table.link_bandwidth,
    )


def _time_units(graph: Graph, units: list[StageUnit], device: str) -> list[float]:
    import time

    import torch
    import torch.fx as fx

    unit_of = {n: i for i, u in enumerate(units) for n in u.nodes}
    seconds = [0.0] * len(units)
    on_device: dict[str, torch.Tensor] = {}

    def sync() -> float:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    class UnitClock(fx.Interpreter):
        current, started = -1, 0.0

        def fetch_attr(self, target: str) -> torch.Tensor:
            if target not in on_device:
                on_device[target] = super().fetch_attr(target).to(device)
            return on_device[target]

        def run_node(self, node: fx.Node) -> Any:
            unit = unit_of.get(node, self.current) if node.op == "call_function" else self.current
            if unit != self.current:
                now = sync()
                if self.current >= 0:
                    seconds[self.current] += now - self.started
                self.current, self.started = unit, now
            return super().run_node(node)

    clock = UnitClock(graph.gm)
    inputs = [t.to(device) for t in graph.example_inputs]
    with torch.no_grad():
        clock.run(*inputs)
    if clock.current >= 0:
        seconds[clock.current] += sync() - clock.started
    return seconds


__all__ = [
    "CostTable",
    "PartitionOptions",
    "PartitionPass",
    "Plan",
    "brute_force_partition",
    "solve_partition",
]
