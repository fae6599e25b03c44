"""Lower one program of a transformed graph into a triton program (program.py's format).

(once per graph: `apply_rewrites`, the backend's "rewrite" lowerings, e.g. linear_wq into its
kernels' repacked layout) -> plan fusion groups -> number the values -> one step per node, in
graph order: a group at its first node, a peakc op (or one of the backend's own) through its
Triton launcher, or its reference when none is registered or the lowering declines the node
(with the reason), a dense GEMM through the gemv launcher (cuBLAS unless tuned otherwise)
or, where it declines the node, on cuBLAS, any other ATen op by name -> kernels described
(template or group) with their source text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peakc.backends.triton.codegen import GroupKernel
from peakc.backends.triton.fusion import FusionPlan, plan_fusion
from peakc.backends.triton.program import (
    BACKEND,
    GEMMS,
    OPERATORS,
    PROGRAM_VERSION,
    encode_arg,
    template_source,
)
from peakc.errors import PeakcError
from peakc.ir.ops import backend_op_name, lowering_for, peakc_op_name

if TYPE_CHECKING:
    import torch.fx as fx

    from peakc.ir.graph import Graph


@dataclass
class LoweredProgram:
    """A program's JSON spec, its weight names, and what the report says of it."""

    spec: dict[str, Any]
    weights: list[str]
    plan: FusionPlan
    fallbacks: dict[str, str] = field(default_factory=dict)  # node name -> why its reference


def apply_rewrites(graph: Graph, context: Any = None) -> Graph:
    """A copy of the graph in which every node whose op has a "rewrite" triton lowering that
    accepts it is rewritten (into the backend's own ops and weights); declined nodes stay,
    and run their reference (the report gives the lowering's reason)."""
    import peakc.backends.triton.kernels  # noqa: F401  (registers the lowerings)

    rewritten = graph.copy()
    for node in list(rewritten.graph.nodes):
        name = peakc_op_name(node.target)
        lowering = lowering_for(name, BACKEND) if name else None
        if lowering is None or lowering.stage != "rewrite":
            continue
        if lowering.why_not is None or lowering.why_not(node, rewritten, context) is None:
            lowering.fn(rewritten, node, context)
    rewritten.recompile()
    return rewritten


def lower_program(
    graph: Graph, context: Any = None, bytes_of: Callable[[fx.Node], float] | None = None
) -> LoweredProgram:
    """The graph as a triton program spec (module docstring)."""
    import peakc.backends.triton.kernels  # noqa: F401  (registers the templated kernels)

    plan = plan_fusion(graph.graph, bytes_of)
    group_at = {g.nodes[0]: g for g in plan.groups}
    in_group = {n for g in plan.groups for n in g.nodes}
    ids: dict[fx.Node, int] = {}

    def value_id(node: fx.Node) -> int:
        if node not in ids:
            raise PeakcError(f"backend triton: node '{node.name}' is read before it is computed")
        return ids[node]

    def new_id(node: fx.Node) -> int:
        ids[node] = len(ids)
        return ids[node]

    weights = [n for n in graph.graph.nodes if n.op == "get_attr"]
    spec: dict[str, Any] = {
        "version": PROGRAM_VERSION,
        "weights": [new_id(n) for n in weights],
        "weight_names": [n.target for n in weights],  # what a cache-owning step loads itself
        "inputs": [new_id(n) for n in graph.graph.nodes if n.op == "placeholder"],
        "steps": [],
        "kernels": [],
    }
    lowered = LoweredProgram(spec, [n.target for n in weights], plan)
    for node in graph.graph.nodes:
        if node.op == "output":
            spec["outputs"] = encode_arg(node.args[0], value_id)
        if node.op != "call_function":
            continue
        if node in group_at:
            group = group_at[node]
            step = group_step(group, spec["kernels"], value_id, new_id)
            spec["steps"].append({**step, "nodes": [n.name for n in group.nodes]})
        if node in in_group:
            continue
        step = node_step(node, graph, context, value_id, spec["kernels"], lowered.fallbacks)
        spec["steps"].append({**step, "out": new_id(node), "nodes": [node.name]})
    spec["values"] = len(ids)
    return lowered


def group_step(group, kernels: list, value_id, new_id) -> dict[str, Any]:
    description = group.description()
    kernel = GroupKernel(description)  # generates (and caches) its source now
    kernels.append(
        {
            "kind": "group",
            "label": f"triton/group:{len(group.nodes)} ops",
            "description": description,
            "nodes": [n.name for n in group.nodes],
            "source": kernel.source,
        }
    )
    inputs = [{"value": value_id(n)} for n in group.inputs()]
    return {
        "kind": "group",
        "kernel": len(kernels) - 1,
        "args": inputs,
        "out": [new_id(n) for n in group.outputs()],
    }


def node_step(node, graph, context, value_id, kernels: list, fallbacks: dict) -> dict[str, Any]:
    """The step of one node outside the fusion groups."""
    args = encode_arg(list(node.args), value_id)
    kwargs = {k: encode_arg(v, value_id) for k, v in node.kwargs.items()}
    step = {"args": args, "kwargs": kwargs}
    name = peakc_op_name(node.target) or backend_op_name(node.target, BACKEND)
    if name is not None:
        lowering = lowering_for(name, BACKEND)
        reason = "no triton kernel" if lowering is None else None
        if lowering is not None and lowering.why_not is not None:
            reason = lowering.why_not(node, graph, context)
        if reason is not None:
            fallbacks[node.name] = f"{name}: {reason}"
            return {"kind": "reference", "op": name, "reason": reason, **step}
        kernels.append(template_entry(name, lowering, node))
        return {"kind": "kernel", "op": name, "kernel": len(kernels) - 1, **step}
    target = str(node.target)
    if target in GEMMS:
        return gemm_step(node, graph, value_id, kernels, step)
    if getattr(node.target, "__module__", None) == "_operator":
        if node.target.__name__ not in OPERATORS:
            raise PeakcError(f"backend triton: node '{node.name}': operator {target} unsupported")
        return {"kind": "aten", "op": f"operator.{node.target.__name__}", **step}
    if not target.startswith("aten."):
        raise PeakcError(f"backend triton: node '{node.name}': op {target} is not an ATen op")
    return {"kind": "aten", "op": target, **step}


def gemm_step(node, graph, value_id, kernels: list, step: dict[str, Any]) -> dict[str, Any]:
    """A dense GEMM: the backend's gemv launcher (cuBLAS by default; a Triton skinny GEMM for
    the shapes where tuning measured one faster) when it takes the node, else cuBLAS with the
    reason (kernels/gemv.py)."""
    from peakc.backends.triton.kernels.gemv import gemv_arguments, why_not_gemv

    dynamic = bool((graph.info.get("dynamic") or {}).get("dims"))
    reason = why_not_gemv(node, dynamic)
    if reason is not None:
        return {"kind": "gemm", "op": str(node.target), "reason": reason, **step}
    kernels.append(template_entry("gemv", lowering_for("gemv", BACKEND), node))
    args = encode_arg(gemv_arguments(node), value_id)
    return {"kind": "kernel", "op": "gemv", "kernel": len(kernels) - 1, "args": args, "kwargs": {}}


def template_entry(name: str, lowering, node) -> dict[str, Any]:
    """A templated kernel as the artifact stores it: op, label, the shapes and dtypes it was
    lowered for, the launcher's default config, and its source text (for reading)."""
    values = [a.meta.get("val") for a in node.all_input_nodes]
    configs = getattr(lowering.fn, "configs", None) or [{}]
    return {
        "kind": "template",
        "op": name,
        "label": lowering.label,
        "shapes": [[str(d) for d in v.shape] for v in values if hasattr(v, "shape")],
        "dtypes": [str(v.dtype).removeprefix("torch.") for v in values if hasattr(v, "dtype")],
        "config": dict(configs[0]),
        "source": template_source(lowering.fn),
    }
