"""The cost model's price of a triton program: each fusion group one kernel (its inputs read
and its outputs written once), every other node as the cost model prices it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peakc.backends.triton.fusion import FusionPlan, plan_fusion, value_bytes
from peakc.cost_model.estimate import node_device_time
from peakc.cost_model.op_costs import OpCost
from peakc.cost_model.predict import concrete
from peakc.errors import PeakcError

if TYPE_CHECKING:
    from peakc.backends.triton.lower import LoweredProgram
    from peakc.cost_model.estimate import Estimate
    from peakc.cost_model.hardware import HardwareProfile
    from peakc.cost_model.predict import CostModel
    from peakc.ir.graph import Graph
    from peakc.passes.base import PassContext


def estimate_at_examples(program: Graph, ctx: PassContext) -> Estimate | str:
    """The cost model's per-node estimate of a program at its example inputs' shapes (a graph
    with dynamic dims is shaped there first), or why it has none."""
    try:
        shaped = program
        if program.info.get("dynamic"):
            inputs = [(t.shape, t.dtype, t.device) for t in program.example_inputs]
            shaped = concrete(program, inputs)
        return ctx.cost.estimate(shaped)
    except PeakcError as exc:
        return str(exc)


def price_program(lowered: LoweredProgram, est: Estimate, ctx: PassContext) -> dict[str, Any]:
    """Predicted device time of the program at the example shapes, its kernel count, and each
    fallback (a peakc op on its reference) with its share of that time."""
    return price_plan(lowered.plan, lowered.fallbacks, est, ctx.target)


def price_plan(
    plan: FusionPlan, fallbacks: dict[str, str], est: Estimate, profile: HardwareProfile
) -> dict[str, Any]:
    """The price of a graph's estimate with the plan's groups as one kernel each."""
    by_name = {n.name: n for n in est.nodes}
    seconds = 0.0
    kernels = 0
    for group in plan.groups:
        flops = sum(by_name[n.name].flops for n in group.nodes if n.name in by_name)
        moved = sum(value_bytes(n) for n in group.inputs() + group.outputs())
        time, _ = node_device_time(OpCost(flops, moved, "memory"), profile, 1)
        seconds += time
        kernels += 1
    grouped = {n.name for g in plan.groups for n in g.nodes}
    for node in est.nodes:
        if node.name not in grouped:
            seconds += node.device_time
            kernels += node.kernels
    listed = []
    for name, reason in fallbacks.items():
        node = by_name.get(name)
        share = node.device_time / seconds if node is not None and seconds else 0.0
        listed.append({"node": name, "why": reason, "share_of_time": round(share, 4)})
    return {
        "predicted_ms": round(seconds * 1e3, 4),
        "kernels": kernels,
        "fallbacks": listed,
        "fallback_share": round(sum(f["share_of_time"] for f in listed), 4),
    }


def predict_decode_ms(graph: Graph, cost: CostModel, batch: int, context: int) -> float:
    """The cost model's decode step of a generation decoder lowered to triton: `batch`
    sequences attending to `context` slots, its fusion groups priced as one kernel each."""
    shaped, est = cost.decoder_estimate(graph, "decode", batch, 1, context)
    sizes = {n.name: n.bytes for n in est.nodes}
    plan = plan_fusion(shaped.graph, lambda node: sizes.get(node.name, 0.0))
    return price_plan(plan, {}, est, cost.profile)["predicted_ms"]
