"""Capture: torch.export to an ATen-level FX graph that keeps the ops passes need to see."""

from __future__ import annotations

import os
import traceback

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from peakc.errors import PeakcError
from peakc.ir.experts import adopt_grouped_mm, tag_experts
from peakc.ir.graph import MODULE_KEY, Graph
from peakc.ir.linear_forms import recognize_linears

aten = torch.ops.aten

# Ops that carry meaning for passes and backends stay single nodes (DESIGN.md, "The IR level").
PRESERVED_OPS = (
    aten.linear.default,
    aten.scaled_dot_product_attention.default,
    aten.embedding.default,
    aten.layer_norm.default,
    aten.rms_norm.default,
    aten.silu.default,
    aten.gelu.default,
)


# Export-time metadata assertions: shapes and dtypes are static here and Graph.verify checks them.
DROPPED_OPS = (aten._assert_tensor_metadata.default,)


def decomposition_table() -> dict:
    """torch.export's default decompositions minus the preserved ops."""
    table = torch.export.default_decompositions()
    for op in PRESERVED_OPS:
        table.pop(op, None)
    return table


def capture(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    name: str = "model",
    dynamic: dict | None = None,
) -> Graph:
    """Export `model` on `example_inputs` (positional tensors) into a peakc Graph.

    `dynamic` declares dynamic dimensions in a JSON-friendly form (kept in graph.info and the
    artifact): {"dims": {"seq": [1, 512]}, "inputs": [{"1": "seq"}, ...]} (one entry per input).
    """
    if not isinstance(model, torch.nn.Module):
        raise PeakcError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    example_inputs = tuple(example_inputs)
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise PeakcError(f"{name}: example input {i} is a {type(t).__name__}, not a tensor")
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(
                model, example_inputs, dynamic_shapes=export_dynamic_shapes(dynamic), strict=False
            )
            program = program.run_decompositions(decomposition_table())
    except PeakcError:
        raise
    except Exception as exc:
        raise PeakcError(f"cannot export {name}: {_export_failure(exc)}") from exc
    info = {"name": name}
    if dynamic:
        info["dynamic"] = dynamic
    graph = from_exported(program, example_inputs, info=info)
    # Linears spelled `x @ W.T + b` in a module's forward reach passes as aten.linear too.
    if recognize_linears(graph.graph):
        graph.recompile()
    tag_experts(graph)  # mixture-of-experts layers: each expert's nodes carry its index
    if adopt_grouped_mm(graph):  # stacked experts' routed matmuls as a peakc op
        graph.recompile()
    return graph


def export_dynamic_shapes(dynamic: dict | None, leading: int = 0) -> tuple | None:
    """torch.export's dynamic_shapes from the JSON form; `leading` static inputs come first."""
    if not dynamic:
        return None
    dims = {
        name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in dynamic["dims"].items()
    }
    per_input = [{int(i): dims[d] for i, d in spec.items()} for spec in dynamic["inputs"]]
    return tuple([None] * leading + per_input)


def from_exported(
    program: ExportedProgram, example_inputs: tuple[torch.Tensor, ...], info: dict | None = None
) -> Graph:
    """Turn an ExportedProgram's lifted graph into a Graph with weights as get_attr nodes."""
    signature = program.graph_signature
    kinds = {spec.arg.name: spec for spec in signature.input_specs}
    for spec in signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise PeakcError(
                f"model mutates '{spec.target}' during forward ({spec.kind.name}); "
                "peakc captures inference graphs without state mutation"
            )
    values = dict(program.state_dict)
    values.update(program.constants)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    weights: dict[str, torch.Tensor] = {}
    old_nodes = list(program.graph.nodes)
    for node in old_nodes:
        if node.op != "placeholder":
            continue
        spec = kinds[node.name]
        if spec.kind == InputKind.USER_INPUT:
            new = graph.placeholder(node.name)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            weights[spec.target] = values[spec.target]
            new = graph.get_attr(spec.target)
        else:
            raise PeakcError(f"input '{node.name}' of kind {spec.kind.name} is not supported")
        new.meta = dict(node.meta)
        env[node] = new
    for node in old_nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], env.__getitem__))
            continue
        if node.target in DROPPED_OPS:
            continue
        new = graph.node_copy(node, env.__getitem__)
        new.meta = dict(node.meta)
        new.meta[MODULE_KEY] = module_path(node)
        env[node] = new
    # get_attr nodes first in graph order, then inputs: matches the lifted layout.
    return Graph.from_parts(graph, weights, example_inputs, info)


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node (`layers.3.mlp.down_proj`), or '' for the root."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.meta.get(MODULE_KEY, "")
    path, _ = list(stack.values())[-1]
    return _normalize_path(path)


def _normalize_path(path: str) -> str:
    # Strict-mode paths look like "L['self'].layers[0].mlp"; normalize to "layers.0.mlp".
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path.strip(".")


def _export_failure(exc: BaseException) -> str:
    """One line: the exporter's reason and the innermost model-code frame it came from."""
    text = str(exc).strip()
    reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    if len(reason) > 300:
        reason = reason[:297] + "..."
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f.filename.startswith(torch_dir) and "peakc" not in f.filename]
    where = (
        f" (at {os.path.basename(user[-1].filename)}:{user[-1].lineno} in {user[-1].name})"
        if user
        else ""
    )
    return f"{type(exc).__name__}: {reason}{where}"
