"""Backend interface: lower a transformed Graph into artifact contents."""

from __future__ import annotations

from typing import ClassVar, Protocol

from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.ir.ops import get_lowering, peakc_op_name
from peakc.passes.base import PassContext
from peakc.runtime.artifact import ArtifactContents


class Backend(Protocol):
    name: ClassVar[str]

    def lower(self, graph: Graph, ctx: PassContext, pipeline: str) -> ArtifactContents: ...


BACKENDS: dict[str, type] = {}


def register_backend(cls: type) -> type:
    BACKENDS[cls.name] = cls
    return cls


def get_backend(spec: str) -> Backend:
    """A backend by name, with options as `name{key=value,...}` (e.g. `ort{device=cuda}`)."""
    import peakc.backends.eager  # noqa: F401

    name, _, rest = spec.partition("{")
    if name == "ort":  # needs onnx, onnxscript and onnxruntime: imported only when asked for
        import peakc.backends.ort.lower  # noqa: F401
    options = dict(item.split("=", 1) for item in rest.rstrip("}").split(",") if "=" in item)
    if name not in BACKENDS:
        known = ", ".join(sorted({*BACKENDS, "ort"}))
        raise PeakcError(f"unknown backend '{name}' (known: {known})")
    try:
        return BACKENDS[name](**options)
    except TypeError:
        raise PeakcError(f"backend '{name}' has no option(s) {', '.join(options)}") from None


def op_lowering_report(graph: Graph, backend: str) -> dict[str, str]:
    """For each peakc op in the graph: 'lowered' or 'reference' (no lowering for backend)."""
    report = {}
    for node in graph.call_nodes():
        name = peakc_op_name(node.target)
        if name is not None:
            report[name] = "lowered" if get_lowering(name, backend) else "reference"
    return report


def programs_to_export(graph: Graph) -> dict[str, Graph]:
    """The programs an artifact holds: `forward`, or for a generation decoder `decoder` (any
    prompt length: prefill) and `decode_step` (the same transformed graph exported with one new
    token per sequence). Both share the artifact's weights."""
    if "generation" not in graph.info:
        return {"forward": graph}
    ids, positions, k_cache, v_cache = graph.example_inputs
    dynamic = graph.info.get("dynamic") or {}
    step_dynamic = {
        "dims": {k: v for k, v in dynamic.get("dims", {}).items() if k != "seq"},
        "inputs": [
            {i: d for i, d in spec.items() if d != "seq"} for spec in dynamic.get("inputs", [])
        ],
    }
    step = graph.specialized((ids[:, :1], positions[:, :1], k_cache, v_cache), step_dynamic)
    return {"decoder": graph, "decode_step": step}


def program_name(graph: Graph) -> str:
    """`decoder` for a generation graph (prefill and decode), `forward` otherwise."""
    return "decoder" if "generation" in graph.info else "forward"
