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
from peakc.runtime.manifest import read_manifest, verify_file

if TYPE_CHECKING:
    import torch.fx as fx

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


def plan_launches(
    plan: FusionPlan, est: Estimate, shaped: fx.Graph | None = None
) -> list[dict[str, Any]]:
    """The program's device work, one record per fusion group (its inputs read and outputs
    written once) and per node outside the groups (as the cost model prices it). `shaped`:
    the graph `est` was made on when it is a reshaped copy of the plan's (same node names)."""
    by_name = {n.name: n for n in est.nodes}
    nodes = {n.name: n for n in shaped.nodes} if shaped is not None else None

    def moved_by(node: fx.Node) -> float:
        return value_bytes(nodes[node.name] if nodes is not None else node)

    launches = []
    for group in plan.groups:
        flops = sum(by_name[n.name].flops for n in group.nodes if n.name in by_name)
        moved = sum(moved_by(n) for n in group.inputs() + group.outputs())
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


# --- the launches at other shapes -----------------------------------------------------------
#
# A generation program's launches are stored at sample points, batches x lengths (the prompt's
# tokens for a prefill, the attended context for a decode step), and interpolated between
# them: linear in the batch and quadratic in the length. That is exact for work of that form,
# which is the form of every launch of a decoder (weights read once; activations in batch x
# tokens; a causal prefill's attention in batch x tokens^2, a decode step's in batch x context).

SAMPLE_BATCHES = (1, 2)


def sample_lengths(limit: int) -> list[int]:
    """Three lengths spread over 1..limit (fewer when limit < 3): a quadratic needs three."""
    return sorted({max(1, limit // 4), max(1, limit // 2), limit})


def sample_launches(
    program: Graph, plan: FusionPlan, cost: CostModel, phase: str
) -> dict[str, Any] | str:
    """A generation program's launches (the plan's groups as one kernel each) at the sample
    points of `phase` ("prefill" or "decode"), or why it has none: {"phase", "batches",
    "lengths", "launches": [{op, kind, ..., "flops": [per point], "bytes": [...],
    "padding": [...], "kernels": [...]}]}, points in batch-major order."""
    generation = program.info["generation"]
    batches = [b for b in SAMPLE_BATCHES if b <= int(generation["max_batch"])]
    lengths = sample_lengths(int(generation["max_seq_len"]))
    points = []
    try:
        for batch in batches:
            for length in lengths:
                tokens = length if phase == "prefill" else 1
                shaped, est = cost.decoder_estimate(program, phase, batch, tokens, length)
                points.append(plan_launches(plan, est, shaped.graph))
    except PeakcError as exc:
        return str(exc)
    ops = [launch["op"] for launch in points[0]]
    if any([launch["op"] for launch in point] != ops for point in points):
        return "its launches differ between the sample shapes"
    launches = []
    for i, first in enumerate(points[0]):
        entry = {k: first[k] for k in ("op", "kind", "dtype", "op_class") if k in first}
        for key, default in (("flops", 0.0), ("bytes", 0.0), ("padding", 1.0), ("kernels", 1)):
            entry[key] = [point[i].get(key, default) for point in points]
        launches.append(entry)
    return {"phase": phase, "batches": batches, "lengths": lengths, "launches": launches}


def launches_at(sampled: dict[str, Any], batch: int, length: int) -> list[dict[str, Any]]:
    """The sampled launches at (batch, length): FLOPs and bytes interpolated (exact for the
    form above, also beyond the sample points), padding and kernel counts taken from the
    nearest sample point."""
    batches, lengths = sampled["batches"], sampled["lengths"]
    weights = [wb * wl for wb in _lagrange(batches, batch) for wl in _lagrange(lengths, length)]
    near = _nearest(batches, batch) * len(lengths) + _nearest(lengths, length)
    launches = []
    for launch in sampled["launches"]:
        entry = {k: v for k, v in launch.items() if not isinstance(v, list)}
        for key in ("flops", "bytes"):
            entry[key] = max(0.0, sum(w * v for w, v in zip(weights, launch[key])))
        entry["padding"], entry["kernels"] = launch["padding"][near], launch["kernels"][near]
        launches.append(entry)
    return launches


def _lagrange(points: list[int], x: float) -> list[float]:
    """The Lagrange basis of `points` at x: the weights of the values there."""
    basis = []
    for j, xj in enumerate(points):
        weight = 1.0
        for m, xm in enumerate(points):
            if m != j:
                weight *= (x - xm) / (xj - xm)
        basis.append(weight)
    return basis


def _nearest(points: list[int], x: float) -> int:
    return min(range(len(points)), key=lambda i: abs(points[i] - x))


# the programs of a triton artifact and the phase each one runs
ARTIFACT_PHASES = {"forward": "forward", "decoder": "prefill", "decode_step": "decode"}


def predict_artifact(
    directory: Path,
    profile: HardwareProfile,
    batch: int | None = None,
    seq: int | None = None,
    context: int | None = None,
) -> dict[str, Any]:
    """A triton artifact's predicted time per phase on `profile`, from the launches its report
    stored for each program: no source model, no graph, no kernel compiled. Without a shape,
    at the example shapes it was compiled for; with `batch`, `seq` (prefill tokens) or
    `context` (a decode step's attended tokens, default `seq`), a generation artifact's
    launches interpolated from its sample points (`launches_at`)."""
    manifest = read_manifest(directory)
    verify_file(directory, manifest, "report.json")  # the launches priced below come from it
    report = _read_json(directory, "report.json")
    if manifest.get("backend") != "triton":
        raise PeakcError(f"artifact {directory} was compiled for '{manifest.get('backend')}'")
    programs = (report.get("triton") or {}).get("programs") or {}
    reshaped = (batch, seq, context) != (None, None, None)
    if reshaped:  # phase -> (description, batch, length)
        shapes, notes = _asked_shapes(directory, manifest, batch, seq, context)
    else:
        shapes = {p: (text,) for p, text in _phase_shapes(directory, manifest).items()}
    phases = {}
    for name, phase in ARTIFACT_PHASES.items():
        cost = (programs.get(name) or {}).get("cost")
        if cost is None:
            continue
        if isinstance(cost, str) or "launches" not in cost:
            why = cost if isinstance(cost, str) else "compiled by a peakc that stored no launches"
            raise PeakcError(f"artifact {directory}: program '{name}' has no price ({why})")
        launches = cost["launches"]
        if reshaped:
            sampled = cost.get("shapes")
            if not isinstance(sampled, dict):
                why = sampled or "compiled by a peakc that sampled no other shapes"
                raise PeakcError(
                    f"artifact {directory}: program '{name}' cannot be priced at another shape "
                    f"({why}); estimate it without --batch/--seq/--context"
                )
            launches = launches_at(sampled, *shapes[phase][1:])
        seconds = price_launches(launches, profile)
        phases[phase] = {
            "program": name,
            "shape": shapes[phase][0],
            "predicted_ms": round(seconds * 1e3, 4),
            "kernels": cost["kernels"],
            "fallback_share": cost.get("fallback_share", 0.0),
        }
    if not phases:
        raise PeakcError(f"artifact {directory}: its report prices no program")
    compiled_for = report.get("target")
    result = {"artifact": str(directory), "target": profile.name, "compiled_for": compiled_for,
              "phases": phases}  # fmt: skip
    if reshaped:
        result["notes"] = notes
    return result


def _asked_shapes(
    directory: Path,
    manifest: dict[str, Any],
    batch: int | None,
    seq: int | None,
    context: int | None,
) -> tuple[dict[str, tuple], list[str]]:
    """Per phase (description, batch, length) at the asked shape, and notes on it; a shape
    the artifact cannot run (beyond its cache or max_batch) is a PeakcError."""
    from peakc.runtime.artifact import read_example_inputs

    generation = manifest.get("generation")
    if generation is None:
        raise PeakcError(
            f"artifact {directory} is not a generation decoder: --batch, --seq and --context "
            "apply to generation artifacts; estimate it at its compiled shape"
        )
    example = read_example_inputs(directory, manifest)
    batch = int(example[0].shape[0]) if batch is None else batch
    tokens = int(example[0].shape[1]) if seq is None else seq
    slots, limit = int(generation["max_seq_len"]), int(generation["max_batch"])
    context = (seq or slots) if context is None else context
    for flag, value in (("--batch", batch), ("--seq", tokens), ("--context", context)):
        if value < 1:
            raise PeakcError(f"{flag} must be positive, got {value}")
    if batch > limit:
        raise PeakcError(
            f"artifact {directory}: batch {batch} exceeds its max_batch {limit} (its Generator "
            "refuses larger batches; compile with a larger --max-batch)"
        )
    for flag, value in (("--seq", tokens), ("--context", context)):
        if value > slots:
            raise PeakcError(
                f"artifact {directory}: {flag} {value} exceeds its KV cache of {slots} slots "
                "(compile with a larger --max-seq-len)"
            )
    notes = []
    runtime = (manifest["programs"].get("decoder") or {}).get("runtime") or {}
    graphs = sorted(runtime.get("decode_batches") or [])
    if graphs and batch > graphs[-1]:
        notes.append(
            f"batch {batch} is above the captured CUDA graphs (decode_batches {graphs}): the "
            "artifact refuses to decode it; priced as if it had a graph for it"
        )
    elif graphs and batch not in graphs:
        notes.append(
            f"batch {batch} has no CUDA graph (decode_batches {graphs}): it decodes eagerly, "
            "with host launch gaps this price leaves out"
        )
    shapes = {
        "prefill": (f"batch {batch} x {tokens} tokens", batch, tokens),
        "decode": (f"batch {batch} x 1 token, context {context} of {slots} slots", batch, context),
    }
    return shapes, notes


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
