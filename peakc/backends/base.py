"""Backend interface: typed options, the registry, and the per-op lowering report.

A backend is a class with a `name`, an `Options` dataclass (the pass options' grammar and
types: `ort{device=cuda,decode_batches=[1,8]}`) and `lower(graph, ctx, pipeline)` returning
artifact contents. How it runs each peakc op is registered in the op set's one registry
(`peakc.ir.ops.register_lowering`), from the backend's own folder; `lowering_report` turns
that registry into the report's per-op "lowered / reference (why)".
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.ir.ops import lowering_for, peakc_op_name
from peakc.passes.base import NoOptions, PassContext
from peakc.passes.spec import (
    build_options,
    check_options_class,
    format_options,
    parse_item,
    parse_items,
)
from peakc.runtime.artifact import ArtifactContents

# Built-in backends, imported when first asked for (ort needs onnx, onnxscript, onnxruntime).
BUILTIN_BACKENDS = {
    "eager": "peakc.backends.eager",
    "ort": "peakc.backends.ort.lower",
    "triton": "peakc.backends.triton.backend",
}


class Backend:
    """Lowers a transformed Graph into artifact contents.

    Subclasses set `name`, `Options` (a dataclass of typed options with defaults) and
    `lower`; `validate()` raises a one-line PeakcError naming an out-of-range option.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "backend"  # how spec errors name the owner of options
    Options: ClassVar[type] = NoOptions
    # lowers a partition plan (graph.info["partition"]) as one program per pipeline stage;
    # a backend that does not is refused such a graph rather than ignoring the plan
    lowers_stages: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.validate()

    def validate(self) -> None:
        """Raise PeakcError naming the option when option values are out of range."""

    def lower(self, graph: Graph, ctx: PassContext, pipeline: str) -> ArtifactContents:
        raise NotImplementedError

    def option_error(self, option: str, message: str) -> PeakcError:
        return PeakcError(f"backend '{self.name}': option '{option}' {message}")

    def check_runtime_options(self, batch_words: str) -> None:
        """The GPU backends' shared options: `parity_tol` (auto or a number >= 0) and
        `decode_batches` (`batch_words`, e.g. "auto", or batch sizes >= 1)."""
        tol = self.options.parity_tol
        if tol != "auto" and not tol >= 0:
            raise self.option_error("parity_tol", f"must be auto or a number >= 0; got '{tol}'")
        batches = self.options.decode_batches
        if isinstance(batches, list) and (not batches or min(batches) < 1):
            raise self.option_error(
                "decode_batches",
                f"must be {batch_words} or batch sizes >= 1 like [1,8]; got {batches}",
            )

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options

    def __str__(self) -> str:
        return format_options(self.name, self.options, self.Options())

    def __repr__(self) -> str:
        return f"<backend {self}>"


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a Backend available as `--backend NAME{...}`."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)) or not cls.name:
        raise PeakcError(f"register_backend: {cls!r} is not a named subclass of Backend")
    check_options_class(cls)
    BACKENDS[cls.name] = cls
    return cls


def backend_class(name: str) -> type[Backend]:
    """A backend class by name, importing a built-in one on first use."""
    if name not in BACKENDS and name in BUILTIN_BACKENDS:
        importlib.import_module(BUILTIN_BACKENDS[name])
    if name not in BACKENDS:
        known = ", ".join(sorted({*BACKENDS, *BUILTIN_BACKENDS}))
        raise PeakcError(f"unknown backend '{name}' (known: {known})")
    return BACKENDS[name]


def load_builtin_backends() -> dict[str, type[Backend]]:
    """Every built-in backend class (for listings such as `peakc backends`)."""
    for name in BUILTIN_BACKENDS:
        backend_class(name)
    return dict(sorted(BACKENDS.items()))


def get_backend(spec: str | Backend) -> Backend:
    """A backend from its spec, `name{key=value,...}` in the pipeline grammar (typed values,
    lists `[1,8]`; errors name the backend, the option and the column)."""
    if isinstance(spec, Backend):
        return spec
    item = parse_item(spec, "backend")
    cls = backend_class(item.name)
    return cls(build_options(cls, item))


def get_backends(spec: str | Backend | Sequence[str | Backend]) -> list[Backend]:
    """The backends that lower one transformed graph: a comma-separated spec
    (`triton,ort{device=cuda}`) or a list of specs and Backends. Each is named at most once
    (each writes the artifact named after it)."""
    if isinstance(spec, Backend):
        return [spec]
    if isinstance(spec, str):
        items = parse_items(spec, "backend")
        if not items:
            raise PeakcError("--backend is empty: name one, like eager, ort or triton")
        backends = []
        for item in items:
            cls = backend_class(item.name)
            backends.append(cls(build_options(cls, item)))
    else:
        backends = [b for entry in spec for b in get_backends(entry)]
        if not backends:
            raise PeakcError("compile: the backend list is empty: name one, like eager or ort")
    names = [b.name for b in backends]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise PeakcError(
            f"backend '{twice[0]}' is named twice: each backend writes one artifact, named "
            "after it; give it once, with all its options"
        )
    return backends


@dataclass
class OpLowering:
    """What the report says of one peakc op: its label and the nodes that were not lowered."""

    nodes: int = 0
    declined: int = 0
    reason: str = ""


def lowering_report(
    graph: Graph, backend: str, context: Any = None, unlowered: str = "reference"
) -> dict[str, str]:
    """Per peakc op in the graph, from the registry: the lowering's label when every node is
    lowered; `unlowered` when the backend registered none; otherwise how many nodes run the
    fallback, and why (each lowering's `why_not(node, graph, context)` decides per node)."""
    seen: dict[str, OpLowering] = {}
    for node in graph.call_nodes():
        name = peakc_op_name(node.target)
        if name is None:
            continue
        entry = seen.setdefault(name, OpLowering())
        entry.nodes += 1
        lowering = lowering_for(name, backend)
        reason = lowering.why_not(node, graph, context) if lowering and lowering.why_not else None
        if reason is not None:
            entry.declined += 1
            entry.reason = entry.reason or reason
    report = {}
    for name, entry in seen.items():
        lowering = lowering_for(name, backend)
        if lowering is None:
            report[name] = unlowered
            continue
        if not entry.declined:
            report[name] = lowering.label
            continue
        fallback = f"{entry.declined} {lowering.fallback}"
        if lowering.fallback == "reference":
            fallback += f" ({entry.reason})"
        report[name] = (
            fallback if entry.declined == entry.nodes else f"{lowering.label}; {fallback}"
        )
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
