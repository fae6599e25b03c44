"""The Python API: compile a model into an artifact, load one back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peakc.backends.base import get_backend
from peakc.cost_model.hardware import HardwareProfile, resolve_profile
from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.ir.graph import Graph
from peakc.models import ModelSource
from peakc.passes.base import PassContext
from peakc.passes.instruments import DumpIR, Parity, Reproducer, Timing, Verify
from peakc.passes.pipeline import Pipeline
from peakc.passes.prune import sparsity_record
from peakc.runtime.artifact import ArtifactContents, write_artifact


@dataclass
class Compiled:
    """The result of compile(): the transformed graph and the artifact contents to save."""

    graph: Graph
    contents: ArtifactContents
    records: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.graph.run(*inputs)

    def save(self, directory: str | Path, force: bool = False) -> Path:
        return write_artifact(self.contents, directory, force=force)


def compile(
    model: torch.nn.Module | Graph | ModelSource,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    *,
    pipeline: str | Pipeline = "default",
    backend: str = "eager",
    target: str | HardwareProfile = "cpu",
    dump_ir: str | Path | None = None,
    parity: bool = True,
    reproducer_dir: str | Path | None = None,
    source: str = "model",
    extra_files: dict[str, bytes] | None = None,
    progress: Any = None,
    dynamic: dict | None = None,
    generation: dict | None = None,
    calibration_data: Any = None,
) -> Compiled:
    """Capture `model`, run the pipeline, and lower it with the backend.

    `dynamic` declares dynamic input dimensions (see ir.capture); `generation` marks the model
    as a KV-cache decoder (peakc/models/kv_cache.py) with that cache layout. A ModelSource
    (peakc.models.load_source_for_task) brings its module or graph, example inputs, dynamic
    dims, cache layout and tokenizer files itself.
    """
    if isinstance(model, ModelSource):
        if example_inputs is not None or dynamic is not None or generation is not None:
            raise PeakcError(
                "compile: a ModelSource carries its example inputs, dynamic dims and cache "
                "layout; pass none of them"
            )
        extra_files = {**model.tokenizer_files, **(extra_files or {})}
        model, example_inputs, dynamic, generation = (
            model.graph if model.graph is not None else model.module,
            model.example_inputs,
            model.dynamic,
            model.generation,
        )
    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline.parse(pipeline)
    profile = target if isinstance(target, HardwareProfile) else resolve_profile(target)
    lowerer = get_backend(backend)
    instruments = [Timing(), Verify()]
    if parity:
        instruments.append(Parity())
    if dump_ir is not None:
        instruments.append(DumpIR(dump_ir))
    if reproducer_dir is not None:
        instruments.append(Reproducer(reproducer_dir))
    ctx = PassContext(target=profile, instruments=instruments, calibration_data=calibration_data)
    pipe.check(ctx)

    started = time.perf_counter()
    _step(progress, "capture")
    if isinstance(model, Graph):
        graph = model
    else:
        if example_inputs is None:
            raise PeakcError("compile: example_inputs are required to capture a module")
        graph = capture(model, example_inputs, name=source, dynamic=dynamic)
    if generation is not None:
        graph.info["generation"] = dict(generation)
    capture_seconds = time.perf_counter() - started
    _step(progress, "passes")
    graph, records = pipe.run(graph, ctx)
    _step(progress, f"lower ({backend})")
    contents = lowerer.lower(graph, ctx, str(pipe))
    contents.source = source
    contents.extra_files.update(extra_files or {})
    contents.report.update(
        source=source,
        pipeline=str(pipe),
        backend=backend,
        target=profile.name,
        capture_seconds=round(capture_seconds, 4),
        passes=records,
        fusion_near_misses=ctx.settings.get("fusion_near_misses", []),
        fingerprint=graph.fingerprint(),
    )
    if "generation" in graph.info:
        contents.extra_manifest["generation"] = graph.info["generation"]
    sparsity = sparsity_record(graph)
    if sparsity:  # pruned linears, so backends can pick sparse kernels (2:4 and friends)
        contents.extra_manifest["sparsity"] = sparsity
        contents.report["sparsity"] = sparsity
    contents.report_md = render_report(contents.report)
    return Compiled(graph, contents, records)


def _step(progress: Any, name: str) -> None:
    if progress is not None:
        progress(name)


def render_report(report: dict[str, Any]) -> str:
    """The readable report.md: what ran, how long, what changed."""
    lines = [
        f"# peakc report: {report.get('source')}",
        "",
        f"- pipeline: `{report.get('pipeline') or '(none)'}`",
        f"- backend: {report.get('backend')}, target: {report.get('target')}",
        f"- capture: {report.get('capture_seconds')} s, graph fingerprint "
        f"{report.get('fingerprint')}",
        "",
        "| # | pass | seconds | modified | parity rel. error | stats |",
        "|---|------|---------|----------|-------------------|-------|",
    ]
    for i, rec in enumerate(report.get("passes", []), 1):
        stats = ", ".join(f"{k}={v}" for k, v in rec.get("stats", {}).items())
        parity = rec.get("parity_rel_error")
        parity_text = "-" if parity is None else f"{parity:.2e}"
        lines.append(
            f"| {i} | `{rec['pass']}` | {rec.get('seconds', '-')} | {rec['modified']} | "
            f"{parity_text} | {stats} |"
        )
    ops = report.get("ops") or {}
    if ops:
        lines += ["", "## peakc ops", ""]
        lines += [f"- `{name}`: {how}" for name, how in sorted(ops.items())]
    backend = report.get(str(report.get("backend")))
    if isinstance(backend, dict):  # the backend's own record, e.g. report["ort"]
        lines += ["", f"## backend {report['backend']}", ""]
        lines += [f"- {key}: {_brief(value)}" for key, value in backend.items()]
    misses = report.get("fusion_near_misses") or []
    if misses:
        lines += ["", "## fusion near-misses", ""] + [f"- {m}" for m in misses]
    return "\n".join(lines) + "\n"


def _brief(value: Any, limit: int = 240) -> str:
    """One line for a report value: nested dicts as 'key value, ...', floats to 3 digits."""
    if isinstance(value, dict):
        text = ", ".join(f"{k} {_brief(v, limit)}" for k, v in value.items()) or "-"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_brief(v, limit) for v in value) or "-"
    elif isinstance(value, float):
        text = f"{value:.3g}"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load(directory: str | Path):
    """Load and verify an artifact directory; returns a callable LoadedArtifact."""
    from peakc.runtime.artifact import load_artifact

    return load_artifact(directory)
