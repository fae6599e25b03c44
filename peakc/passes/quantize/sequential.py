"""True-sequential calibration inside each block, on top of the block-sequential engine.

The engine (`peakc.passes.calibration.calibrate_blocks`) collects every Hessian of a block
from the block's input before compressing any of its linears. GPTQ is better when a block
is quantized stage by stage: q/k/v first, then o from the outputs of the quantized q/k/v,
then gate/up, then down. A stage is the set of linears reading one value, in graph order.
For each stage this driver re-runs the block's nodes only up to that stage's linears, with
the earlier stages' new weights in place, then hands the stage to the same callback type the
engine uses (`BlockCalibration`), and finally runs the whole block once to feed the next.

It reuses the engine's activation store, node interpreter, site finder and per-block helpers;
only the stage loop is new (the engine has no per-stage hook to call instead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir.graph import Block, Graph
from peakc.passes.calibration import (
    ActivationStore,
    BlockCalibration,
    CalibrationRun,
    CompressFn,
    LinearSite,
    _block_env,
    _block_weights,
    _fits_on_device,
    _last_use,
    _run_block,
    default_targets,
    linear_sites,
    run_nodes,
)


def block_stages(sites: list[LinearSite]) -> list[list[LinearSite]]:
    """Sites grouped by the value they read, in the graph order of each group's first site."""
    stages: dict[fx.Node, list[LinearSite]] = {}
    for site in sites:
        stages.setdefault(site.input, []).append(site)
    return list(stages.values())


def calibrate_stages(
    graph: Graph,
    samples: list[tuple[torch.Tensor, ...]],
    compress: CompressFn,
    *,
    select: Callable[[str], bool] = default_targets,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str = "calibrating",
) -> CalibrationRun:
    """Like `calibrate_blocks`, but `compress` is called once per stage of each block, and
    each stage's Hessians are measured after the earlier stages' weights were replaced."""
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
    store = ActivationStore(device, _fits_on_device(blocks, len(samples), device))
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
            for stage in block_stages(sites):
                hessians, tokens = _stage_hessians(block, stage, store, weights, len(samples))
                cal = BlockCalibration(graph, block, index, stage, hessians, tokens, device)
                new = compress(cal) or {}
                for name, value in new.items():
                    old = graph.get_weight(name)
                    graph.set_weight(name, value.detach().to("cpu", old.dtype))
                    weights[name] = value.detach().to(device, old.dtype)
                del hessians
                run.sites += len(stage)
            _run_block(block, store, weights, len(samples))
            run.blocks.append(block.name)
            store.drop([n for n, i in needed_after.items() if i == index])
            bar.advance(task)
    return run


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
