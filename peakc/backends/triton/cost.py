"""The cost model's price of a triton program: each fusion group one kernel (its inputs read
and its outputs written once), every other node as the cost model prices it."""

from __future__ import annotations

import json
from pathlib import Path
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
    """The price of a graph's estimate with the plan's groups as one kernel each. `launches`
    keeps each launch's work (FLOPs, bytes, kind), so `price_launches` prices the same program
    on another target without its graph (`peakc estimate` on an artifact)."""
    launches = plan_launches(plan, est)
    seconds = price_launches(launches, profile)
    listed = []
    by_name = {n.name: n for n in est.nodes}
    for name, reason in fallbacks.items():
        node = by_name.get(name)
        share = node.device_time / seconds if node is not None and seconds else 0.0
        listed.append({"node": name, "why": reason, "share_of_time": round(share, 4)})
    return {
        "predicted_ms": round(seconds * 1e3, 4),
        "kernels": sum(launch["kernels"] for launch in launches),
        "fallbacks": listed,
        "fallback_share": round(sum(f["share_of_time"] for f in listed), 4),
        "launches": launches,
    }


def plan_launches(plan: FusionPlan, est: Estimate) -> list[dict[str, Any]]:
    """The program's device work, one record per fusion group (its inputs read and outputs
    written once) and per node outside the groups (as the cost model prices it)."""
    by_name = {n.name: n for n in est.nodes}
    launches = []
    for group in plan.groups:
        flops = sum(by_name[n.name].flops for n in group.nodes if n.name in by_name)
        moved = sum(value_bytes(n) for n in group.inputs() + group.outputs())
        launches.append(
            {"op": "fusion group", "flops": flops, "bytes": moved, "kind": "memory", "kernels": 1}
        )
    grouped = {n.name for g in plan.groups for n in g.nodes}
    for node in est.nodes:
        if node.name not in grouped and node.kind != "free":
            launches.append(
                {
                    "op": node.op,
                    "flops": node.flops,
                    "bytes": node.bytes,
                    "kind": node.kind,
                    "dtype": node.dtype,
                    "op_class": node.op_class,
                    "padding": node.padding,
                    "kernels": node.kernels,
                }
            )
    return launches


def price_launches(launches: list[dict[str, Any]], profile: HardwareProfile) -> float:
    """Device seconds of a program's launches on `profile`, back to back (each kernel's work
    plus its gap)."""
    seconds = 0.0
    for launch in launches:
        cost = OpCost(
            launch["flops"],
            launch["bytes"],
            launch["kind"],
            dtype=launch.get("dtype", "fp32"),
            op_class=launch.get("op_class", "elementwise"),
            padding=launch.get("padding", 1.0),
        )
        seconds += node_device_time(cost, profile, launch["kernels"])[0]
    return seconds


def predict_decode_ms(graph: Graph, cost: CostModel, batch: int, context: int) -> float:
    """The cost model's decode step of a generation decoder lowered to triton: `batch`
    sequences attending to `context` slots, its fusion groups priced as one kernel each."""
    shaped, est = cost.decoder_estimate(graph, "decode", batch, 1, context)
    sizes = {n.name: n.bytes for n in est.nodes}
    plan = plan_fusion(shaped.graph, lambda node: sizes.get(node.name, 0.0))
    return price_plan(plan, {}, est, cost.profile)["predicted_ms"]


# the programs of a triton artifact and the phase each one runs
ARTIFACT_PHASES = {"forward": "forward", "decoder": "prefill", "decode_step": "decode"}


def predict_artifact(directory: Path, profile: HardwareProfile) -> dict[str, Any]:
    """A triton artifact's predicted time per phase on `profile`, from the launches its
    report stored for each program (their FLOPs and bytes at the example shapes): no source
    model, no graph, no kernel compiled."""
    manifest, report = _read_json(directory, "manifest.json"), _read_json(directory, "report.json")
    if manifest.get("backend") != "triton":
        raise PeakcError(f"artifact {directory} was compiled for '{manifest.get('backend')}'")
    programs = (report.get("triton") or {}).get("programs") or {}
    shapes = _phase_shapes(directory, manifest)
    phases = {}
    for name, phase in ARTIFACT_PHASES.items():
        cost = (programs.get(name) or {}).get("cost")
        if cost is None:
            continue
        if isinstance(cost, str) or "launches" not in cost:
            why = cost if isinstance(cost, str) else "compiled by a peakc that stored no launches"
            raise PeakcError(f"artifact {directory}: program '{name}' has no price ({why})")
        seconds = price_launches(cost["launches"], profile)
        phases[phase] = {
            "program": name,
            "shape": shapes[phase],
            "predicted_ms": round(seconds * 1e3, 4),
            "kernels": cost["kernels"],
            "fallback_share": cost.get("fallback_share", 0.0),
        }
    if not phases:
        raise PeakcError(f"artifact {directory}: its report prices no program")
    compiled_for = report.get("target")
    return {"artifact": str(directory), "target": profile.name, "compiled_for": compiled_for,
            "phases": phases}  # fmt: skip


def _phase_shapes(directory: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """What each phase's price is for: the example inputs' batch and tokens, and for decode
    one token per sequence against the cache's slots."""
    from peakc.runtime.artifact import read_example_inputs

    example = read_example_inputs(directory, manifest)
    shape = "x".join(str(d) for d in example[0].shape) if example else "-"
    generation = manifest.get("generation")
    if generation is None:
        return {"forward": f"input {shape}"}
    batch, tokens = example[0].shape[:2]
    slots = generation.get("max_seq_len")
    return {
        "prefill": f"batch {batch} x {tokens} tokens",
        "decode": f"batch {batch} x 1 token, cache of {slots} slots",
    }


def _read_json(directory: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((directory / name).read_text())
    except (OSError, ValueError) as exc:
        raise PeakcError(f"artifact {directory}: cannot read {name} ({exc})") from None
    if not isinstance(data, dict):
        raise PeakcError(f"artifact {directory}: {name} is not a JSON object")
    return data
