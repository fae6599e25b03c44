"""compress_moe's working parts: the expert linears, their ternary/2-bit solver, the
dictionary code over all experts, and the rewrite into peakc::linear_compressed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir.dictionary_code import (
    TERNARY,
    TWO_BIT,
    CompressedRows,
    ParseTree,
    decode,
    encode,
    entropy_bits,
    tunstall,
)
from peakc.ir.experts import expert_of
from peakc.ir.graph import Graph
from peakc.ir.ops import LINEAR_COMPRESSED
from peakc.passes.calibration import (
    BlockCalibration,
    LinearSite,
    calibrate_blocks,
    linear_sites,
    target_selector,
)
from peakc.passes.compress import Stack, block_stacks, solve_stacks
from peakc.passes.quantize.gptq import QuantizedWeight, gptq_quantize, rtn_quantize
from peakc.passes.quantize.grid import GridSpec

if TYPE_CHECKING:
    from peakc.passes.compress_moe import CompressMoEOptions

MOE_KEY = "peakc_compress_moe"  # node.meta of each linear_compressed: levels, expert, error
TABLE_WEIGHT = "moe_code.table"  # the one code table every compressed expert reads


@dataclass
class TernarySpec(GridSpec):
    """Three levels per row, {-s, 0, s}: codes 0, 1, 2 around the zero point 1 (GridSpec's
    symmetric grid with maxq 2, so GPTQ's solver runs unchanged)."""

    @property
    def maxq(self) -> int:
        return 2


def expert_sites(
    graph: Graph, targets: str, owner: str
) -> tuple[Callable[[str], bool], list[LinearSite]]:
    """The linears inside experts (filtered by `targets`) and their module filter. A model
    without experts, or targets matching none, is an error naming the pass."""
    pattern = target_selector(targets, owner) if targets else (lambda module: True)

    def select(module: str) -> bool:
        return expert_of(module) is not None and pattern(module)

    sites = linear_sites(graph, list(graph.graph.nodes), select)
    if sites:
        return select, sites
    if not linear_sites(graph, list(graph.graph.nodes), lambda m: expert_of(m) is not None):
        model = graph.info.get("name", "model")
        raise PeakcError(
            f"pass '{owner}': model '{model}' has no mixture-of-experts layers (no linear under "
            "'.experts.N.'); compress_moe compresses experts only (split a dense model's MLPs "
            "with peakc.models.moe.moefy, or use quantize)"
        )
    raise PeakcError(f"pass '{owner}': option 'targets' '{targets}' matches no expert linear")


@dataclass
class ExpertSolver:
    """GPTQ (or RTN) onto ternary/2-bit per-row grids; keeps each linear's integer levels
    and row scales for the code. Experts whose Hessian saw fewer than `min_tokens` tokens are
    rounded to nearest (counted in `below_floor`)."""

    o: CompressMoEOptions
    dtypes: dict[str, torch.dtype]  # each linear's weight dtype: its scales are stored in it
    levels: dict[str, torch.Tensor] = field(default_factory=dict)  # int8 [rows, cols]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # [rows]
    tokens: dict[str, int] = field(default_factory=dict)  # tokens behind each linear's Hessian
    below_floor: set[str] = field(default_factory=set)
    kernels: set[str] = field(default_factory=set)
    block_tokens: int = 0  # tokens behind the Hessians of the block being solved

    @property
    def calibrated(self) -> bool:
        return self.o.method == "gptq"

    def spec(self, cols: int) -> GridSpec:
        if self.o.levels == "ternary":
            return TernarySpec(2, cols, True)
        return GridSpec(2, cols, True)

    def stack_key(self, site: LinearSite) -> int:
        return 0  # one per-row grid spec for all: linears sharing a Hessian stack

    def solve(self, stack: Stack) -> QuantizedWeight:
        rows = stack.rows()
        spec = self.spec(rows.shape[1])
        if stack.hessian is None:  # method=rtn: nothing calibrated
            return rtn_quantize(rows, spec)
        for site in stack.sites:
            self.tokens[site.module] = self.block_tokens
        if self.block_tokens < self.o.min_tokens:
            self.below_floor.update(s.module for s in stack.sites)
            return rtn_quantize(rows, spec)
        q = gptq_quantize(
            rows,
            stack.hessian,
            spec,
            block_size=self.o.block_size,
            damp=self.o.damp,
            act_order=True,
            static_groups=True,
            layer=stack.name,
        )
        self.kernels.add(q.kernel)
        return q

    def accept(self, site: LinearSite, part: QuantizedWeight) -> torch.Tensor | None:
        self.levels[site.module] = (part.ints - part.zeros).to("cpu", torch.int8)
        self.scales[site.module] = part.scales[:, 0].to("cpu", self.dtypes[site.module])
        return part.dequantized if self.calibrated else None


def calibrate_experts(
    graph: Graph,
    samples: list[tuple[torch.Tensor, ...]],
    select: Callable[[str], bool],
    solver: ExpertSolver,
    device: torch.device,
    progress: Any,
) -> dict[str, float]:
    """GPTQ block by block, stage by stage; each expert's Hessian from the tokens that reach
    it. Returns module path -> reconstruction error."""
    errors: dict[str, float] = {}

    def compress(cal: BlockCalibration) -> dict[str, torch.Tensor]:
        solver.block_tokens = cal.tokens
        return solve_stacks(block_stacks(cal, solver.stack_key), solver, errors)

    calibrate_blocks(
        graph,
        samples,
        compress,
        select=select,
        device=device,
        progress=progress,
        description="compress_moe",
        stagewise=True,
    )
    return errors


def code_experts(
    graph: Graph,
    sites: list[LinearSite],
    solver: ExpertSolver,
    errors: dict[str, float],
    o: CompressMoEOptions,
) -> dict[str, float | int | str]:
    """One dictionary for every expert's levels, each linear coded and replaced by
    linear_compressed; returns the measured stats."""
    started = time.perf_counter()
    alphabet = TERNARY if o.levels == "ternary" else TWO_BIT
    flat = torch.cat([solver.levels[s.module].reshape(-1) for s in sites])
    counts = {a: int((flat == a).sum()) for a in alphabet}
    dictionary = tunstall(counts, alphabet, o.dictionary_size)
    tree = ParseTree.of(dictionary)
    coded = _code_by_width(sites, solver.levels, dictionary, tree, o.segment)
    for site in sites:
        check_round_trip(coded[site.module], solver.levels[site.module], site.module)
    table = graph.add_weight(TABLE_WEIGHT, tree.table, before=sites[0].node)
    bytes_before = 0
    for site in sites:
        weight = graph.get_weight(site.weight)
        bytes_before += weight.numel() * weight.element_size()
        record = {"levels": o.levels, "method": o.method, "tokens": solver.tokens.get(site.module)}
        found = expert_of(site.module)
        record.update(moe=found[0], expert=found[1])
        if site.module in errors:
            record["recon_error"] = round(errors[site.module], 6)
        new = replace_expert_linear(
            graph, site, coded[site.module], solver.scales[site.module], table
        )
        new.meta[MOE_KEY] = record
    return _stats(sites, solver, errors, coded, tree.table, flat, bytes_before, started)


def check_round_trip(coded: CompressedRows, levels: torch.Tensor, module: str) -> None:
    """The code must be lossless: a stream that does not decode to its levels is refused
    before it replaces anything."""
    back = decode(
        coded.words,
        coded.offsets,
        coded.table,
        coded.checksum,
        coded.rows,
        coded.cols,
        coded.segment,
        coded.max_words,
    )
    if not torch.equal(back, levels):
        raise PeakcError(f"compress_moe: the code of {module} does not decode to its levels")


def _code_by_width(
    sites: list[LinearSite],
    levels: dict[str, torch.Tensor],
    dictionary,
    tree: ParseTree,
    segment: int,
) -> dict[str, CompressedRows]:
    """Each linear's coded levels; linears of one width are coded in one call (the parse
    walks columns, so stacking rows makes the walk shorter in total)."""
    by_width: dict[int, list[LinearSite]] = {}
    for site in sites:
        by_width.setdefault(levels[site.module].shape[1], []).append(site)
    out: dict[str, CompressedRows] = {}
    for group in by_width.values():
        stacked = torch.cat([levels[s.module] for s in group])
        parts = encode(stacked, dictionary, segment, tree).split_rows(
            [levels[s.module].shape[0] for s in group]
        )
        out.update({s.module: part for s, part in zip(group, parts)})
    return out


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
    tensors = {
        "words": coded.words,
        "offsets": coded.offsets,
        "checksum": coded.checksum,
        "scales": scales,
    }
    attrs = {k: graph.add_weight(f"{prefix}.{k}", v, before=node) for k, v in tensors.items()}
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


def _stats(
    sites: list[LinearSite],
    solver: ExpertSolver,
    errors: dict[str, float],
    coded: dict[str, CompressedRows],
    table: torch.Tensor,
    levels: torch.Tensor,
    bytes_before: int,
    started: float,
) -> dict[str, float | int | str]:
    """Measured: sizes (the code alone, and with row scales, checksums and the shared
    table), the levels' zero fraction and entropy, errors, and the experts the floor caught."""
    params = levels.numel()
    stream = sum(c.nbytes(with_table=False) - c.checksum.numel() * 8 for c in coded.values())
    scales = sum(
        solver.scales[s.module].numel() * solver.scales[s.module].element_size() for s in sites
    )
    checksums = 8 * len(coded)
    total = stream + scales + checksums + table.numel() * table.element_size()
    experts = {expert_of(s.module) for s in sites}
    tokens = [solver.tokens[s.module] for s in sites if s.module in solver.tokens]
    stats: dict[str, float | int | str] = {
        "experts": len(experts),
        "layers": len(sites),
        "params": params,
        "zero_fraction": round(float((levels == 0).float().mean()), 4),
        "entropy_bits": round(entropy_bits(levels), 4),
        "code_bits_per_param": round(8 * stream / params, 4),
        "bits_per_param": round(8 * total / params, 4),
        "compression_ratio": round(bytes_before / total, 2),
        "bytes_before": bytes_before,
        "bytes_after": total,
        "dictionary_words": int(table.shape[0]),
        "roundtrip_checked": len(coded),  # linears whose stream decoded to their exact levels
        "experts_below_floor": len({expert_of(m) for m in solver.below_floor}),
        "code_seconds": round(time.perf_counter() - started, 2),
    }
    if tokens:
        stats["tokens_per_expert.min"] = min(tokens)
    if solver.kernels:
        stats["gptq_kernel"] = ",".join(sorted(solver.kernels))
    if errors:
        values = list(errors.values())
        stats["recon_error.mean"] = round(sum(values) / len(values), 6)
        stats["recon_error.max"] = round(max(values), 6)
    return stats
