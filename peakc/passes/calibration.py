"""Block-sequential calibration: per-linear statistics measured one block at a time.

For each block: run it on every calibration sample while accumulating, per target linear,
the Hessian H = 2·X·Xᵀ / n (fp32, one per distinct input, so q/k/v share one); hand the
Hessians to a compression callback that may return new weights; the block then runs with the
new weights, so the next block sees the compressed block's outputs (SparseGPT, GPTQ).

Blocks are run by the runtime's block runner (peakc/runtime/blocks.py: `BlockRunner`, its
activation store and CUDA-graph replays); the Hessians are measured in its per-block hook,
and `variant_losses` forks a run per probed block and scores the logits as they are made.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir.graph import MODULE_KEY, Block, Graph
from peakc.progress import ProgressFn, silent
from peakc.runtime.blocks import ActivationStore, BlockRunner, BlockStep, block_env, run_nodes

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
    progress: ProgressFn = silent,
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
    runner = BlockRunner(
        graph,
        samples,
        device,
        blocks=blocks[: last + 1],
        activations=activations,
        description=description,
    )
    run.activations_on = "device" if runner.store.on_device else "host"

    def compress_block(step: BlockStep) -> None:
        """Measure the Hessians of the block's target linears and let `compress` replace
        their weights, stage by stage when `stagewise`."""
        sites = block_sites[step.index]
        groups = block_stages(sites) if stagewise else [sites] if sites else []
        for group in groups:
            measure = _stage_hessians if stagewise else _accumulate_hessians
            hessians, tokens = measure(step.block, group, step.store, step.weights, step.nsamples)
            cal = BlockCalibration(graph, step.block, step.index, group, hessians, tokens, device)
            new = compress(cal) or {}
            for name, value in new.items():
                old = graph.get_weight(name)
                graph.set_weight(name, value.detach().to("cpu", old.dtype))
                step.weights[name] = value.detach().to(device, old.dtype)
            del hessians
            run.sites += len(group)
        run.blocks.append(step.block.name)

    runner.run(compress_block, progress=progress)
    return run


def variant_losses(
    graph: Graph,
    samples: list[tuple[torch.Tensor, ...]],
    variants: dict[int, dict[str, torch.Tensor]],
    loss: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], float],
    *,
    device: torch.device | str = "cpu",
    progress: ProgressFn = silent,
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
    logits = graph.output_nodes()[0]
    runner = BlockRunner(
        graph,
        samples,
        device,
        runs=len(variants) + 1,
        score=(logits, lambda value, i: loss(value, samples[i])),
        cuda_graphs=cuda_graphs,
        description=description,
    )

    def fork_variant(step: BlockStep) -> None:
        if step.index in variants:
            step.fork(step.index, variants[step.index])

    totals = runner.run(fork_variant, progress=progress)
    return totals.pop(None), totals


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
        env = block_env(block, store, weights, i)
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
        env = block_env(block, store, weights, i)
        with torch.no_grad():
            run_nodes(block.nodes, env, weights, store.device, record)
    for src, h in by_input.items():
        h.mul_(2.0 / max(rows[src], 1))
    return {s.module: by_input[s.input] for s in sites}, rows[sites[0].input]


def _first_reader(src: fx.Node, watched: set[fx.Node]) -> fx.Node:
    return next(u for u in src.users if u in watched)


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
