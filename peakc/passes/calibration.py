"""Block-sequential calibration: run the graph one block (transformer layer) at a time.

For each block: run it on every calibration sample while accumulating, per target linear,
the Hessian H = 2·X·Xᵀ / n (fp32, one per distinct input, so q/k/v share one); hand the
Hessians to a compression callback that may return new weights; re-run the block with the
new weights, so the next block sees the compressed block's outputs (SparseGPT, GPTQ).

Blocks are run by a small interpreter over the graph's own nodes, so they work on any
device: weights are moved there once per block and `device=` arguments baked into the
graph (arange, zeros, ...) are redirected. Values that cross blocks are kept on the device,
or in host memory when all samples' values would not fit (streamed back per sample).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir.graph import MODULE_KEY, Block, Graph

aten = torch.ops.aten
_NUMBERED_LAYER = re.compile(r"\.\d+(\.|$)")


@dataclass
class LinearSite:
    """One aten.linear whose weight is a graph weight."""

    node: fx.Node
    module: str  # module path, e.g. model.layers.0.mlp.down_proj
    weight: str  # weight name (module path of the parameter)
    input: fx.Node  # the node whose value the linear reads


@dataclass
class BlockCalibration:
    """What a compression callback sees for one block."""

    graph: Graph
    block: Block
    index: int
    sites: list[LinearSite]
    hessians: dict[str, torch.Tensor]  # by module path; linears sharing an input share H
    tokens: int  # rows of X accumulated into each Hessian
    device: torch.device

    def weight(self, site: LinearSite) -> torch.Tensor:
        """The site's current weight on the compute device, in fp32."""
        return self.graph.get_weight(site.weight).to(self.device, torch.float32)


CompressFn = Callable[[BlockCalibration], dict[str, torch.Tensor] | None]


@dataclass
class CalibrationRun:
    """What the engine did: blocks visited, sites seen, where activations lived."""

    blocks: list[str] = field(default_factory=list)
    sites: int = 0
    activations_on: str = "device"
    device: str = "cpu"


def default_targets(module: str) -> bool:
    """Linears inside numbered layers (`model.layers.3...`): not the embedding or output head."""
    return bool(_NUMBERED_LAYER.search(module))


def target_selector(targets: str, owner: str) -> Callable[[str], bool]:
    """The linears a calibrating pass compresses: `targets` as a regex searched in the module
    path, or default_targets when empty; a bad regex is an error naming the pass's option."""
    if not targets:
        return default_targets
    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise PeakcError(f"pass '{owner}': option 'targets' is not a regex: {exc}") from None
    return lambda module: bool(pattern.search(module))


def linear_sites(
    graph: Graph, nodes: list[fx.Node], select: Callable[[str], bool]
) -> list[LinearSite]:
    """The aten.linear nodes among `nodes` whose weight is a get_attr and whose module matches."""
    sites = []
    for node in nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        x, w = node.args[0], node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        module = node.meta.get(MODULE_KEY, "") or w.target.rsplit(".", 1)[0]
        if select(module):
            sites.append(LinearSite(node, module, w.target, x))
    return sites


def compute_device(ctx_device: str | None) -> torch.device:
    """ctx.device when it names an accelerator, else CUDA when there is one, else CPU."""
    if ctx_device and ctx_device != "cpu":
        return torch.device(ctx_device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def calibrate_blocks(
    graph: Graph,
    samples: list[tuple[torch.Tensor, ...]],
    compress: CompressFn,
    *,
    select: Callable[[str], bool] = default_targets,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str = "calibrating",
    activations: str = "auto",
    stagewise: bool = False,
) -> CalibrationRun:
    """Run `graph` block by block over `samples` (each a tuple of graph inputs), calling
    `compress` for every block with target linears; its returned weights replace the graph's.

    `stagewise`: call `compress` once per stage of a block (the linears reading one value, in
    graph order: q/k/v, then o, then gate/up, then down), each stage's Hessians measured with
    the earlier stages' new weights in place (GPTQ's sequential order within a block).

    `activations`: "device" keeps cross-block values on the compute device, "host" streams
    them from host memory per sample, "auto" picks host only when they would not fit."""
    device = torch.device(device)
    if not samples:
        raise PeakcError(f"{description}: no calibration samples")
    inputs = graph.input_nodes()
    for s in samples:
        if len(s) != len(inputs):
            raise PeakcError(
                f"{description}: a sample has {len(s)} inputs, graph takes {len(inputs)}"
            )
    blocks = graph.blocks()
    block_sites = [linear_sites(graph, b.nodes, select) for b in blocks]
    last = max((i for i, s in enumerate(block_sites) if s), default=-1)
    run = CalibrationRun(device=str(device))
    if last < 0:
        return run
    blocks = blocks[: last + 1]
    needed_after = _last_use(graph, blocks)
    if activations not in ("auto", "device", "host"):
        raise PeakcError(f"{description}: activations must be auto, device or host")
    on_device = activations == "device" or (
        activations == "auto" and _fits_on_device(blocks, len(samples), device, needed_after)
    )
    store = ActivationStore(device, on_device)
    run.activations_on = "device" if store.on_device else "host"
    for node, sample_values in zip(inputs, zip(*samples)):
        store.put(node, list(sample_values))

    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=len(blocks))
        for index, (block, sites) in enumerate(zip(blocks, block_sites)):
            bar.update(task, description=f"{description} {block.name}")
            weights = _block_weights(graph, block, device)
            groups = block_stages(sites) if stagewise else [sites] if sites else []
            for group in groups:
                measure = _stage_hessians if stagewise else _accumulate_hessians
                hessians, tokens = measure(block, group, store, weights, len(samples))
                cal = BlockCalibration(graph, block, index, group, hessians, tokens, device)
                new = compress(cal) or {}
                for name, value in new.items():
                    old = graph.get_weight(name)
                    graph.set_weight(name, value.detach().to("cpu", old.dtype))
                    weights[name] = value.detach().to(device, old.dtype)
                del hessians
                run.sites += len(group)
            _run_block(block, store, weights, len(samples))
            run.blocks.append(block.name)
            store.drop([n for n, i in needed_after.items() if i == index])
            bar.advance(task)
    return run


def variant_losses(
    graph: Graph,
    samples: list[tuple[torch.Tensor, ...]],
    variants: dict[int, dict[str, torch.Tensor]],
    loss: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], float],
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str = "probing",
    cuda_graphs: bool = True,
) -> tuple[float, dict[int, float]]:
    """`loss(first output, sample)` summed over `samples`, for the graph as it is and for each
    variant: block index (in `graph.blocks()`) → new weights for that block alone.

    All runs advance block by block together: a variant's block reads the unchanged run's
    inputs to it, and the blocks after it are the unchanged ones. With n blocks that is about
    n²/2 block runs instead of n whole forwards; no run keeps its logits (each sample's loss
    is taken as soon as its logits exist). On CUDA (`cuda_graphs`) each block is recorded once
    per set of weights as a CUDA graph and replayed per sample (BlockReplay): the probes run
    ~n²/2 · samples blocks, and launching their kernels one by one is what costs."""
    device = torch.device(device)
    blocks = graph.blocks()
    logits = graph.output_nodes()[0]
    needed_after = _last_use(graph, blocks)
    nsamples = len(samples)
    runs_at_once = nsamples * (len(variants) + 1)
    on_device = _fits_on_device(blocks, runs_at_once, device, needed_after, skip=(logits,))
    base = ActivationStore(device, on_device)
    for node, values in zip(graph.input_nodes(), zip(*samples)):
        base.put(node, list(values))
    score = (logits, lambda value, i: loss(value, samples[i]))
    runs: dict[int | None, ActivationStore] = {None: base}
    totals: dict[int | None, float] = {None: 0.0}
    graphs = cuda_graphs and device.type == "cuda"

    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=len(blocks))
        for index, block in enumerate(blocks):
            weights = _block_weights(graph, block, device)
            replays: dict[int, BlockReplay | None] | None = {} if graphs else None
            started = {}
            if index in variants:
                store = ActivationStore(device, on_device, parent=base)
                changed = dict(weights)
                for name, value in variants[index].items():
                    changed[name] = value.to(device, weights[name].dtype)
                totals[index] = _run_block(block, store, changed, nsamples, score, replays)
                started[index] = store
            for key, store in runs.items():
                totals[key] += _run_block(block, store, weights, nsamples, score, replays)
            runs.update(started)
            done = [n for n, i in needed_after.items() if i == index]
            for store in runs.values():
                store.drop(done)
            bar.advance(task)
    return totals.pop(None), totals


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
    """Evaluate call_function/get_attr nodes into `env` (which holds their inputs)."""

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


def _block_weights(graph: Graph, block: Block, device: torch.device) -> dict[str, torch.Tensor]:
    nodes = [*block.nodes, *block.inputs]
    return {n.target: graph.get_weight(n.target).to(device) for n in nodes if n.op == "get_attr"}


def block_stages(sites: list[LinearSite]) -> list[list[LinearSite]]:
    """Sites grouped by the value they read, in the graph order of each group's first site."""
    stages: dict[fx.Node, list[LinearSite]] = {}
    for site in sites:
        stages.setdefault(site.input, []).append(site)
    return list(stages.values())


def _stage_hessians(
    block: Block,
    stage: list[LinearSite],
    store: ActivationStore,
    weights: dict[str, torch.Tensor],
    nsamples: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """H = 2·XᵀX/n of the stage's shared input, running the block only as far as it needs."""
    source = stage[0].input
    first = stage[0].node
    stop = block.nodes.index(first)
    prefix = block.nodes[:stop]
    h: torch.Tensor | None = None
    rows = 0
    for i in range(nsamples):
        env = _block_env(block, store, weights, i)
        with torch.no_grad():
            run_nodes(prefix, env, weights, store.device)
        x = env[source] if source in env else None
        if x is None:
            raise PeakcError(f"block {block.name}: input of {stage[0].module} was not computed")
        flat = x.reshape(-1, x.shape[-1]).float()
        if h is None:
            h = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
        h.addmm_(flat.t(), flat)
        rows += flat.shape[0]
    h.mul_(2.0 / max(rows, 1))
    return {s.module: h for s in stage}, rows


def _accumulate_hessians(
    block: Block,
    sites: list[LinearSite],
    store: ActivationStore,
    weights: dict[str, torch.Tensor],
    nsamples: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """Run the block on every sample, summing XᵀX per distinct linear input; H = 2·XᵀX / n."""
    by_input: dict[fx.Node, torch.Tensor] = {}
    rows: dict[fx.Node, int] = {}
    watched = {s.node for s in sites}

    def record(node: fx.Node, x: torch.Tensor) -> None:
        if node not in watched:
            return
        src = node.args[0]
        if src in by_input and node is not _first_reader(src, watched):
            return  # linears reading the same value share one Hessian
        flat = x.reshape(-1, x.shape[-1]).float()
        if src not in by_input:
            by_input[src] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
            rows[src] = 0
        by_input[src].addmm_(flat.t(), flat)
        rows[src] += flat.shape[0]

    for i in range(nsamples):
        env = _block_env(block, store, weights, i)
        with torch.no_grad():
            run_nodes(block.nodes, env, weights, store.device, record)
    for src, h in by_input.items():
        h.mul_(2.0 / max(rows[src], 1))
    return {s.module: by_input[s.input] for s in sites}, rows[sites[0].input]


def _first_reader(src: fx.Node, watched: set[fx.Node]) -> fx.Node:
    return next(u for u in src.users if u in watched)


def _run_block(
    block: Block,
    store: ActivationStore,
    weights: dict[str, torch.Tensor],
    nsamples: int,
    score: tuple[fx.Node, Callable[[torch.Tensor, int], float]] | None = None,
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
        env = _block_env(block, store, weights, i)
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


def _block_env(
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


def _last_use(graph: Graph, blocks: list[Block]) -> dict[fx.Node, int]:
    """For each value crossing blocks, the index of the last block that reads it."""
    last: dict[fx.Node, int] = {}
    for i, block in enumerate(blocks):
        for n in block.inputs:
            last[n] = i
    return last


def _fits_on_device(
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


def calibration_samples(
    graph: Graph, data: object, nsamples: int, seq_len: int, seed: int, owner: str
) -> list[tuple[torch.Tensor, ...]]:
    """Token windows from the calibration data, as input tuples for `graph`.

    A forward graph takes token ids [batch, seq] at its captured (static) length. A generation
    decoder (peakc/models/kv_cache.py: dynamic sequence length) takes each window as a prefill
    from an empty cache: (ids [1, seq], positions, k_cache, v_cache); `seq_len` 0 means 512,
    capped by the cache length. The empty caches are one shared tensor pair.
    """
    from peakc.data import calibration_windows

    layout = graph.info.get("generation")
    if layout is not None:
        seq_len = seq_len or min(512, layout["max_seq_len"])
        if seq_len > layout["max_seq_len"]:
            raise PeakcError(
                f"{owner}: seq_len={seq_len} exceeds the decoder's cache of "
                f"{layout['max_seq_len']} tokens"
            )
        windows = calibration_windows(data, nsamples, seq_len, seed, owner)
        from peakc.models.kv_cache import CacheLayout, empty_cache

        cache = empty_cache(CacheLayout(**{**layout, "max_batch": 1}), batch=1)
        positions = torch.arange(seq_len).view(1, seq_len)
        return [(windows[i : i + 1], positions, cache, cache) for i in range(len(windows))]
    inputs = graph.example_inputs
    if len(inputs) != 1 or inputs[0].dim() != 2 or inputs[0].dtype != torch.int64:
        raise PeakcError(
            f"{owner}: calibration needs a graph whose one input is token ids [1, seq]"
        )
    captured = int(inputs[0].shape[1])
    seq_len = seq_len or captured
    if seq_len != captured:
        raise PeakcError(
            f"{owner}: seq_len={seq_len} but the graph was captured at sequence length "
            f"{captured}; capture at the calibration length (peakc compile --seq-len {seq_len})"
        )
    windows = calibration_windows(data, nsamples, seq_len, seed, owner)
    batch = inputs[0].shape[0]
    return [(windows[i : i + batch],) for i in range(0, len(windows) - batch + 1, batch)]


def damped_inverse_factor(
    hessian: torch.Tensor, damp: float, layer: str, owner: str
) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, as SparseGPT and GPTQ use it.

    While H is not positive definite (or the factor not finite), damping grows tenfold with a
    warning naming the layer; a Hessian that stays singular is an error, never NaN weights.
    """
    import warnings

    h = hessian
    mean_diag = h.diagonal().mean()
    eye = torch.eye(h.shape[0], device=h.device)
    level = damp
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + (level * mean_diag) * eye)
        if int(info) == 0:
            factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(factor).all()):
                return factor
        raised = level * 10 if level > 0 else 0.01
        warnings.warn(
            f"{owner}: Hessian of {layer} is not positive definite with damp={level:g}; "
            f"retrying with damp={raised:g}",
            stacklevel=3,
        )
        level = raised
    raise PeakcError(f"{owner}: Hessian of {layer} stays singular even with damp={level:g}")
