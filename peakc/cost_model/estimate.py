"""Estimate a graph's time and memory on a HardwareProfile, for one runtime.

Each kernel's device time is a roofline: the larger of FLOPs / (peak * efficiency(FLOPs))
and bytes / (bandwidth * efficiency(op class, bytes)), with the profile's size-dependent
curves, plus `kernel_gap` per kernel (launch latency on the device). A node runs as many
kernels as eager PyTorch launches for it (`OpCost.kernels`); views launch nothing.

Two runtimes (`RUNTIMES`):
- "graph": the kernels replayed back to back on the device (a CUDA graph, or any runtime
  that keeps the host off the critical path): the time is the sum of device times.
- "eager": PyTorch issuing each kernel from Python, simulated as two clocks. The host spends
  `launch_overhead` (per kernel kind: `issue_time`) issuing each kernel, `view_overhead` per
  view, and the device runs kernels in order as soon as they are issued, so small kernels
  cost their issue time and large ones their device time. This is how peakc's eager and ORT
  backends run a program, so it is the default.
A node's `time` is how much it moved the finish time; node times sum to block times, and
block times to the total. Fused peakc ops are one kernel; their cost comes from the rule
registered for them (`register_cost_rule`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from peakc.cost_model.hardware import HardwareProfile
from peakc.cost_model.memory import (
    MemoryEstimate,
    kv_cache_bytes,
    peak_activation_bytes,
    weight_bytes,
)
from peakc.cost_model.op_costs import (
    COST_RULES,
    CostContext,
    OpCost,
    node_cost,
    op_name,
    register_cost_rule,
    shape_of,
)
from peakc.errors import PeakcError
from peakc.ir.graph import MODULE_KEY, Graph

__all__ = [
    "COST_RULES",
    "RUNTIMES",
    "Estimate",
    "estimate",
    "kernel_time",
    "node_device_time",
    "register_cost_rule",
]

RUNTIMES = ("eager", "graph")
DEFAULT_RUNTIME = "eager"  # how peakc's backends (eager, ort) run a program today


@dataclass
class NodeEstimate:
    """One node's cost: what it computes and moves, its device time, and what binds it."""

    name: str
    op: str
    module: str
    block: str
    shape: str
    flops: float
    bytes: float
    kind: str
    dtype: str
    rule: str
    device_time: float
    time: float
    bound: str  # "compute" | "memory" | "launch" | "free"
    kernels: int = 1
    op_class: str = "elementwise"  # OpCost's, so a backend can price the node on another target
    padding: float = 1.0


@dataclass
class BlockEstimate:
    name: str
    time: float
    flops: float
    bytes: float
    kernels: int


@dataclass
class Estimate:
    """Per-node, per-block and whole-graph estimates for one phase at one shape."""

    target: str
    phase: str  # "prefill" | "decode" | "graph"
    runtime: str  # "eager" | "graph" (RUNTIMES): what `total_time` and node times mean
    batch: int | None
    seq: int | None
    nodes: list[NodeEstimate]
    blocks: list[BlockEstimate]
    memory: MemoryEstimate
    host_time: float = 0.0  # host seconds issuing kernels and views
    device_busy: float = 0.0  # device seconds running kernels
    notes: list[str] = field(default_factory=list)

    @property
    def steady_state_time(self) -> float:
        """Seconds per run when runs are issued back to back (host and device overlapped)."""
        return max(self.host_time, self.device_busy)

    @property
    def total_time(self) -> float:
        """Seconds of one run in this estimate's runtime (the sum of node times)."""
        return sum(n.time for n in self.nodes)

    @property
    def device_time(self) -> float:
        """Seconds of one run with the host off the critical path (a CUDA graph replay)."""
        return self.device_busy

    @property
    def total_flops(self) -> float:
        return sum(n.flops for n in self.nodes)

    @property
    def total_bytes(self) -> float:
        return sum(n.bytes for n in self.nodes)

    @property
    def kernels(self) -> int:
        return sum(n.kernels for n in self.nodes)

    def top_nodes(self, count: int = 10) -> list[NodeEstimate]:
        return sorted(self.nodes, key=lambda n: n.time, reverse=True)[:count]

    def to_dict(self, top: int = 20) -> dict:
        return {
            "target": self.target,
            "phase": self.phase,
            "runtime": self.runtime,
            "batch": self.batch,
            "seq": self.seq,
            "device_time_s": self.device_time,
            "total_time_s": self.total_time,
            "total_flops": self.total_flops,
            "total_bytes": self.total_bytes,
            "kernels": self.kernels,
            "host_time_s": self.host_time,
            "device_busy_s": self.device_busy,
            "memory": self.memory.to_dict(),
            "blocks": [asdict(b) for b in self.blocks],
            "top_nodes": [asdict(n) for n in self.top_nodes(top)],
            "notes": self.notes,
        }


def kernel_time(cost: OpCost, profile: HardwareProfile) -> tuple[float, str]:
    """Device seconds of one node's work (gaps excluded) and its binding resource."""
    if cost.kind == "free":
        return 0.0, "free"
    if cost.kind == "gemm":
        rate = profile.peak(cost.dtype) * profile.gemm_efficiency_for(cost.dtype, cost.flops)
    elif cost.kind == "attention":
        rate = profile.peak(cost.dtype) * profile.attention_efficiency_for(cost.flops)
    else:
        rate = profile.peak("fp32")
    compute = cost.flops / rate if cost.flops else 0.0
    bandwidth = profile.memory_bandwidth * profile.bandwidth_efficiency_for(
        cost.op_class, cost.lane_bytes
    )
    memory = cost.lane_bytes / bandwidth
    return (compute, "compute") if compute >= memory else (memory, "memory")


def node_device_time(cost: OpCost, profile: HardwareProfile, kernels: int) -> tuple[float, str]:
    """Device seconds of a node that runs `kernels` kernels: its work plus one gap each."""
    work, bound = kernel_time(cost, profile)
    return work + kernels * profile.kernel_gap, bound


def estimate(
    graph: Graph,
    profile: HardwareProfile,
    *,
    phase: str = "graph",
    batch: int | None = None,
    seq: int | None = None,
    kv_len: int | None = None,
    kv_tokens: int | None = None,
    runtime: str = DEFAULT_RUNTIME,
) -> Estimate:
    """Estimate every call node of `graph` for `runtime` ("eager" or "graph").

    `kv_len` costs attention against a KV cache; `kv_tokens` sizes the KV cache in the
    memory estimate (default: none).
    """
    if runtime not in RUNTIMES:
        raise PeakcError(f"estimate: runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    ctx = CostContext(kv_len=kv_len)
    block_of = {n: b.name for b in graph.blocks() for n in b.nodes}
    nodes: list[NodeEstimate] = []
    host = device = issued = busy = 0.0
    generic: list[str] = []
    for node in graph.call_nodes():
        cost = node_cost(node, ctx)
        if cost.rule == "generic":
            generic.append(f"{node.name} ({op_name(node.target)})")
        kernels = (
            profile.eager_kernels.get(op_name(node.target), cost.kernels)
            if cost.kind != "free"
            else 0
        )
        dev, bound = node_device_time(cost, profile, kernels)
        before = device
        issue = (
            profile.view_overhead
            if cost.kind == "free"
            else kernels * profile.issue_time(cost.kind)
        )
        issued += issue
        busy += dev
        if cost.kind == "free":
            host += issue
            if not profile.asynchronous_launch:
                device = host = max(host, device)
        elif profile.asynchronous_launch:
            host += issue
            device = max(host, device) + dev
        else:
            device = host = max(host, device) + issue + dev
        if cost.kind != "free" and dev < issue and runtime == "eager":
            bound = "launch"
        nodes.append(
            NodeEstimate(
                name=node.name,
                op=op_name(node.target),
                module=node.meta.get(MODULE_KEY, ""),
                block=block_of.get(node, "prologue"),
                shape=shape_of(node),
                flops=cost.flops,
                bytes=cost.bytes,
                kind=cost.kind,
                dtype=cost.dtype,
                rule=cost.rule,
                device_time=dev,
                time=device - before
                if runtime == "eager"
                else dev + (0.0 if profile.asynchronous_launch else issue),
                bound=bound,
                kernels=kernels,
                op_class=cost.op_class,
                padding=cost.padding,
            )
        )
    blocks: dict[str, BlockEstimate] = {}
    for n in nodes:
        b = blocks.setdefault(n.block, BlockEstimate(n.block, 0.0, 0.0, 0.0, 0))
        b.time += n.time
        b.flops += n.flops
        b.bytes += n.bytes
        b.kernels += n.kernels
    memory = MemoryEstimate(
        weights=weight_bytes(graph),
        peak_activations=peak_activation_bytes(graph),
        kv_cache=kv_cache_bytes(graph, batch or 1, kv_tokens) if kv_tokens else 0.0,
        device_capacity=profile.memory_capacity.get("device", float("inf")),
    )
    notes = []
    if generic:
        shown = ", ".join(generic[:5]) + (
            f" and {len(generic) - 5} more" if len(generic) > 5 else ""
        )
        notes.append(
            f"{len(generic)} node(s) had no cost rule and were costed as memory-bound "
            f"elementwise kernels: {shown}"
        )
    if not profile.asynchronous_launch:
        busy += issued  # one clock: the host's issue time is spent on the device's time line
    if runtime == "graph" and not profile.asynchronous_launch:
        notes.append(
            f"{profile.name} issues kernels from the host (no device-side replay): "
            "graph time includes the host's issue time"
        )
    return Estimate(
        profile.name,
        phase,
        runtime,
        batch,
        seq,
        nodes,
        list(blocks.values()),
        memory,
        host_time=issued,
        device_busy=busy,
        notes=notes,
    )
