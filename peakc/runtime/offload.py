"""The offload executor: a graph whose weights and KV cache live across GPU, pinned CPU memory
and disk, run block by block with the next block's transfers overlapping the current compute.

The `offload` pass (peakc/passes/offload.py) writes the plan: each weight's home tier and each
layer's KV-cache tier (`graph.info["offload"]`, stored in the artifact's manifest). Here:

- Resident (GPU) weights are moved to the device once. The rest are copied, per unit (a layer
  with its glue nodes, `offload_units`), into one of two device buffers on a separate stream:
  while unit i computes, the next streamed unit's pinned-memory tensors are copied into the
  other buffer (its disk-tier tensors follow from staging once the host has seen their read
  end); a copy into a buffer waits for the compute that last read it (events order the two
  streams).
- Disk-tier weights are written once to a file under the plan's `disk_path`, each tensor at a
  DISK_ALIGN offset in the order the units read them, and read back with large `preadv` calls
  on several threads (O_DIRECT where the file system takes it) into two pinned staging
  buffers, by a reader thread two streamed units ahead, so disk, PCIe and compute overlap.
- The KV cache is one tensor per layer (the decoder's `k_cache[i]` reads become per-layer
  weights, `executor_graph`), resident on the GPU or in pinned host memory and streamed with
  its layer's weights; `OffloadStep` writes each step's new keys and values back.
- A `peakc::linear_wq` weight the Triton kernels take is repacked once, when the executor graph
  is made (`repack_linears`), into their layout: the tiers hold, and the buffers receive, the
  repacked tensors, and the node runs the kernels on the streamed tensors directly (on a GPU,
  or the CPU under TRITON_INTERPRET=1; elsewhere the backend op's reference). A layout they
  decline keeps peakc's and the op's reference; `linear_wq_report()` names those layers.
- GPU memory: the executor holds what the plan counts (`plan["predicted"]["held_bytes"]`):
  the resident tensors, the GPU-tier caches, and two buffers sized once, for the largest unit
  with its host-tier caches at the plan's size; the activations and the plan's reserve take
  the rest of `gpu_memory`. The peak of `torch.cuda.max_memory_allocated` is checked after
  every call.

Blocks run through the shared block runner (`BlockRunner` with a weight source). Device work
goes through a small interface, `Transfers`: `CudaTransfers` on a GPU, `SimulatedTransfers`
(CPU tensors, fake bandwidths and compute times on virtual clocks, every operation recorded,
the bytes it holds counted) for tests of the schedule and of the memory. The offload pass
predicts the same schedule (`passes.offload.pipeline_seconds`), from per-unit compute seconds
that `measure_compute` can time on the device.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import mmap
import os
import shutil
import statistics
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir.graph import MODULE_KEY, Block, Graph
from peakc.ir.ops import PackedWeight, find_op, lowering_for, peakc_op_name
from peakc.runtime.blocks import BlockRunner
from peakc.runtime.generate import write_cache

PLAN_KEY = "offload"  # graph.info and manifest key of the plan
KV_PREFIX = "offload_kv"  # per-layer cache tensors: offload_kv.k3, offload_kv.v3
TIERS = ("gpu", "cpu", "disk")
ALIGN = 256  # byte alignment of each tensor inside the transfer buffers
DISK_ALIGN = 4096  # file offset, staging address and length of each disk read (O_DIRECT's)
READ_CHUNK = 16 << 20  # bytes per read call: large sequential reads
READ_THREADS = 4  # read calls in flight at once (a disk serves several faster than one)
GB = 1e9
GPU_CHIPS = ("h100", "h200", "a100", "l40", "b200")  # targets that name the GPU they are for
# The Triton backend's linear_wq kernels, imported by name where a graph has a linear_wq (the
# runtime sits below the backends; artifact.BACKEND_MODULES reaches them the same way):
# KERNEL_OPS registers the backend's linear_wq_repacked op and its launcher.
KERNEL_OPS = "peakc.backends.triton.kernels.compressed_linear"
KERNEL_LAYOUT = "peakc.backends.triton.kernels.linear_wq"  # repack_linear_wq, choose_config
KERNEL_KEY = "offload_kernel_layout"  # node meta: a linear_wq whose weight is in that layout
# graph.info key (the plan's is "linear_wq"): per linear_wq layer, "triton" or why not
LINEAR_KEY = "offload_linear_wq"


# --- the graph the executor runs ----------------------------------------------------------------


def executor_graph(graph: Graph, kernels: bool = True) -> Graph:
    """A copy of `graph` whose KV-cache reads (`select(k_cache, 0, i)`) are per-layer weights
    `offload_kv.k{i}` / `offload_kv.v{i}` and whose cache inputs are gone, so each layer's
    cache can be placed like a weight; with `kernels`, its linear_wq weights in the Triton
    kernels' layout where they take them (`repack_linears`; `info[LINEAR_KEY]` says which)."""
    out = graph.copy()
    if kernels:
        out.info[LINEAR_KEY] = repack_linears(out)
    if "generation" not in out.info:
        return out
    inputs = out.input_nodes()
    if len(inputs) != 4:
        raise PeakcError(f"offload: a decoder takes 4 inputs, this graph takes {len(inputs)}")
    for kind, cache in (("k", inputs[2]), ("v", inputs[3])):
        for node in list(cache.users):
            select = node.target is torch.ops.aten.select.int and len(node.args) == 3
            if not select or node.args[1] != 0:
                raise PeakcError(
                    f"offload: node '{node.name}' reads the KV cache '{cache.name}' other than "
                    "one layer at a time (select on dim 0)"
                )
            layer = int(node.args[2])
            with warnings.catch_warnings():  # fx: a get_attr of a plain tensor attribute
                warnings.simplefilter("ignore", UserWarning)
                attr = out.add_weight(f"{KV_PREFIX}.{kind}{layer}", torch.empty(0), before=node)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            out.graph.erase_node(node)
        out.graph.erase_node(cache)
    out.example_inputs = out.example_inputs[:2]
    return out


# --- linear_wq in the Triton kernels' layout ----------------------------------------------------


def triton_kernels() -> tuple[Any, Any] | str:
    """The Triton backend's linear_wq modules (KERNEL_OPS, KERNEL_LAYOUT), or why they are not
    available."""
    try:
        return importlib.import_module(KERNEL_OPS), importlib.import_module(KERNEL_LAYOUT)
    except ImportError as exc:
        return f"the Triton kernels do not import ({exc})"


def repack_linears(graph: Graph) -> dict[str, str]:
    """Rewrite in place each peakc::linear_wq whose layout the Triton kernels take: its weight
    repacked once into their layout (new weights `<module>.triton_qweight`, `_scales`,
    `_zeros`, `_perm`, so the tiers hold and stream that layout; repacked on the GPU when there
    is one), the node, keeping its name, calling the backend's linear_wq_repacked
    (`use_kernels` points it at the kernels). Returns per linear_wq (by module path) "triton",
    or why the kernels decline it: that one keeps peakc's layout and the op's reference."""
    nodes = [n for n in graph.call_nodes() if peakc_op_name(n.target) == "linear_wq"]
    if not nodes:
        return {}
    loaded = triton_kernels()
    paths = {}
    for node in nodes:
        layer = node.meta.get(MODULE_KEY, node.name)
        if isinstance(loaded, str):
            paths[layer] = loaded
            continue
        reason = lowering_for("linear_wq", "triton").why_not(node, graph)
        if reason is None:
            reason = repack_node(graph, node, layer, loaded[1])
        paths[layer] = reason or "triton"
    graph.recompile()
    return paths


def repack_node(graph: Graph, node: fx.Node, layer: str, layout: Any) -> str | None:
    """Point one linear_wq node at its weight in the kernels' layout; None when done, else why
    the repacking refused the layout (act-order groups of unequal sizes, say)."""
    x, packed, bias = PackedWeight.of(node.args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stored = {k: graph.get_weight(n.target).to(device) for k, n in packed.tensors().items()}
    try:
        repacked = layout.repack_linear_wq(
            stored["qweight"], stored["scales"], stored["qzeros"], stored.get("g_idx"),
            *packed.layout(), name=layer,
        )  # fmt: skip
    except PeakcError as exc:
        return str(exc)
    fields = {"qweight": repacked.qweight, "scales": repacked.scales, "zeros": repacked.zeros}
    if repacked.perm is not None:
        fields["perm"] = repacked.perm
    prefix = packed.qweight.target.rsplit(".", 1)[0]
    attrs = {}
    for key, tensor in fields.items():
        attr = graph.add_weight(f"{prefix}.triton_{key}", tensor.cpu().contiguous(), before=node)
        attr.meta = {**node.meta, "val": attr.meta["val"]}
        attrs[key] = attr
    node.target = find_op("linear_wq_repacked", "triton").overload
    node.args = (x, attrs["qweight"], attrs["scales"], attrs["zeros"], attrs.get("perm"), bias,
                 *packed.layout())  # fmt: skip
    node.meta[KERNEL_KEY] = True
    for old in packed.tensors().values():
        if not old.users:
            graph.graph.erase_node(old)
    return None


def runs_kernels(device: torch.device) -> bool:
    """Whether Triton kernels run on `device`: a GPU, or the CPU under TRITON_INTERPRET=1."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    return device.type == "cuda" or interpreted


def use_kernels(graph: Graph, device: torch.device) -> tuple[list[int], str | None]:
    """Point the repacked linear_wq nodes (`repack_linears`) at the Triton kernels' launcher
    when `device` runs them, else at the backend op's reference (it dequantizes the repacked
    weight). Returns a one-element counter of the launches, and why the reference runs (None:
    the kernels do)."""
    nodes = [n for n in graph.call_nodes() if n.meta.get(KERNEL_KEY)]
    launches = [0]
    if not nodes:
        return launches, None
    if not runs_kernels(device):
        for node in nodes:
            node.target = find_op("linear_wq_repacked", "triton").overload
        return launches, f"{device} runs no Triton kernels (set TRITON_INTERPRET=1 on a CPU)"
    launch = lowering_for("linear_wq_repacked", "triton").fn

    def linear_wq_triton(*args: Any) -> torch.Tensor:
        launches[0] += 1
        return launch(*args)

    for node in nodes:
        node.target = linear_wq_triton
    return launches, None


def kernel_scratch(rows: int, out_features: int, in_features: int, bits: int, size: int) -> int:
    """Bytes the Triton linear_wq kernels allocate besides their output for `rows` rows of x
    (`size` bytes an element): the float weight and the permuted x of the dequantize + GEMM
    path that large batches take, else at most one fp32 partial output per K block (split-K)."""
    loaded = triton_kernels()
    if isinstance(loaded, str):
        raise PeakcError(f"offload: {loaded}")
    layout = loaded[1]
    shape = SimpleNamespace(bits=bits, out_features=out_features, in_features=in_features)
    if layout.choose_config(rows, shape).kernel == "dequant":
        return (out_features + rows) * in_features * size
    blocks = -(-in_features * bits // (16 * layout.MIN_GROUP))  # slots of 16 columns at least
    return 4 * rows * out_features * blocks


def kv_layer(name: str) -> int | None:
    """The layer of a per-layer cache weight (`offload_kv.k3` -> 3), None for a model weight."""
    if not name.startswith(KV_PREFIX + "."):
        return None
    return int(name[len(KV_PREFIX) + 2 :])


@dataclass
class OffloadUnit:
    """What moves and runs as one: a numbered layer with the glue nodes between its modules."""

    name: str
    block: Block
    weights: list[str]  # every tensor it reads: model weights and per-layer cache tensors

    def kv_layers(self) -> list[int]:
        return sorted({kv_layer(w) for w in self.weights if kv_layer(w) is not None})


def offload_units(graph: Graph) -> list[OffloadUnit]:
    """`graph.blocks()` merged into units: a `between.N` block (nodes outside any module, such
    as a decoder's reshapes) joins the unit before it, and repeats of a layer's name join it."""
    groups: list[tuple[str, list[Block]]] = []
    for block in graph.blocks():
        joins = groups and (block.name.startswith("between.") or block.name == groups[-1][0])
        if joins:
            groups[-1][1].append(block)
        else:
            groups.append((block.name, [block]))
    units = []
    for name, blocks in groups:
        merged = merge_blocks(name, [n for b in blocks for n in b.nodes])
        reads = [n.target for n in [*merged.nodes, *merged.inputs] if n.op == "get_attr"]
        units.append(OffloadUnit(name, merged, list(dict.fromkeys(reads))))
    return units


def merge_blocks(name: str, nodes: list[fx.Node]) -> Block:
    """One block of `nodes` with its inputs (values from outside, weights of other blocks
    included) and outputs (values read outside), as `Graph.blocks()` computes them."""
    block = Block(name=name, nodes=nodes)
    inside = set(nodes)
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in block.inputs:
                block.inputs.append(arg)
        if any(u not in inside for u in node.users):
            block.outputs.append(node)
    return block


# --- plan checks ------------------------------------------------------------------------------


def check_plan(plan: dict[str, Any], graph: Graph) -> None:
    """The plan must be for this model: the same weights with the same sizes, and a tier for
    every cache layer the graph reads; anything else is a plan from another model."""
    weights = plan.get("weights")
    if not isinstance(weights, dict) or plan.get("format") != 1:
        raise PeakcError("offload plan is malformed (no format 1 'weights' table)")
    ours = {n: t for n, t in read_weights(graph).items() if kv_layer(n) is None}
    for name, tensor in ours.items():
        entry = weights.get(name)
        if entry is None:
            raise PeakcError(
                f"offload plan has no tier for weight '{name}' (a plan from another model?)"
            )
        if entry.get("bytes") != nbytes(tensor) or entry.get("tier") not in TIERS:
            raise PeakcError(
                f"offload plan's weight '{name}' has {entry.get('bytes')} bytes on tier "
                f"{entry.get('tier')!r}, the model's has {nbytes(tensor)} (a plan from another "
                "model?)"
            )
    extra = sorted(set(weights) - set(ours))
    if extra:
        raise PeakcError(f"offload plan places weight '{extra[0]}', which this model lacks")
    planned = plan.get("linear_wq", {})
    for layer, path in graph.info.get(LINEAR_KEY, {}).items():
        if planned.get(layer, path) == "triton" and path != "triton":
            raise PeakcError(
                f"offload plan streams linear_wq '{layer}' in the Triton kernels' layout, but "
                f"here they decline it: {path}"
            )
    layers = {kv_layer(n) for n in graph.weights() if kv_layer(n) is not None}
    missing = sorted(layers - {int(k) for k in plan.get("kv_cache", {})})
    if missing:
        raise PeakcError(f"offload plan has no tier for the KV cache of layer {missing[0]}")


def check_machine(plan: dict[str, Any], transfers: Transfers) -> None:
    """Refuse a plan made for another machine: a budget above this device's memory, or a
    target profile naming another GPU than this one."""
    capacity = transfers.capacity()
    if plan["gpu_memory"] > capacity:
        raise PeakcError(
            f"offload plan was made for gpu_memory {plan['gpu_memory'] / GB:.2f} GB on target "
            f"'{plan['target']}', but {transfers.name} has {capacity / GB:.2f} GB"
        )
    chip = plan["target"].split("-")[0].lower()
    if chip.startswith(GPU_CHIPS) and chip not in transfers.name.lower():
        raise PeakcError(
            f"offload plan was made for target '{plan['target']}', not for {transfers.name}: "
            "compile again with --target for this machine"
        )


def read_weights(graph: Graph) -> dict[str, torch.Tensor]:
    """The weights some node reads (a captured buffer nothing reads has no tier)."""
    return {
        n.target: graph.get_weight(n.target)
        for n in graph.graph.nodes
        if n.op == "get_attr" and n.users
    }


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def aligned(size: int) -> int:
    """Bytes a tensor of `size` bytes takes in a transfer buffer (the pass counts the same)."""
    return -(-size // ALIGN) * ALIGN


def disk_room(size: int) -> int:
    """Bytes a disk-tier tensor of `size` bytes takes in the file and in a staging buffer, and
    reads: rounded up to DISK_ALIGN (the pass counts the same)."""
    return -(-size // DISK_ALIGN) * DISK_ALIGN


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's storage."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def disk_aligned(size: int, pin: bool = False) -> torch.Tensor:
    """`size` host bytes starting at a DISK_ALIGN address (what direct reads land in); the
    allocation is DISK_ALIGN bytes larger to leave room for the shift."""
    raw = torch.empty(size + DISK_ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = -raw.data_ptr() % DISK_ALIGN
    return raw[shift : shift + size]


# --- device operations ------------------------------------------------------------------------


class Transfers:
    """The device operations the executor issues, in the order it issues them.

    Events are what `copy`, `read` and `end_compute` return; an operation given events starts
    after them. `copy` runs on the transfer stream (host to device), `read` on the reader thread
    (disk to pinned staging), compute on the compute stream between `begin_compute` and
    `end_compute`. The host waits only in `wait` (for a read, before copying from its
    staging)."""

    name: str
    device: torch.device

    def capacity(self) -> int:
        raise NotImplementedError

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A resident copy of `t` on the device (GPU-tier weights and caches)."""
        raise NotImplementedError

    def buffer(self, size: int) -> torch.Tensor:
        raise NotImplementedError

    def staging(self, size: int) -> torch.Tensor:
        """`size` bytes of (pinned) host memory at a DISK_ALIGN address, for disk reads."""
        raise NotImplementedError

    def host(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def copy(self, label: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: list) -> Any:
        raise NotImplementedError

    def read(self, label: str, nbytes: int, fill: Callable[[], None], after: list) -> Any:
        """`fill()` (the disk reads of `nbytes` into a staging buffer) on the reader thread,
        after the copies in `after` that last read from that staging buffer."""
        raise NotImplementedError

    def wait(self, event: Any) -> None:
        """The host waits for a read to end (its staging buffer is then full)."""
        raise NotImplementedError

    def begin_compute(self, label: str, after: list) -> None:
        raise NotImplementedError

    def end_compute(self, label: str) -> Any:
        raise NotImplementedError

    def memory_peak(self) -> int | None:
        """Bytes allocated on the device at most since the executor started (None: unknown)."""
        return None

    def drain(self) -> None:
        """Wait for every copy and compute issued so far (before the buffers they use go)."""

    def close(self) -> None:
        """Stop what the device runs besides the caller (the reader thread)."""


class CudaTransfers(Transfers):
    """A CUDA device: copies on a side stream, compute on the current stream, disk reads on
    one reader thread into pinned memory (`DiskTier.read_into` spreads each over its own
    threads); ordered by CUDA events, and the reads by their futures."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise PeakcError(f"CudaTransfers needs a CUDA device, got {self.device}")
        self.name = torch.cuda.get_device_name(self.device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peakc-offload-disk")
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)

    def capacity(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def place(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def buffer(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, device=self.device)

    def staging(self, size: int) -> torch.Tensor:
        return disk_aligned(size, pin=True)

    def host(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu").contiguous().pin_memory()

    def copy(self, label, pairs, after):
        for event in after:
            self.copy_stream.wait_event(event)
        with torch.cuda.stream(self.copy_stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def read(self, label, nbytes, fill, after):
        def run() -> None:
            for event in after:  # the copy that last read this staging buffer
                event.synchronize()
            fill()

        return self.reader.submit(run)

    def wait(self, event) -> None:
        event.result()  # re-raises what the read raised (a short read, say)

    def begin_compute(self, label, after):
        stream = torch.cuda.current_stream(self.device)
        for event in after:
            stream.wait_event(event)

    def end_compute(self, label):
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done

    def memory_peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) - self.baseline

    def drain(self) -> None:
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.reader.shutdown(wait=True)


@dataclass
class ScheduleEntry:
    """One simulated operation: what ran ("copy", "read", "compute"), for which unit, when."""

    kind: str
    label: str
    start: float
    end: float
    nbytes: int = 0


@dataclass
class SimulatedTransfers(Transfers):
    """CPU tensors with fake bandwidths and compute times on virtual clocks (one per stream
    and the reader thread, and the host's, which only `wait` moves); operations happen at
    once, their times are recorded in `schedule`. What the tests check: which transfer starts
    before which compute, what overlaps, and that the pass predicts the same times.

    It also counts the bytes it holds "on the device" (what `place` and `buffer` hand out,
    until the last tensor viewing each is gone) and their peak, `memory_peak()`: the
    executor's own memory (weights, caches, buffers), not the activations of the compute."""

    h2d_bandwidth: float = 10e9  # bytes/s
    disk_bandwidth: float = 2e9
    compute_seconds: dict[str, float] = field(default_factory=dict)  # by unit name
    default_compute: float = 1e-3
    memory: int = 1 << 40
    name: str = "simulated device"
    schedule: list[ScheduleEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = torch.device("cpu")
        self.clocks = {"copy": 0.0, "read": 0.0, "compute": 0.0}
        self.host_clock = 0.0  # the host issues nothing before it: it waited for a read
        self.started: tuple[str, float] | None = None
        self.held = 0
        self.peak = 0

    def capacity(self) -> int:
        return self.memory

    def place(self, t: torch.Tensor) -> torch.Tensor:
        return self._hold(t.detach().clone())

    def buffer(self, size: int) -> torch.Tensor:
        return self._hold(torch.empty(size, dtype=torch.uint8))

    def memory_peak(self) -> int:
        return self.peak

    def _hold(self, t: torch.Tensor) -> torch.Tensor:
        """Count `t`'s storage as device memory until nothing views it any more."""
        storage = t.untyped_storage()
        self.held += storage.nbytes()
        self.peak = max(self.peak, self.held)
        weakref.finalize(storage, self._free, storage.nbytes())
        return t

    def _free(self, nbytes: int) -> None:
        self.held -= nbytes

    def staging(self, size: int) -> torch.Tensor:
        return disk_aligned(size)

    def host(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().contiguous()

    def copy(self, label, pairs, after):
        size = 0
        for dst, src in pairs:
            dst.copy_(src)
            size += dst.numel()
        return self._clocked("copy", label, size, after, self.h2d_bandwidth)

    def read(self, label, nbytes, fill, after):
        fill()
        return self._clocked("read", label, nbytes, after, self.disk_bandwidth)

    def wait(self, event) -> None:
        self.host_clock = max(self.host_clock, event)

    def begin_compute(self, label, after):
        self.started = (label, max([self.clocks["compute"], self.host_clock, *after]))

    def end_compute(self, label):
        name, start = self.started
        end = start + self.compute_seconds.get(name, self.default_compute)
        self.schedule.append(ScheduleEntry("compute", name, start, end))
        self.clocks["compute"] = end
        return end

    def _clocked(self, kind, label, size, after, bandwidth):
        start = max([self.clocks[kind], self.host_clock, *after])
        end = start + size / bandwidth
        self.schedule.append(ScheduleEntry(kind, label, start, end, size))
        self.clocks[kind] = end
        return end


# --- the disk tier ------------------------------------------------------------------------------


class DiskTier:
    """Disk-tier tensors in one file under the plan's disk path, each at a DISK_ALIGN offset,
    in the order given (the order the units read them). `read_into` fills staging memory with
    large reads spread over `threads`: O_DIRECT where the file system takes it (the page cache
    never holds the tier), else buffered reads whose pages are dropped once read. Either way
    every step reads the disk, as the plan assumes, not a cache the plan never budgeted."""

    def __init__(
        self, folder: str | Path, tensors: dict[str, torch.Tensor], threads: int = READ_THREADS
    ) -> None:
        self.path, self.spans = write_disk_file(Path(folder), tensors)
        self.removal = weakref.finalize(self, self.path.unlink, True)  # also at exit
        self.fd = os.open(self.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # no readahead: it would cache what was just dropped
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.direct_fd = open_direct(self.path)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="peakc-disk-read")

    @property
    def reads(self) -> str:
        """How the tier is read: "direct" (O_DIRECT) or "buffered" (pages dropped once read)."""
        return "direct" if self.direct_fd is not None else "buffered"

    def room(self, name: str) -> int:
        """Bytes a read of `name` fills: its size rounded up to DISK_ALIGN."""
        return disk_room(self.spans[name][1])

    def read_into(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Each named tensor's bytes into its uint8 host destination (at least `room(name)`
        bytes; at a DISK_ALIGN address for a direct read), in READ_CHUNK reads spread over the
        threads; a short read is an error naming the file."""
        jobs = []
        buffered = []
        for name, dst in items:
            offset, _ = self.spans[name]
            length = self.room(name)
            if dst.numel() < length:
                raise PeakcError(f"offload: a read of '{name}' needs {length} bytes of staging")
            direct = self.direct_fd is not None and dst.data_ptr() % DISK_ALIGN == 0
            if not direct:
                buffered.append(name)
            fd = self.direct_fd if direct else self.fd
            view = dst.numpy()
            for start in range(0, length, READ_CHUNK):
                part = view[start : min(start + READ_CHUNK, length)]
                jobs.append(self.pool.submit(read_exactly, fd, part, offset + start, self.path))
        for job in jobs:
            job.result()
        for name in buffered:
            offset, _ = self.spans[name]
            self._drop(offset, offset + self.room(name))

    def _drop(self, begin: int, end: int) -> None:
        """Drop the whole pages holding bytes [begin, end) from the page cache (a neighbour's
        share of an edge page too: it is read from the disk again when its turn comes)."""
        if not hasattr(os, "posix_fadvise"):
            return
        first = begin - begin % mmap.PAGESIZE
        last = -(-end // mmap.PAGESIZE) * mmap.PAGESIZE
        os.posix_fadvise(self.fd, first, last - first, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Stop the reader threads, close the file and remove it."""
        self.pool.shutdown(wait=True)
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None
        self.removal()


def open_direct(path: Path) -> int | None:
    """`path` opened for O_DIRECT reads, or None where the platform or file system refuses
    them (tmpfs on older kernels, say): the tier is then read buffered."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None
    try:
        os.preadv(fd, [disk_aligned(DISK_ALIGN).numpy()], 0)  # some refuse only at read time
    except OSError:
        os.close(fd)
        return None
    return fd


def read_exactly(fd: int, view: Any, offset: int, path: Path) -> None:
    """Fill the writable buffer `view` from `fd` at `offset` (several reads if the kernel
    returns less)."""
    done, size = 0, len(view)
    while done < size:
        try:
            count = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise PeakcError(
                f"offload: reading the disk tier {path} at byte {offset + done} failed: {exc}"
            ) from None
        if count <= 0:
            raise PeakcError(
                f"offload: the disk tier {path} ended at byte {offset + done}, "
                f"{size - done} bytes short (changed or truncated since it was written?)"
            )
        done += count


def page_cache_share(files: list[Path]) -> float:
    """The share of the files' pages in the page cache (Linux `mincore` over a fresh mapping):
    near 0 when the disk tier, read and dropped, will really be read from the disk again."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    cached = total = 0
    for path in files:
        size = Path(path).stat().st_size
        if not size:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with warnings.catch_warnings():  # read-only mapping: only its address is used
                warnings.simplefilter("ignore", UserWarning)
                view = torch.frombuffer(mapped, dtype=torch.uint8)
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(view.data_ptr()), ctypes.c_size_t(size), vec):
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            del view
            cached += int(torch.frombuffer(vec, dtype=torch.uint8).bitwise_and(1).sum())
            total += pages
    return cached / total if total else 0.0


def write_disk_file(
    folder: Path, tensors: dict[str, torch.Tensor]
) -> tuple[Path, dict[str, tuple[int, int]]]:
    """Write the tensors into one file in `folder`, each at a DISK_ALIGN offset and padded to
    DISK_ALIGN, checking first that the folder is writable and has the space; a failed write
    leaves nothing behind. The file's pages are dropped from the page cache, so reads come
    from the disk, as planned. Returns the path and each tensor's (offset, bytes)."""
    spans: dict[str, tuple[int, int]] = {}
    need = 0
    for name, tensor in tensors.items():
        spans[name] = (need, nbytes(tensor))
        need += disk_room(nbytes(tensor))
    if not folder.is_dir():
        raise PeakcError(f"offload: disk_path {folder} is not a folder")
    if not os.access(folder, os.W_OK):
        raise PeakcError(f"offload: disk_path {folder} is not writable")
    free = shutil.disk_usage(folder).free
    if free < need * 1.01 + 2**20:
        raise PeakcError(
            f"offload: disk_path {folder} has {free / GB:.2f} GB free, the disk tier needs "
            f"{need / GB:.2f} GB"
        )
    digest = hashlib.sha256("".join(sorted(tensors)).encode()).hexdigest()[:12]
    handle, temp = tempfile.mkstemp(prefix=".peakc-offload-", suffix=".tmp", dir=folder)
    path = folder / f"peakc-offload-{digest}-{os.getpid()}.bin"
    try:
        with open(handle, "wb") as f:
            for name, tensor in tensors.items():
                f.write(as_bytes(tensor.detach().to("cpu")).numpy())
                f.write(bytes(disk_room(spans[name][1]) - spans[name][1]))
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if os.path.getsize(temp) != need:
            raise OSError(f"wrote {os.path.getsize(temp)} of {need} bytes")
        os.replace(temp, path)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise PeakcError(f"offload: writing the disk tier to {folder} failed: {exc}") from None
    return path, spans


# --- the executor -------------------------------------------------------------------------------


@dataclass
class UnitLayout:
    """Where a unit's streamed tensors sit in a transfer buffer: name -> (offset, size); which
    of them are read from disk, and where those sit in a staging buffer (DISK_ALIGN offsets)."""

    spans: dict[str, tuple[int, int]]
    from_disk: list[str]
    size: int
    staged: dict[str, int] = field(default_factory=dict)
    staged_size: int = 0


class OffloadExecutor:
    """Runs an executor graph (`executor_graph`) under a plan on `transfers`; call it with the
    graph's inputs. Per call, the streamed units' copies and disk reads are issued ahead of
    their compute. When streamed unit k begins: the host waits for its disk read and copies
    it from staging, issues the pinned-memory copy of unit k+1 and the disk read of unit k+2,
    then unit k's compute (after its copies). A call begins with the reads of units 0 and 1
    and the pinned-memory copy of unit 0. `passes.offload.pipeline_seconds` predicts this
    schedule."""

    def __init__(self, graph: Graph, plan: dict[str, Any], transfers: Transfers) -> None:
        check_plan(plan, graph)
        check_machine(plan, transfers)
        self.graph = graph
        self.plan = plan
        self.transfers = transfers
        self.device = transfers.device
        self.units = offload_units(graph)
        self.blocks = [u.block for u in self.units]
        self.tier = {n: e["tier"] for n, e in plan["weights"].items()}
        self.resident: dict[str, torch.Tensor] = {}
        self.host: dict[str, torch.Tensor] = {}
        disk: dict[str, torch.Tensor] = {}
        for name, tensor in read_weights(graph).items():
            if kv_layer(name) is not None:
                continue
            tier = self.tier[name]
            if tier == "gpu":
                self.resident[name] = transfers.place(tensor)
            elif tier == "cpu":
                self.host[name] = transfers.host(tensor)
            else:
                disk[name] = tensor
        self.shapes = {n: (t.shape, t.dtype) for n, t in graph.weights().items()}
        # the file in the order the units read it: each step reads it front to back
        order = [w for u in self.units for w in u.weights if w in disk]
        disk = {name: disk[name] for name in dict.fromkeys(order)}
        self.disk = DiskTier(plan["disk_path"], disk) if disk else None
        self.slots: list[torch.Tensor] = []
        self.stagings: list[torch.Tensor] = []
        self.slot_free: list[list] = [[], []]  # compute events of the last unit using a slot
        self.staging_free: list[list] = [[], []]  # copy events of the last copy from a staging
        self.peak_gpu_bytes: int | None = None
        self.kernel_launches, unrun = use_kernels(graph, self.device)
        self.linear_paths = {
            layer: path if path != "triton" or unrun is None else f"reference: {unrun}"
            for layer, path in graph.info.get(LINEAR_KEY, {}).items()
        }
        self.set_kv({})

    def linear_wq_report(self) -> dict[str, Any]:
        """How the linear_wq layers run: per layer "triton" or why the reference runs; the
        Triton launches so far."""
        return {"layers": self.linear_paths, "kernel_launches": self.kernel_launches[0]}

    # --- placement ------------------------------------------------------------------------

    def set_kv(self, caches: dict[str, torch.Tensor]) -> None:
        """Place per-layer cache tensors by the plan (GPU, or pinned host memory streamed with
        their layer) and lay out the transfer buffers for the streamed tensors."""
        for name, tensor in caches.items():
            tier = self.plan["kv_cache"][str(kv_layer(name))]["tier"]
            self.resident.pop(name, None)
            self.host.pop(name, None)
            if tier == "gpu":
                self.resident[name] = self.transfers.place(tensor)
            else:
                self.host[name] = self.transfers.host(tensor)
            self.shapes[name] = (tensor.shape, tensor.dtype)
        self.layouts = [self._layout(u) for u in self.units]
        self.stream_order = [i for i, lay in enumerate(self.layouts) if lay.size]
        self.stream_index = {index: k for k, index in enumerate(self.stream_order)}
        size = max(
            (lay.size + self._unplaced_kv_room(u) for lay, u in zip(self.layouts, self.units)),
            default=0,
        )
        disk = max((lay.staged_size for lay in self.layouts), default=0)
        self.slots = self._sized(self.slots, size, self.transfers.buffer)
        self.stagings = self._sized(self.stagings, disk, self.transfers.staging)

    def _unplaced_kv_room(self, unit: OffloadUnit) -> int:
        """Buffer bytes the unit's host-tier cache layers will take once placed, at the plan's
        size: the buffers are made that large at once, not grown (and briefly doubled) when
        a generation places the caches."""
        room = 0
        for name in unit.weights:
            layer = kv_layer(name)
            if layer is None or not self._unplaced(name):
                continue
            entry = self.plan["kv_cache"].get(str(layer), {})
            if entry.get("tier") == "cpu":
                room += aligned(int(entry.get("bytes", 0)) // 2)  # K or V: half the layer's
        return room

    def _sized(self, buffers: list[torch.Tensor], size: int, allocate) -> list[torch.Tensor]:
        """Two buffers of at least `size` bytes: `buffers` when large enough, else new ones,
        allocated once the old ones are freed (never both at once: a cache larger than the
        plan's, for a larger batch, would otherwise hold four)."""
        if not size or (buffers and buffers[0].numel() >= size):
            return buffers
        if buffers:
            self.transfers.drain()  # no copy or compute still uses them
            buffers.clear()
        return [allocate(size) for _ in range(2)]

    def kv_tensor(self, name: str) -> torch.Tensor:
        """A cache tensor where it lives (the device, or pinned host memory)."""
        return self.resident[name] if name in self.resident else self.host[name]

    def _layout(self, unit: OffloadUnit) -> UnitLayout:
        spans: dict[str, tuple[int, int]] = {}
        staged: dict[str, int] = {}
        from_disk = []
        offset = staged_size = 0
        for name in unit.weights:
            if name in self.resident or self._unplaced(name):
                continue
            if name not in self.host and (self.disk is None or name not in self.disk.spans):
                raise PeakcError(f"offload: unit {unit.name} reads '{name}', which has no tier")
            shape, dtype = self.shapes[name]
            size = torch.Size(shape).numel() * dtype.itemsize
            spans[name] = (offset, size)
            offset += aligned(size)
            if name not in self.host:
                from_disk.append(name)
                staged[name] = staged_size
                staged_size += disk_room(size)
        return UnitLayout(spans, from_disk, offset, staged, staged_size)

    def _unplaced(self, name: str) -> bool:
        """A cache layer not placed yet (`set_kv` places them when a generation begins)."""
        return kv_layer(name) is not None and name not in self.resident and name not in self.host

    # --- running --------------------------------------------------------------------------

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs for `inputs` (on the device), every unit run once."""
        unset = [n for n in self.shapes if self._unplaced(n)]
        if unset:
            raise PeakcError(
                f"offload: the KV cache '{unset[0]}' is not placed: begin(batch) first"
            )
        self.reads: dict[int, Any] = {}
        self.copies: dict[int, list] = {}
        self.current: int | None = None
        for k in range(min(2, len(self.stream_order))):
            self._issue_read(k)
        if self.stream_order:
            self._issue_host_copy(0)
        runner = BlockRunner(
            self.graph,
            [tuple(t.to(self.device) for t in inputs)],
            self.device,
            blocks=self.blocks,
            activations="device",
            description="offload",
            weights=self._unit_weights,
        )
        self.store = runner.store
        runner.run()
        self._end_unit()
        peak = self.transfers.memory_peak()
        if peak is not None:
            self.peak_gpu_bytes = max(peak, self.peak_gpu_bytes or 0)
            if peak > self.plan["gpu_memory"]:
                raise PeakcError(
                    f"offload: peak GPU memory {peak / GB:.2f} GB exceeded the plan's "
                    f"gpu_memory of {self.plan['gpu_memory'] / GB:.2f} GB"
                )
        return tuple(runner.store.get(n, 0) for n in self.graph.output_nodes())

    def _unit_weights(self, index: int, block: Block) -> dict[str, torch.Tensor]:
        """The block runner's weight source: closes the previous unit's compute; for a streamed
        unit, copies its disk-tier tensors in once their read is done, issues the next streamed
        unit's pinned-memory copy and the disk read of the one after; then starts this unit's
        compute after its copies."""
        self._end_unit()
        unit = self.units[index]
        after = []
        k = self.stream_index.get(index)
        if k is not None:
            self._issue_disk_copy(k)
            if k + 1 < len(self.stream_order):
                self._issue_host_copy(k + 1)
            if k + 2 < len(self.stream_order):
                self._issue_read(k + 2)
            after = self.copies.pop(k)
        self.transfers.begin_compute(unit.name, after)
        self.current = index
        weights = {}
        slot = self.slots[k % 2] if k is not None else None
        for name in unit.weights:
            if name in self.resident:
                weights[name] = self.resident[name]
            else:
                offset, size = self.layouts[index].spans[name]
                shape, dtype = self.shapes[name]
                weights[name] = slot[offset : offset + size].view(dtype).view(shape)
        return weights

    def _end_unit(self) -> None:
        if self.current is None:
            return
        k = self.stream_index.get(self.current)
        if k is not None:
            self._detach_from_slot(self.units[self.current].block, self.slots[k % 2])
        done = self.transfers.end_compute(self.units[self.current].name)
        if k is not None:
            self.slot_free[k % 2] = [done]
        self.current = None

    def _detach_from_slot(self, block: Block, slot: torch.Tensor) -> None:
        """Copy out the unit's values that later units read and that are views of a streamed
        weight (a slice of a rotary table, say): the buffer is overwritten two units on."""
        where = slot.untyped_storage().data_ptr()
        for node in block.outputs:
            values = self.store.values.get(node, [])
            for i, value in enumerate(values):
                if torch.is_tensor(value) and value.untyped_storage().data_ptr() == where:
                    values[i] = value.clone()

    def _issue_read(self, k: int) -> None:
        """Disk to pinned staging for the k-th streamed unit, after the copy that last read
        from that staging buffer."""
        layout = self.layouts[self.stream_order[k]]
        if not layout.from_disk:
            return
        staging = self.stagings[k % 2]
        items = [
            (n, staging[layout.staged[n] : layout.staged[n] + self.disk.room(n)])
            for n in layout.from_disk
        ]
        nbytes = sum(layout.spans[n][1] for n in layout.from_disk)
        label = self.units[self.stream_order[k]].name
        fill = functools.partial(self.disk.read_into, items)
        self.reads[k] = self.transfers.read(label, nbytes, fill, self.staging_free[k % 2])

    def _issue_host_copy(self, k: int) -> None:
        """Pinned host bytes (CPU-tier weights and caches) to the k-th streamed unit's buffer,
        after the compute that last read that buffer."""
        index = self.stream_order[k]
        slot = self.slots[k % 2]
        pairs = [
            (slot[offset : offset + size], as_bytes(self.host[name]))
            for name, (offset, size) in self.layouts[index].spans.items()
            if name in self.host
        ]
        label = self.units[index].name
        self.copies[k] = [self.transfers.copy(label, pairs, self.slot_free[k % 2])] if pairs else []

    def _issue_disk_copy(self, k: int) -> None:
        """The k-th streamed unit's disk-tier bytes from staging to its buffer, once the host
        has seen their read end (the copy stream cannot wait for a thread)."""
        index = self.stream_order[k]
        layout = self.layouts[index]
        if not layout.from_disk:
            return
        self.transfers.wait(self.reads.pop(k))
        slot, staging = self.slots[k % 2], self.stagings[k % 2]
        pairs = []
        for name in layout.from_disk:
            offset, size = layout.spans[name]
            start = layout.staged[name]
            pairs.append((slot[offset : offset + size], staging[start : start + size]))
        done = self.transfers.copy(self.units[index].name, pairs, self.slot_free[k % 2])
        self.copies[k].append(done)
        self.staging_free[k % 2] = [done]

    def close(self) -> None:
        """Stop the reader and remove the disk tier's file."""
        self.transfers.close()
        if self.disk is not None:
            self.disk.close()
            self.disk = None


class OffloadStep:
    """A Generator step (`CacheOwningStep`) over an offload executor: it keeps the KV cache,
    one tensor per layer on the plan's tier, and writes each step's keys and values back."""

    def __init__(self, executor: OffloadExecutor, layout: dict[str, Any]) -> None:
        self.executor = executor
        self.layout = layout

    def begin(self, batch: int) -> None:
        self.executor.set_kv(layer_caches(self.layout, batch))

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits, new_k, new_v = self.executor(ids, positions)
        write_back(self.executor.kv_tensor, new_k, new_v, positions)
        return logits


def layer_caches(layout: dict[str, Any], batch: int) -> dict[str, torch.Tensor]:
    """Zero per-layer caches `offload_kv.k{i}` / `v{i}` [batch, heads, slots, dim] for a
    decoder's cache layout (the Generator's `generation` record)."""
    shape = (batch, layout["num_kv_heads"], layout["max_seq_len"], layout["head_dim"])
    dtype = getattr(torch, layout["dtype"])
    return {
        f"{KV_PREFIX}.{kind}{layer}": torch.zeros(shape, dtype=dtype)
        for layer in range(layout["num_layers"])
        for kind in "kv"
    }


def write_back(
    cache: Callable[[str], torch.Tensor],
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write a step's keys and values [L, B, H, S, D] into each layer's cache where it lives
    (`cache(name)`; a host-tier cache waits for the device to finish the step)."""
    for layer in range(new_k.shape[0]):
        k, v = cache(f"{KV_PREFIX}.k{layer}"), cache(f"{KV_PREFIX}.v{layer}")
        write_cache(
            k.unsqueeze(0),
            v.unsqueeze(0),
            new_k[layer : layer + 1].to(k.device),
            new_v[layer : layer + 1].to(v.device),
            positions.to(k.device),
        )


# --- measured compute ---------------------------------------------------------------------------


@dataclass
class ComputeTimes:
    """Seconds measured on a device: each unit's compute, and the step's own work around them
    (the block runner's setup; for a decoder, the KV write-back and the next token's argmax)."""

    units: list[float]
    step: float


def measure_compute(
    graph: Graph,
    inputs: tuple[torch.Tensor, ...],
    device: torch.device | str,
    caches: dict[str, torch.Tensor] | None = None,
    runs: int = 3,
) -> ComputeTimes:
    """Time each unit of an executor graph (`executor_graph`) on `device` with its weights
    resident, as the offload executor runs it (the block runner, node by node), and the step
    around the units; the median of `runs` after a warm-up, the device synchronized at every
    unit boundary (moving weights is not timed). Units whose weights have the same shapes and
    dtypes (a decoder's layers) run on one set of them, moved to the device when the shapes
    change, so the device holds one distinct unit's weights at a time. `caches`: the
    per-layer cache tensors a decoder's units read."""
    device = torch.device(device)
    caches = caches or {}
    units = offload_units(graph)
    use_kernels(graph, device)  # the linear_wq layers run as the executor runs them

    def tensor(name: str) -> torch.Tensor:
        return caches[name] if name in caches else graph.get_weight(name)

    signatures = [tuple((t.shape, t.dtype) for t in map(tensor, u.weights)) for u in units]
    loaded: dict[tuple, list[torch.Tensor]] = {}
    # the write-back's cost: every layer written into one layer's K and V on the device
    written = {kind: caches[f"{KV_PREFIX}.{kind}0"].to(device) for kind in "kv"} if caches else {}

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def one_run() -> tuple[list[float], float]:
        seconds = [0.0] * len(units)
        moving = 0.0  # weights moved to the device: not compute
        current: list = []  # [unit index, its start]

        def weights(index: int, block: Block) -> dict[str, torch.Tensor]:
            nonlocal moving
            now = sync()
            if current:
                seconds[current[0]] = now - current[1]
            key = signatures[index]
            if key not in loaded:
                loaded.clear()
                loaded[key] = [tensor(w).to(device) for w in units[index].weights]
            start = sync()
            moving += start - now
            current[:] = [index, start]
            return dict(zip(units[index].weights, loaded[key]))

        began = sync()
        runner = BlockRunner(
            graph,
            [tuple(t.to(device) for t in inputs)],
            device,
            blocks=[u.block for u in units],
            activations="device",
            description="offload timing",
            weights=weights,
        )
        runner.run()
        outputs = [runner.store.get(n, 0) for n in graph.output_nodes()]
        if current:
            seconds[current[0]] = sync() - current[1]
        if written:  # a decoder: logits, new keys, new values
            logits, new_k, new_v = outputs
            kind = len(KV_PREFIX) + 1  # offload_kv.k3 -> "k"
            write_back(lambda name: written[name[kind]], new_k, new_v, inputs[1].to(device))
            logits[:, -1].argmax(dim=-1)
        return seconds, sync() - began - moving - sum(seconds)

    with torch.no_grad():
        one_run()  # warm-up: allocator, kernels, caches
        timed = [one_run() for _ in range(runs)]
    loaded.clear()
    written.clear()
    return ComputeTimes(
        [statistics.median(run[0][u] for run in timed) for u in range(len(units))],
        statistics.median(run[1] for run in timed),
    )


def offload_step(artifact: Any, transfers: Transfers | torch.device | str) -> OffloadStep:
    """The Generator step of a decoder artifact compiled with the offload pass."""
    plan = artifact.manifest.get(PLAN_KEY)
    if plan is None:
        raise PeakcError(f"artifact {artifact.directory} has no offload plan")
    graph = artifact.to_graph()
    graph.info["generation"] = artifact.manifest["generation"]
    # repacked before the device's peak memory counts from zero (it may repack on the GPU)
    kernels = "triton" in plan.get("linear_wq", {}).values()
    runnable = executor_graph(graph, kernels=kernels)
    if not isinstance(transfers, Transfers):
        transfers = CudaTransfers(transfers)
    executor = OffloadExecutor(runnable, plan, transfers)
    return OffloadStep(executor, artifact.manifest["generation"])
