"""The compressor loop that prune and quantize share: one loop, a solver per method.

A compressor pass picks linears by its `targets` option, and a `Solver` rewrites their
weights: magnitude pruning and RTN one linear at a time; SparseGPT and GPTQ block by block
over calibration samples (passes/calibration.py), where the linears of a block that read one
input share its Hessian (q/k/v, gate/up) and are solved once as one stack of rows (each
linear keeps its own rows, and its own target: SparseGPT's segments), then sliced back.

Calibration runs the graph at its captured shape: windows have the captured sequence
length (capture with `peakc compile --seq-len N` to calibrate on N-token windows).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from peakc.errors import PeakcError
from peakc.passes.base import Pass, PassContext, PassResult

# Light at import (the pass declarations built on CompressorPass are listed by `peakc passes`
# without torch); the calibration engine, torch and the cost model load when a pass runs.
if TYPE_CHECKING:
    import torch

    from peakc.cost_model.predict import GraphCost
    from peakc.ir.graph import Graph
    from peakc.passes.calibration import BlockCalibration, CompressFn, LinearSite


@dataclass
class Stack:
    """Linears solved together, their weights stacked by rows in `sites` order."""

    sites: list[LinearSite]
    weights: list[torch.Tensor]  # each linear's current weight on the compute device
    hessian: torch.Tensor | None  # their shared input's Hessian; None for uncalibrated solvers

    @property
    def name(self) -> str:
        return "+".join(s.module for s in self.sites)

    def spans(self) -> list[tuple[int, int]]:
        """Each linear's rows in the stack, as (start, stop)."""
        out, start = [], 0
        for w in self.weights:
            out.append((start, start + w.shape[0]))
            start += w.shape[0]
        return out

    def rows(self) -> torch.Tensor:
        import torch

        return self.weights[0] if len(self.weights) == 1 else torch.cat(self.weights)


class Solver(Protocol):
    """One compression method.

    `solve` compresses a stack's rows at once and returns something sliced by rows (a tensor,
    a QuantizedWeight); `accept` takes one linear's slice and returns the float weight the
    graph holds from then on, or None to leave the graph's weight as it is (RTN: the linear
    is replaced by linear_wq afterwards)."""

    calibrated: ClassVar[bool]  # needs Hessians: runs block by block over calibration samples

    def stack_key(self, site: LinearSite) -> Hashable:
        """Linears sharing a Hessian are stacked when their keys are equal too."""
        ...

    def solve(self, stack: Stack) -> Any: ...

    def accept(self, site: LinearSite, part: Any) -> torch.Tensor | None: ...


def solve_stacks(
    stacks: Iterator[Stack] | list[Stack], solver: Solver, errors: dict[str, float] | None
) -> dict[str, torch.Tensor]:
    """Solve each stack, slice it back per linear; weight name → new weight. With `errors`,
    record each linear's reconstruction error through the stack's Hessian."""
    new: dict[str, torch.Tensor] = {}
    for stack in stacks:
        solved = solver.solve(stack)
        for site, w, (start, stop) in zip(stack.sites, stack.weights, stack.spans()):
            weight = solver.accept(site, solved[start:stop])
            if weight is None:
                continue
            new[site.weight] = weight
            if errors is not None and stack.hessian is not None:
                errors[site.module] = reconstruction_error(w, weight, stack.hessian)
    return new


def block_stacks(cal: BlockCalibration, key: Callable[[LinearSite], Hashable]) -> Iterator[Stack]:
    """The block's linears grouped by shared Hessian and `key`, one stack at a time (so only
    one stack's fp32 weights are loaded at once)."""
    groups: dict[tuple[int, Hashable], list[LinearSite]] = {}
    for site in cal.sites:
        groups.setdefault((id(cal.hessians[site.module]), key(site)), []).append(site)
    for group in groups.values():
        yield Stack(group, [cal.weight(s) for s in group], cal.hessians[group[0].module])


def block_compressor(solver: Solver, errors: dict[str, float] | None = None) -> CompressFn:
    """calibrate_blocks' per-block callback: `solver` over each stack of the block."""
    return lambda cal: solve_stacks(block_stacks(cal, solver.stack_key), solver, errors)


def reconstruction_error(
    original: torch.Tensor, compressed: torch.Tensor, hessian: torch.Tensor
) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² through H ∝ XᵀX (0 when the layer's output is zero)."""
    w = original.float()
    delta = w - compressed.float()
    h = hessian.float()
    num = float(((delta @ h) * delta).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else num


class CompressorPass(Pass):
    """A pass whose solver rewrites the weights of the linears its `targets` option selects
    (prune, quantize). Its Options have targets, block_size, damp, nsamples, seq_len, seed."""

    def validate(self) -> None:
        from peakc.passes.calibration import target_selector

        o = self.options
        if o.block_size < 1:
            raise PeakcError(
                f"pass '{self.name}': option 'block_size' must be >= 1, got {o.block_size}"
            )
        if o.damp < 0:
            raise PeakcError(f"pass '{self.name}': option 'damp' must be >= 0, got {o.damp}")
        if o.nsamples < 1 or o.seq_len < 0:
            raise PeakcError(
                f"pass '{self.name}': options 'nsamples' >= 1 and 'seq_len' >= 0 required"
            )
        target_selector(o.targets, self.name)

    def select_sites(self, graph: Graph) -> tuple[Callable[[str], bool], list[LinearSite]]:
        """The module filter and the linears it selects; none is an error naming the option."""
        from peakc.passes.calibration import linear_sites, target_selector

        targets = self.options.targets
        select = target_selector(targets, self.name)
        sites = linear_sites(graph, list(graph.graph.nodes), select)
        if not sites:
            what = f"'{targets}'" if targets else "(default: linears inside numbered layers)"
            raise PeakcError(f"pass '{self.name}': option 'targets' {what} matches no linear layer")
        return select, sites

    def samples(self, graph: Graph, ctx: PassContext) -> list[tuple[torch.Tensor, ...]]:
        from peakc.runtime.samples import calibration_samples

        o = self.options
        return calibration_samples(
            graph, ctx.calibration_data, o.nsamples, o.seq_len, o.seed, self.name
        )

    def compress(
        self,
        graph: Graph,
        ctx: PassContext,
        sites: list[LinearSite],
        select: Callable[[str], bool],
        solver: Solver,
        *,
        samples: list[tuple[torch.Tensor, ...]] | None = None,
        stagewise: bool = False,
    ) -> dict[str, float]:
        """Run `solver` over `sites` on the compute device: block by block over the
        calibration samples when it calibrates (`stagewise`: per stage of a block, GPTQ's
        order), else one linear at a time. Returns module path → reconstruction error."""
        from peakc.passes.calibration import calibrate_blocks, compute_device

        device = compute_device(ctx.device)
        errors: dict[str, float] = {}
        if solver.calibrated:
            calibrate_blocks(
                graph,
                samples if samples is not None else self.samples(graph, ctx),
                block_compressor(solver, errors),
                select=select,
                device=device,
                progress=ctx.progress,
                description=self.name,
                stagewise=stagewise,
            )
            return errors
        for site in sites:
            w = graph.get_weight(site.weight)
            stack = Stack([site], [w.to(device)], None)
            for name, value in solve_stacks([stack], solver, None).items():
                graph.set_weight(name, value.to("cpu", w.dtype))
        return errors

    def changed(
        self, graph: Graph, ctx: PassContext, before: GraphCost | str, stats: dict[str, Any]
    ) -> PassResult:
        """The result of a run that changed `graph`, with the predicted cost before and after
        on the target in the report."""
        from peakc.cost_model.predict import cost_change

        after = ctx.cost.phases_or_reason(graph)
        return PassResult(graph, True, stats, report={"cost": cost_change(before, after)})
