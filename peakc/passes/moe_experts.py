"""compress_moe's working parts: the experts (linears of all-active experts, stacked weights
of routed ones), routing-aware calibration, the ternary/2-bit solver (GPTQ batched over
experts), the dictionary code over all experts, and the rewrites into
peakc::linear_compressed and peakc::grouped_mm_compressed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir.dictionary_code import (
    TERNARY,
    TWO_BIT,
    CompressedRows,
    ParseTree,
    count_entropy_bits,
    decode,
    encode,
    tunstall,
)
from peakc.ir.experts import expert_of
from peakc.ir.graph import Graph
from peakc.ir.ops import GROUPED_MM, GROUPED_MM_COMPRESSED, LINEAR_COMPRESSED
from peakc.passes.calibration import (
    BlockCalibration,
    LinearSite,
    calibrate_blocks,
    linear_sites,
    target_selector,
)
from peakc.passes.compress import Stack, block_stacks, reconstruction_error
from peakc.passes.quantize.gptq import QuantizedWeight, gptq_quantize_batched, rtn_quantize
from peakc.passes.quantize.grid import GridSpec
from peakc.progress import ProgressFn
from peakc.runtime.blocks import BlockRunner, BlockStep, block_env, run_nodes

if TYPE_CHECKING:
    from peakc.passes.compress_moe import CompressMoEOptions

MOE_KEY = "peakc_compress_moe"  # node.meta of each compressed node: levels, experts, tokens
TABLE_WEIGHT = "moe_code.table"  # the one code table every compressed expert reads
CODE_CHUNK = 1 << 25  # levels coded per encode call (bounds its int64 scratch to ~1 GB)


@dataclass
class TernarySpec(GridSpec):
    """Three levels per row, {-s, 0, s}: codes 0, 1, 2 around the zero point 1 (GridSpec's
    symmetric grid with maxq 2, so GPTQ's solver runs unchanged)."""

    @property
    def maxq(self) -> int:
        return 2


@dataclass
class RoutedSite:
    """Routed experts stacked in one weight: `peakc::grouped_mm(x, permute(W, [0, 2, 1]),
    offsets)` with W [E, N, K] a graph weight, expert e's linear weight being W[e]
    (transformers' layout for Mixtral, Qwen2-MoE, OLMoE)."""

    node: fx.Node  # the grouped_mm call
    module: str  # the stacked weight's path, e.g. model.layers.0.mlp.experts.gate_up_proj
    weight: str
    input: fx.Node  # x [T, K], tokens sorted by expert
    offsets: fx.Node  # [E] cumulative tokens per expert
    view: fx.Node  # the permute between weight and call (dropped with the weight)
    experts: int

    def expert_name(self, e: int) -> str:
        return f"{self.module}[{e}]"

    def expert_key(self, e: int) -> tuple[str, int]:
        """(MoE module, expert index): one expert's gate_up and down share it."""
        return self.module.rsplit(".", 1)[0], e


Site = LinearSite | RoutedSite


def routed_sites(graph: Graph, select: Callable[[str], bool]) -> list[RoutedSite]:
    """The grouped matmuls of stacked experts whose weight path `select` accepts."""
    sites = []
    for node in graph.call_nodes():
        if node.target is not GROUPED_MM.overload:
            continue
        x, view, offsets = node.args
        if not (
            isinstance(view, fx.Node)
            and view.target is torch.ops.aten.permute.default
            and list(view.args[1]) == [0, 2, 1]
            and isinstance(view.args[0], fx.Node)
            and view.args[0].op == "get_attr"
        ):
            continue
        weight = view.args[0].target
        if select(weight):
            experts = graph.get_weight(weight).shape[0]
            sites.append(RoutedSite(node, weight, weight, x, offsets, view, experts))
    return sites


def expert_sites(
    graph: Graph, targets: str, owner: str
) -> tuple[Callable[[str], bool], list[LinearSite], list[RoutedSite]]:
    """The linears inside experts and the stacked routed experts (filtered by `targets`, a
    regex on the module path, or the stacked weight's path), and the linears' module filter.
    A model without experts, or targets matching none, is an error naming the pass."""
    pattern = target_selector(targets, owner) if targets else (lambda module: True)

    def select(module: str) -> bool:
        return expert_of(module) is not None and pattern(module)

    nodes = list(graph.graph.nodes)
    linears, routed = linear_sites(graph, nodes, select), routed_sites(graph, pattern)
    if linears or routed:
        return select, linears, routed
    if not linear_sites(graph, nodes, lambda m: expert_of(m) is not None) and not routed_sites(
        graph, lambda m: True
    ):
        model = graph.info.get("name", "model")
        raise PeakcError(
            f"pass '{owner}': model '{model}' has no mixture-of-experts layers (no linear under "
            "'.experts.N.', no grouped matmul over stacked experts); compress_moe compresses "
            "experts only (split a dense model's MLPs with peakc.models.moe.moefy, or use "
            "quantize)"
        )
    raise PeakcError(f"pass '{owner}': option 'targets' '{targets}' matches no expert weight")


@dataclass
class ExpertSolver:
    """Ternary/2-bit grids, one scale per row, solved by GPTQ batched over experts (or rounded
    to nearest); keeps each coded tensor's integer levels and row scales, and what calibration
    saw: tokens per expert, the experts below the token floor and those at the cap."""

    o: CompressMoEOptions
    dtypes: dict[str, torch.dtype]  # each site's weight dtype: its scales are stored in it
    levels: dict[str, torch.Tensor] = field(default_factory=dict)  # int8 [rows, cols] by site
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # [rows]
    tokens: dict[str, int] = field(default_factory=dict)  # by expert name (or linear)
    below_floor: set[tuple[str, int]] = field(default_factory=set)  # expert keys
    at_cap: set[tuple[str, int]] = field(default_factory=set)
    kernels: set[str] = field(default_factory=set)

    def spec(self, cols: int) -> GridSpec:
        if self.o.levels == "ternary":
            return TernarySpec(2, cols, True)
        return GridSpec(2, cols, True)

    def solve(
        self,
        weights: torch.Tensor,
        hessians: torch.Tensor | None,
        names: list[str],
        rounded: list[bool],
    ) -> list[QuantizedWeight]:
        """Each of B weights [B, rows, cols] on its grid: rounded to nearest where `rounded`
        says (or without Hessians), else GPTQ with its own Hessian [B, cols, cols], solved
        `expert_batch` at a time as one batch."""
        spec = self.spec(weights.shape[2])
        out: list[QuantizedWeight | None] = [None] * weights.shape[0]
        gptq = [b for b, r in enumerate(rounded) if hessians is not None and not r]
        for b in range(weights.shape[0]):
            if b not in gptq:
                out[b] = rtn_quantize(weights[b], spec)
        size = self.o.expert_batch
        for chunk in (gptq[i : i + size] for i in range(0, len(gptq), size)):
            if chunk == list(range(weights.shape[0])):
                w, h = weights, hessians
            else:
                index = torch.tensor(chunk, device=weights.device)
                w, h = weights[index], hessians[index]
            solved = gptq_quantize_batched(
                w,
                h,
                spec,
                block_size=self.o.block_size,
                damp=self.o.damp,
                act_order=True,
                static_groups=True,
                layers=[names[b] for b in chunk],
                owner="compress_moe",
            )
            for b, q in zip(chunk, solved):
                out[b] = q
            self.kernels.add(solved[0].kernel)
        return out

    def keep(self, site: Site, parts: list[QuantizedWeight]) -> None:
        """A site's levels and row scales (a stacked site's experts in order)."""
        self.levels[site.module] = torch.cat(
            [(q.ints - q.zeros).to("cpu", torch.int8) for q in parts]
        )
        self.scales[site.module] = torch.cat(
            [q.scales[:, 0].to("cpu", self.dtypes[site.module]) for q in parts]
        )


def round_experts(
    graph: Graph,
    linears: list[LinearSite],
    routed: list[RoutedSite],
    solver: ExpertSolver,
    device: torch.device,
) -> None:
    """method=rtn: every expert weight rounded to nearest on its grid, nothing calibrated."""
    for site in [*linears, *routed]:
        w = graph.get_weight(site.weight).to(device, torch.float32)
        w = w.reshape(-1, w.shape[-1])  # a stacked [E, N, K] is E*N rows of one grid each
        solver.keep(site, [rtn_quantize(w, solver.spec(w.shape[1]))])


def calibrate_experts(
    graph: Graph,
    samples: list[tuple[torch.Tensor, ...]],
    select: Callable[[str], bool],
    linears: list[LinearSite],
    routed: list[RoutedSite],
    solver: ExpertSolver,
    device: torch.device,
    progress: ProgressFn,
) -> dict[str, float]:
    """GPTQ block by block, stage by stage, each expert's Hessian from the tokens that reach
    it: all-active experts (linears) through the calibration engine, routed experts through
    `calibrate_routed`. Returns expert linear (or expert name) -> reconstruction error."""
    errors: dict[str, float] = {}
    if linears:
        calibrate_blocks(
            graph,
            samples,
            lambda cal: solve_linear_stage(cal, solver, errors),
            select=select,
            device=device,
            progress=progress,
            description="compress_moe",
            stagewise=True,
        )
    if routed:
        calibrate_routed(graph, samples, routed, solver, errors, device, progress)
    return errors


def solve_linear_stage(
    cal: BlockCalibration, solver: ExpertSolver, errors: dict[str, float]
) -> dict[str, torch.Tensor]:
    """One stage of all-active experts: linears sharing a Hessian form a stack (gate/up of
    every expert), and stacks of one shape (each expert's down) are solved as one batch.
    Every expert saw every token, so below the floor their own Hessian is already the
    layer's all-token one (floor=blend keeps it; floor=rtn rounds them)."""
    by_shape: dict[tuple[int, int], list[tuple[Stack, torch.Tensor]]] = {}
    for stack in block_stacks(cal, lambda site: 0):
        rows = stack.rows()
        by_shape.setdefault(tuple(rows.shape), []).append((stack, rows))
    below = cal.tokens < solver.o.min_tokens
    new: dict[str, torch.Tensor] = {}
    for group in by_shape.values():
        stacks = [stack for stack, _ in group]
        for site in (site for stack in stacks for site in stack.sites):
            solver.tokens[site.module] = cal.tokens
            if below:
                solver.below_floor.add(expert_of(site.module))
        solved = solver.solve(
            torch.stack([rows for _, rows in group]),
            torch.stack([stack.hessian for stack in stacks]),
            [stack.name for stack in stacks],
            [below and solver.o.floor == "rtn"] * len(stacks),
        )
        for stack, q in zip(stacks, solved):
            for site, w, (start, stop) in zip(stack.sites, stack.weights, stack.spans()):
                part = q[start:stop]
                solver.keep(site, [part])
                new[site.weight] = part.dequantized
                errors[site.module] = reconstruction_error(w, part.dequantized, stack.hessian)
    return new


@dataclass
class RoutedInputs:
    """What a routed site's experts received over the calibration samples: per expert the sum
    of x xᵀ over the tokens it took (at most the cap) and their count, and whether more
    tokens were offered than the cap."""

    sums: torch.Tensor  # [E, K, K] float32
    tokens: list[int]
    capped: list[bool]


def calibrate_routed(
    graph: Graph,
    samples: list[tuple[torch.Tensor, ...]],
    sites: list[RoutedSite],
    solver: ExpertSolver,
    errors: dict[str, float],
    device: torch.device,
    progress: ProgressFn,
) -> None:
    """Block by block on the runtime's block runner: for each routed site of a block, in
    graph order (gate_up, then down measured with the new gate_up), measure what each expert
    receives, turn it into per-expert Hessians (`expert_hessians`), solve all experts in
    batches and put the dequantized stacked weight in place for the rest of the run."""
    blocks = graph.blocks()
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    by_block = [
        sorted((s for s in sites if s.node in b.nodes), key=lambda s: order[s.node]) for b in blocks
    ]
    last = max(i for i, found in enumerate(by_block) if found)
    runner = BlockRunner(
        graph, samples, device, blocks=blocks[: last + 1], description="compress_moe"
    )

    def compress_block(step: BlockStep) -> None:
        for site in by_block[step.index]:
            received = measure_routed(step, site, solver.o.max_tokens_per_expert)
            hessians, rounded = expert_hessians(received, site, solver)
            weight = step.weights[site.weight]
            rows = weight.float()
            names = [site.expert_name(e) for e in range(site.experts)]
            solved = solver.solve(rows, hessians, names, rounded)
            solver.keep(site, solved)
            new = torch.stack([q.dequantized for q in solved])
            for e, q in enumerate(solved):
                if received.tokens[e] or not rounded[e]:
                    errors[names[e]] = reconstruction_error(rows[e], q.dequantized, hessians[e])
            graph.set_weight(site.weight, new.to("cpu", weight.dtype))
            step.weights[site.weight] = new.to(device, weight.dtype)
            del received, hessians, rows, solved  # freed before the next site measures

    runner.run(compress_block, progress=progress)


def measure_routed(step: BlockStep, site: RoutedSite, cap: int) -> RoutedInputs:
    """Run the block up to the site on every sample and sum x xᵀ per expert over the rows the
    router sent it (x is sorted by expert, the offsets say where each expert's rows end); an
    expert stops taking tokens at `cap` (0: no cap)."""
    block = step.block
    prefix = block.nodes[: block.nodes.index(site.node)]
    experts = site.experts
    sums: torch.Tensor | None = None
    tokens, offered = [0] * experts, [0] * experts
    for i in range(step.nsamples):
        env = block_env(block, step.store, step.weights, i)
        with torch.no_grad():
            run_nodes(prefix, env, step.weights, step.store.device)
        x = env[site.input].float()
        ends = [int(end) for end in env[site.offsets].tolist()]
        if sums is None:
            sums = torch.zeros(experts, x.shape[-1], x.shape[-1], device=x.device)
        start = 0
        for e, end in enumerate(ends):
            offered[e] += end - start
            take = end - start if cap <= 0 else min(end - start, cap - tokens[e])
            if take > 0:
                rows = x[start : start + take]
                sums[e].addmm_(rows.T, rows)
                tokens[e] += take
            start = end
    capped = [cap > 0 and n > cap for n in offered]
    return RoutedInputs(sums, tokens, capped)


def expert_hessians(
    received: RoutedInputs, site: RoutedSite, solver: ExpertSolver
) -> tuple[torch.Tensor, list[bool]]:
    """Each expert's Hessian H = 2·XᵀX/n from its own tokens, and which experts are rounded
    to nearest instead. An expert with fewer than `min_tokens` tokens is below the floor:
    floor=blend makes up the missing tokens with the layer's all-token statistics (the mean
    x xᵀ over every routed token of the site), floor=rtn rounds it; with no routed token at
    all there is nothing to blend with and it is rounded. Built in place of the sums."""
    o = solver.o
    hessians, tokens = received.sums, received.tokens
    floor = max(o.min_tokens, 1)
    total = sum(tokens)
    pooled = hessians.sum(0) / total if total else None
    rounded = []
    for e, n in enumerate(tokens):
        key = site.expert_key(e)
        solver.tokens[site.expert_name(e)] = n
        if received.capped[e]:
            solver.at_cap.add(key)
        below = n < floor
        if below:
            solver.below_floor.add(key)
        if below and pooled is not None and o.floor == "blend":
            hessians[e].add_(pooled, alpha=floor - n).mul_(2.0 / floor)
        elif not below:
            hessians[e].mul_(2.0 / n)
        rounded.append(below and (pooled is None or o.floor == "rtn"))
    return hessians, rounded


def code_experts(
    graph: Graph,
    linears: list[LinearSite],
    routed: list[RoutedSite],
    solver: ExpertSolver,
    errors: dict[str, float],
    o: CompressMoEOptions,
    device: torch.device,
) -> dict[str, float | int | str]:
    """One dictionary for every expert's levels; each site coded (the parse on `device`),
    checked to decode to its exact levels, and replaced by linear_compressed (a linear) or
    grouped_mm_compressed (stacked routed experts); returns the measured stats."""
    started = time.perf_counter()
    sites: list[Site] = [*linears, *routed]
    alphabet = TERNARY if o.levels == "ternary" else TWO_BIT
    counts = {
        a: sum(int((solver.levels[site.module] == a).sum()) for site in sites) for a in alphabet
    }
    dictionary = tunstall(counts, alphabet, o.dictionary_size)
    tree = ParseTree.of(dictionary)
    coded = code_sites(sites, solver.levels, dictionary, tree, o.segment, device)
    for site in sites:
        check_round_trip(coded[site.module], solver.levels[site.module], site.module, device)
    order = {node: i for i, node in enumerate(graph.graph.nodes)}
    first = min((site.node for site in sites), key=order.__getitem__)
    table = graph.add_weight(TABLE_WEIGHT, tree.table, before=first)
    bytes_before = 0
    for site in sites:
        weight = graph.get_weight(site.weight)
        bytes_before += weight.numel() * weight.element_size()
        record = {"levels": o.levels, "method": o.method}
        args = (graph, site, coded[site.module], solver.scales[site.module], table)
        if isinstance(site, RoutedSite):
            names = [site.expert_name(e) for e in range(site.experts)]
            record.update(moe=site.expert_key(0)[0], experts=site.experts)
            record["tokens"] = [solver.tokens.get(name) for name in names]
            measured = [errors[name] for name in names if name in errors]
            if measured:
                record["recon_error"] = round(sum(measured) / len(measured), 6)
            new = replace_routed_experts(*args)
        else:
            moe, expert = expert_of(site.module)
            record.update(moe=moe, expert=expert, tokens=solver.tokens.get(site.module))
            if site.module in errors:
                record["recon_error"] = round(errors[site.module], 6)
            new = replace_expert_linear(*args)
        new.meta[MOE_KEY] = record
    return _stats(sites, solver, errors, coded, tree.table, counts, bytes_before, started)


def check_round_trip(
    coded: CompressedRows, levels: torch.Tensor, module: str, device: torch.device
) -> None:
    """The code must be lossless: a stream that does not decode to its levels is refused
    before it replaces anything."""
    back = decode(
        coded.words.to(device),
        coded.offsets.to(device),
        coded.table.to(device),
        coded.checksum,
        coded.rows,
        coded.cols,
        coded.segment,
        coded.max_words,
    )
    if not torch.equal(back, levels.to(device)):
        raise PeakcError(f"compress_moe: the code of {module} does not decode to its levels")


def code_sites(
    sites: list[Site],
    levels: dict[str, torch.Tensor],
    dictionary,
    tree: ParseTree,
    segment: int,
    device: torch.device,
) -> dict[str, CompressedRows]:
    """Each site's coded levels. Rows of the sites of one width are coded together, in
    chunks of about CODE_CHUNK levels (the parse walks columns, so taller calls walk less in
    total, and the chunk bounds the parse's scratch memory); a site spread over several
    chunks is joined back into one stream."""
    by_width: dict[int, list[Site]] = {}
    for site in sites:
        by_width.setdefault(levels[site.module].shape[1], []).append(site)
    pieces: dict[str, list[CompressedRows]] = {site.module: [] for site in sites}
    for width, group in by_width.items():
        for chunk in _row_chunks(group, levels, max(1, CODE_CHUNK // width)):
            stacked = torch.cat([levels[m][a:b] for m, a, b in chunk]).to(device)
            parts = encode(stacked, dictionary, segment, tree).split_rows(
                [b - a for _, a, b in chunk]
            )
            for (module, _, _), part in zip(chunk, parts):
                pieces[module].append(part)
    return {m: p[0] if len(p) == 1 else CompressedRows.concat(p) for m, p in pieces.items()}


def _row_chunks(
    group: list[Site], levels: dict[str, torch.Tensor], size: int
) -> Iterator[list[tuple[str, int, int]]]:
    """The rows of `group`'s sites in order as (site, start, stop) pieces, cut into chunks
    of at most `size` rows."""
    chunk: list[tuple[str, int, int]] = []
    room = size
    for site in group:
        rows, start = levels[site.module].shape[0], 0
        while start < rows:
            take = min(room, rows - start)
            chunk.append((site.module, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                yield chunk
                chunk, room = [], size
    if chunk:
        yield chunk


def replace_expert_linear(
    graph: Graph,
    site: LinearSite,
    coded: CompressedRows,
    scales: torch.Tensor,
    table: fx.Node,
) -> fx.Node:
    """Swap `site`'s aten.linear for linear_compressed reading `<weight prefix>.words`,
    `.offsets`, `.checksum`, `.scales` and the shared table; the float weight goes when
    nothing else reads it."""
    node = site.node
    x = node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    prefix = site.weight.rsplit(".", 1)[0]
    attrs = add_coded_weights(graph, node, prefix, coded, scales)
    args = (
        x,
        attrs["words"],
        attrs["offsets"],
        table,
        attrs["checksum"],
        attrs["scales"],
        bias,
        coded.cols,
        coded.segment,
        coded.max_words,
    )
    return graph.replace_call(node, LINEAR_COMPRESSED.overload, args, [node.args[1]])


def add_coded_weights(
    graph: Graph, node: fx.Node, prefix: str, coded: CompressedRows, scales: torch.Tensor
) -> dict[str, fx.Node]:
    """The coded stream and its row scales as weights `<prefix>.words`, `.offsets`,
    `.checksum`, `.scales` placed before `node`: their get_attr nodes by field."""
    tensors = {
        "words": coded.words,
        "offsets": coded.offsets,
        "checksum": coded.checksum,
        "scales": scales,
    }
    return {k: graph.add_weight(f"{prefix}.{k}", v, before=node) for k, v in tensors.items()}


def replace_routed_experts(
    graph: Graph,
    site: RoutedSite,
    coded: CompressedRows,
    scales: torch.Tensor,
    table: fx.Node,
) -> fx.Node:
    """Swap `site`'s grouped_mm for grouped_mm_compressed reading `<weight>_coded.words`,
    `.offsets`, `.checksum`, `.scales` (every expert's rows in one stream) and the shared
    table; the stacked float weight and its permute go."""
    node = site.node
    prefix = f"{site.weight}_coded"
    attrs = add_coded_weights(graph, node, prefix, coded, scales)
    args = (
        site.input,
        attrs["words"],
        attrs["offsets"],
        table,
        attrs["checksum"],
        attrs["scales"],
        site.offsets,
        coded.cols,
        coded.segment,
        coded.max_words,
    )
    weight = site.view.args[0]
    return graph.replace_call(node, GROUPED_MM_COMPRESSED.overload, args, [site.view, weight])


def _stats(
    sites: list[Site],
    solver: ExpertSolver,
    errors: dict[str, float],
    coded: dict[str, CompressedRows],
    table: torch.Tensor,
    counts: dict[int, int],
    bytes_before: int,
    started: float,
) -> dict[str, float | int | str]:
    """Measured: sizes (the code alone, and with row scales, checksums and the shared
    table), the levels' zero fraction and entropy, errors, tokens per expert and the experts
    the floor and the cap caught."""
    params = sum(counts.values())
    stream = sum(c.nbytes(with_table=False) - c.checksum.numel() * 8 for c in coded.values())
    scales = sum(
        solver.scales[s.module].numel() * solver.scales[s.module].element_size() for s in sites
    )
    checksums = 8 * len(coded)
    total = stream + scales + checksums + table.numel() * table.element_size()
    experts = set()
    for site in sites:
        if isinstance(site, RoutedSite):
            experts.update(site.expert_key(e) for e in range(site.experts))
        else:
            experts.add(expert_of(site.module))
    tokens = list(solver.tokens.values())
    stats: dict[str, float | int | str] = {
        "experts": len(experts),
        "layers": len(sites),
        "stacked_weights": sum(isinstance(s, RoutedSite) for s in sites),
        "params": params,
        "zero_fraction": round(counts[0] / params, 4),
        "entropy_bits": round(count_entropy_bits(list(counts.values())), 4),
        "code_bits_per_param": round(8 * stream / params, 4),
        "bits_per_param": round(8 * total / params, 4),
        "compression_ratio": round(bytes_before / total, 2),
        "bytes_before": bytes_before,
        "bytes_after": total,
        "dictionary_words": int(table.shape[0]),
        "roundtrip_checked": len(coded),  # coded tensors that decoded to their exact levels
        "experts_below_floor": len(solver.below_floor),
        "experts_at_cap": len(solver.at_cap),
        "code_seconds": round(time.perf_counter() - started, 2),
    }
    if tokens:
        stats["tokens_per_expert.min"] = min(tokens)
        stats["tokens_per_expert.max"] = max(tokens)
    if solver.kernels:
        stats["gptq_kernel"] = ",".join(sorted(solver.kernels))
    if errors:
        values = list(errors.values())
        stats["recon_error.mean"] = round(sum(values) / len(values), 6)
        stats["recon_error.max"] = round(max(values), 6)
    return stats
