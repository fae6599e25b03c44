"""Running a Graph block by block (`Graph.blocks()`: one block per transformer layer).

`BlockRunner` is the one block-sequential executor: each block runs on every sample before
the next block starts, so only one block's weights need to be on the device at a time, and
the values that cross blocks live in an `ActivationStore` (on the device, or in host memory
when all samples' values would not fit, streamed back per sample). A per-block hook sees each
block before it runs and may change its weights (calibration compresses them) or fork runs
that take the block with other weights (sensitivity probes); an optional score consumes a
node's value as soon as a block makes it (the probes' logits). On CUDA a block can be
recorded once as a CUDA graph and replayed per sample (`BlockReplay`).

Nodes are evaluated by a small interpreter over the graph's own nodes (`run_nodes`), so any
device works: weights are moved there once per block and `device=` arguments baked into the
graph (arange, zeros, ...) are redirected. `run_graph` runs a whole graph the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir.graph import Block, Graph
from peakc.progress import ProgressFn, silent

aten = torch.ops.aten

# (node, fn(value, sample index) -> float): a value scored where it is made instead of kept.
Score = tuple[fx.Node, Callable[[torch.Tensor, int], float]]


@dataclass
class BlockStep:
    """What the per-block hook sees before the block runs on every sample."""

    index: int  # in the runner's blocks
    block: Block
    weights: dict[str, torch.Tensor]  # on the device; the hook may replace entries
    store: ActivationStore  # the main run's values: this block's inputs per sample
    nsamples: int
    forks: dict[Hashable, dict[str, torch.Tensor]] = field(default_factory=dict)

    def fork(self, key: Hashable, changed: dict[str, torch.Tensor]) -> None:
        """Start run `key`: this block with `changed` over the block's weights, then the main
        run's blocks after it; it reads the main run's inputs to this block."""
        weights = dict(self.weights)
        for name, value in changed.items():
            weights[name] = value.to(self.store.device, self.weights[name].dtype)
        self.forks[key] = weights


BlockHook = Callable[[BlockStep], None]
# (block index, block) -> the block's weights on the device (default: `block_weights`)
WeightSource = Callable[[int, Block], dict[str, torch.Tensor]]


class BlockRunner:
    """Runs `blocks` (default: all of `graph.blocks()`) over `samples`, each a tuple of graph
    inputs, block after block; the main run is keyed None, forked runs by their hook's key.

    `activations`: "device" keeps cross-block values on the device, "host" streams them from
    host memory per sample, "auto" picks host only when `runs` runs' values would not fit.
    `score`: a node whose value is scored per sample instead of kept; each run's scores are
    summed. `cuda_graphs`: on CUDA, record each block once per set of weights and replay it.
    `weights`: where each block's weights come from (the offload executor hands out streamed
    copies); by default the graph's own, moved to the device."""

    def __init__(
        self,
        graph: Graph,
        samples: list[tuple[torch.Tensor, ...]],
        device: torch.device | str,
        *,
        blocks: list[Block] | None = None,
        activations: str = "auto",
        runs: int = 1,
        score: Score | None = None,
        cuda_graphs: bool = False,
        description: str = "running",
        weights: WeightSource | None = None,
    ) -> None:
        if activations not in ("auto", "device", "host"):
            raise PeakcError(f"{description}: activations must be auto, device or host")
        self.graph = graph
        self.device = torch.device(device)
        self.blocks = graph.blocks() if blocks is None else blocks
        self.nsamples = len(samples)
        self.needed_after = last_use(graph, self.blocks)
        self.score = score
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.description = description
        self.weights = weights or (lambda index, block: block_weights(graph, block, self.device))
        skip = (score[0],) if score is not None else ()
        on_device = activations == "device" or (
            activations == "auto"
            and fits_on_device(
                self.blocks, self.nsamples * runs, self.device, self.needed_after, skip
            )
        )
        self.store = ActivationStore(self.device, on_device)
        for node, values in zip(graph.input_nodes(), zip(*samples)):
            self.store.put(node, list(values))

    def run(
        self, before_block: BlockHook | None = None, progress: ProgressFn = silent
    ) -> dict[Hashable, float]:
        """Every block on every sample, `before_block` first; each run's summed score (0.0
        without one), the main run under None. Values no later block reads are dropped.
        `progress` makes the task that advances once per block (silent by default)."""
        runs: dict[Hashable, ActivationStore] = {None: self.store}
        totals: dict[Hashable, float] = {None: 0.0}
        nsamples, score = self.nsamples, self.score
        with progress(self.description, len(self.blocks)) as task:
            for index, block in enumerate(self.blocks):
                weights = self.weights(index, block)
                step = BlockStep(index, block, weights, self.store, self.nsamples)
                if before_block is not None:
                    before_block(step)
                replays: dict[int, BlockReplay | None] | None = {} if self.cuda_graphs else None
                started = {}
                for key, changed in step.forks.items():
                    store = ActivationStore(self.device, self.store.on_device, parent=self.store)
                    totals[key] = run_block(block, store, changed, nsamples, score, replays)
                    started[key] = store
                for key, store in runs.items():
                    totals[key] += run_block(block, store, step.weights, nsamples, score, replays)
                runs.update(started)
                done = [n for n, i in self.needed_after.items() if i == index]
                for store in runs.values():
                    store.drop(done)
                task.advance()
        return totals


def run_block(
    block: Block,
    store: ActivationStore,
    weights: dict[str, torch.Tensor],
    nsamples: int,
    score: Score | None = None,
    replays: dict[int, BlockReplay | None] | None = None,
) -> float:
    """Run the block on every sample and keep its outputs for the blocks after it.

    `score` (node, fn(value, sample index)): where the block makes that node's value it is
    scored at once instead of kept (the probes' logits); the scores' sum is returned.
    `replays` (CUDA): this block's recorded graphs by id of their weights, shared by runs."""
    scored = score[0] if score is not None else None
    kept = [n for n in block.outputs if n is not scored]
    outputs: dict[fx.Node, list] = {n: [] for n in kept}
    total = 0.0
    for i in range(nsamples):
        env = block_env(block, store, weights, i)
        replay = None
        if replays is not None:
            if id(weights) not in replays:
                replays[id(weights)] = BlockReplay.record(block, weights, env, store.device)
            replay = replays[id(weights)]
        if replay is not None and replay.accepts(env):
            env = replay.run(env)  # its buffers are overwritten by the next replay: copy
            for n in kept:
                outputs[n].append(env[n].clone() if torch.is_tensor(env[n]) else env[n])
        else:
            with torch.no_grad():
                run_nodes(block.nodes, env, weights, store.device)
            for n in kept:
                outputs[n].append(env[n])
        if scored in env:
            total += score[1](env[scored], i)
    for n, values in outputs.items():
        store.put(n, values)
    return total


class BlockReplay:
    """A block's nodes recorded once as a CUDA graph, replayed for each sample."""

    def __init__(self, env: dict[fx.Node, object], inputs: list[fx.Node]) -> None:
        self.env = env  # static input buffers, then the recorded values of every node
        self.inputs = inputs  # the tensor inputs copied in before each replay
        self.graph = torch.cuda.CUDAGraph()

    @classmethod
    def record(
        cls,
        block: Block,
        weights: dict[str, torch.Tensor],
        env: dict[fx.Node, object],
        device: torch.device,
    ) -> BlockReplay | None:
        """Warm up, then record on a copy of `env`; None when the block cannot be recorded.

        capture_begin/end directly: torch.cuda.graph() also runs gc.collect() for each
        recording, which costs more than the replays save here."""
        inputs = [n for n in block.inputs if n.op != "get_attr" and torch.is_tensor(env[n])]
        replay = cls({n: env[n].clone() if n in inputs else env[n] for n in block.inputs}, inputs)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side), torch.no_grad():
                run_nodes(block.nodes, dict(replay.env), weights, device)  # warm-up
                replay.graph.capture_begin()
                try:
                    run_nodes(block.nodes, replay.env, weights, device)
                finally:
                    replay.graph.capture_end()
        except RuntimeError:
            return None  # an op that syncs with the host or allocates by data: interpret it
        finally:
            torch.cuda.current_stream(device).wait_stream(side)
        return replay

    def accepts(self, env: dict[fx.Node, object]) -> bool:
        """Whether `env` has the recorded input shapes and the same non-tensor inputs."""
        for n, value in env.items():
            recorded = self.env[n]
            if n in self.inputs:
                if value.shape != recorded.shape or value.dtype != recorded.dtype:
                    return False
            elif not torch.is_tensor(recorded) and value != recorded:
                return False
        return True

    def run(self, env: dict[fx.Node, object]) -> dict[fx.Node, object]:
        """Copy the sample's inputs in, replay; the returned values live until the next run."""
        for n in self.inputs:
            self.env[n].copy_(env[n])
        self.graph.replay()
        return self.env


class ActivationStore:
    """Per-sample values of nodes that cross blocks, on the device or in (pinned) host memory."""

    def __init__(
        self, device: torch.device, on_device: bool, parent: ActivationStore | None = None
    ) -> None:
        self.device = device
        self.on_device = on_device
        self.values: dict[fx.Node, list] = {}
        self.parent = parent  # values this store lacks are read from it

    def put(self, node: fx.Node, values: list) -> None:
        self.values[node] = [self._park(v) for v in values]

    def get(self, node: fx.Node, i: int):
        if node not in self.values and self.parent is not None:
            return self.parent.get(node, i)
        v = self.values[node][i]
        return v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v

    def __contains__(self, node: fx.Node) -> bool:
        return node in self.values or (self.parent is not None and node in self.parent)

    def drop(self, nodes: list[fx.Node]) -> None:
        for n in nodes:
            self.values.pop(n, None)

    def _park(self, v):
        if not isinstance(v, torch.Tensor):
            return v
        if self.on_device:
            return v.to(self.device)
        v = v.to("cpu")
        return v.pin_memory() if self.device.type == "cuda" else v


def run_nodes(
    nodes: list[fx.Node],
    env: dict[fx.Node, object],
    weights: dict[str, torch.Tensor],
    device: torch.device,
    on_linear: Callable[[fx.Node, torch.Tensor], None] | None = None,
) -> None:
    """Evaluate call_function/get_attr nodes into `env` (which holds their inputs);
    `on_linear(node, input)` is called before each aten.linear runs."""

    def value(n: fx.Node):
        return env[n]

    for node in nodes:
        if node.op == "get_attr":
            env[node] = weights[node.target]
            continue
        if node.op != "call_function":
            raise PeakcError(f"node '{node.name}': cannot run {node.op} in a block")
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs = {**kwargs, "device": device}
        if on_linear is not None and node.target is aten.linear.default:
            on_linear(node, args[0])
        env[node] = node.target(*args, **kwargs)


def run_graph(graph: Graph, inputs: tuple[torch.Tensor, ...], device: torch.device | str):
    """The whole graph on `device` with the block interpreter; returns the outputs tuple."""
    device = torch.device(device)
    env: dict[fx.Node, object] = {n: t.to(device) for n, t in zip(graph.input_nodes(), inputs)}
    nodes = [n for n in graph.graph.nodes if n.op in ("get_attr", "call_function")]
    weights = {n.target: graph.get_weight(n.target).to(device) for n in nodes if n.op == "get_attr"}
    with torch.no_grad():
        run_nodes(nodes, env, weights, device)
    return tuple(fx.node.map_arg(graph.output_nodes(), env.__getitem__))


def block_weights(graph: Graph, block: Block, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights the block reads (its own and other blocks' it uses), on `device`."""
    nodes = [*block.nodes, *block.inputs]
    return {n.target: graph.get_weight(n.target).to(device) for n in nodes if n.op == "get_attr"}


def block_env(
    block: Block, store: ActivationStore, weights: dict[str, torch.Tensor], i: int
) -> dict[fx.Node, object]:
    """Sample i's values of the block's inputs (weights of other blocks included)."""
    env: dict[fx.Node, object] = {}
    for n in block.inputs:
        if n.op == "get_attr":
            env[n] = weights[n.target]
        elif n in store:
            env[n] = store.get(n, i)
        else:
            raise PeakcError(f"block {block.name}: input '{n.name}' was not computed earlier")
    return env


def last_use(graph: Graph, blocks: list[Block]) -> dict[fx.Node, int]:
    """For each value crossing blocks, the index of the last block that reads it."""
    last: dict[fx.Node, int] = {}
    for i, block in enumerate(blocks):
        for n in block.inputs:
            last[n] = i
    return last


def fits_on_device(
    blocks: list[Block],
    nsamples: int,
    device: torch.device,
    needed_after: dict[fx.Node, int],
    skip: tuple[fx.Node, ...] = (),
) -> bool:
    """Whether `nsamples` samples' cross-block values fit in half the device's free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return peak_bytes(blocks, needed_after, skip) * nsamples < free // 2


def peak_bytes(
    blocks: list[Block], needed_after: dict[fx.Node, int], skip: tuple[fx.Node, ...] = ()
) -> int:
    """The most bytes of one sample's cross-block values alive at once between two blocks
    (outputs that no later block reads stay to the end, except those in `skip`)."""
    made = {n: i for i, b in enumerate(blocks) for n in b.outputs if n not in skip}
    peak = 0
    for j in range(len(blocks)):
        live = 0
        for n, i in made.items():
            val = n.meta.get("val")
            if i <= j < needed_after.get(n, len(blocks)) and isinstance(val, torch.Tensor):
                live += val.numel() * val.element_size()
        peak = max(peak, live)
    return peak
