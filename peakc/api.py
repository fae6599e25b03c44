"""The Python API: compile a model into an artifact, load one back."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peakc.backends.base import Backend, get_backends
from peakc.cost_model.hardware import HardwareProfile, resolve_profile
from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.ir.graph import Graph
from peakc.models import ModelSource
from peakc.passes.base import PassContext
from peakc.passes.instruments import DumpIR, Instrument, Parity, Reproducer, Timing
from peakc.passes.pipeline import Pipeline
from peakc.progress import ProgressTask
from peakc.runtime.artifact import ArtifactContents, check_replaceable, write_artifact


@dataclass
class Compiled:
    """The result of compile(): the transformed graph and the artifact contents to save."""

    graph: Graph
    contents: ArtifactContents
    records: list[dict[str, Any]] = field(default_factory=list)
    instruments: Sequence[Instrument] = ()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.graph.run(*inputs)

    def save(self, directory: str | Path, force: bool = False) -> Path:
        """Write the artifact; the report's timing table gains the save phase and the total."""
        started = time.perf_counter()
        timing = self.contents.report.setdefault("timing", [])

        def finish_report(contents: ArtifactContents) -> None:
            seconds = time.perf_counter() - started  # everything but the report and manifest
            timing[:] = [row for row in timing if row["phase"] != "save"]  # saved again
            timing.append({"phase": "save", "seconds": round(seconds, 4)})
            contents.report["total_seconds"] = round(sum(row["seconds"] for row in timing), 4)
            contents.report_md = render_report(contents.report)

        with _phase(self.instruments, "save"):
            return write_artifact(
                self.contents, directory, force=force, before_report=finish_report
            )


@dataclass
class CompiledSet:
    """The result of compile() with several backends (`backend="triton,ort"`): one pipeline
    run's graph lowered by each, an artifact per backend (`compiled["ort"]`)."""

    graph: Graph
    artifacts: dict[str, Compiled]
    instruments: Sequence[Instrument] = ()

    def __getitem__(self, backend: str) -> Compiled:
        return self.artifacts[backend]

    def save(self, directory: str | Path, force: bool = False) -> dict[str, Path]:
        """Write each artifact into DIR/<backend> (each loads alone); DIR holds nothing else.
        `force` replaces a DIR written this way before."""
        directory = Path(directory)
        check_artifact_set(directory, force)
        directory.mkdir(parents=True, exist_ok=True)
        return {
            name: compiled.save(directory / name, force=force)
            for name, compiled in self.artifacts.items()
        }


def check_artifact_set(directory: Path, force: bool) -> None:
    """A folder of per-backend artifacts may be replaced only with `force`, and only when
    everything in it is a peakc artifact (a user's files are never deleted)."""
    if not directory.exists():
        return
    if not force:
        raise PeakcError(f"output folder {directory} already exists (use --force to replace it)")
    if not directory.is_dir():
        raise PeakcError(f"output {directory} is a file, not a folder of peakc artifacts")
    for entry in directory.iterdir():
        check_replaceable(entry, force)


def compile(
    model: torch.nn.Module | Graph | ModelSource,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    *,
    pipeline: str | Pipeline = "default",
    backend: str | Backend | Sequence[str | Backend] = "eager",
    target: str | HardwareProfile = "cpu",
    dump_ir: str | Path | None = None,
    parity: bool = True,
    reproducer_dir: str | Path | None = None,
    source: str = "model",
    extra_files: dict[str, bytes] | None = None,
    instruments: Sequence[Instrument] = (),
    timing: dict[str, float] | None = None,
    dynamic: dict | None = None,
    generation: dict | None = None,
    calibration_data: Any = None,
) -> Compiled | CompiledSet:
    """Capture `model`, run the pipeline, and lower it with the backend.

    Several backends (`"triton,ort"` or a list) lower the one transformed graph each: a
    CompiledSet of one artifact per backend, every report naming the shared graph fingerprint.

    `dynamic` declares dynamic input dimensions (see ir.capture); `generation` marks the model
    as a KV-cache decoder (peakc/models/kv_cache.py) with that cache layout. A ModelSource
    (peakc.models.load_source_for_task) brings its module or graph, example inputs, dynamic
    dims, cache layout and tokenizer files itself.

    The library prints nothing: `instruments` (e.g. the CLI's progress bars) hear about each
    phase (capture, lower, save) as a one-step progress task, and about each pass and its
    long-running work. `timing` holds seconds spent before the call (e.g. {"load": 12.3}); the
    report's timing table lists them first, then capture, each pass, lower and save.
    """
    compile_started = time.perf_counter()
    weights_dtype = None  # a ModelSource says what --dtype made of its weights
    if isinstance(model, ModelSource):
        if example_inputs is not None or dynamic is not None or generation is not None:
            raise PeakcError(
                "compile: a ModelSource carries its example inputs, dynamic dims and cache "
                "layout; pass none of them"
            )
        extra_files = {**model.tokenizer_files, **(extra_files or {})}
        weights_dtype = model.dtype
        model, example_inputs, dynamic, generation = (
            model.graph if model.graph is not None else model.module,
            model.example_inputs,
            model.dynamic,
            model.generation,
        )
    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline.parse(pipeline)
    profile = target if isinstance(target, HardwareProfile) else resolve_profile(target)
    lowerers = get_backends(backend)
    listeners = tuple(instruments)  # the caller's: they hear phases, passes and progress
    instruments = [Timing(), *listeners]
    if parity:
        instruments.append(Parity())
    if dump_ir is not None:
        instruments.append(DumpIR(dump_ir))
    if reproducer_dir is not None:
        instruments.append(Reproducer(reproducer_dir))
    ctx = PassContext(target=profile, instruments=instruments, calibration_data=calibration_data)
    pipe.check(ctx)
    unstaged = [b.name for b in lowerers if not b.lowers_stages]
    if any(p.name == "partition" for p in pipe.passes) and unstaged:
        raise PeakcError(  # before capture: the backend would drop the stage plan
            f"backend '{unstaged[0]}' does not lower pipeline stages (pass 'partition'): "
            "compile with --backend eager or triton, or leave partition out of the pipeline"
        )

    earlier = [{"phase": name, "seconds": round(s, 4)} for name, s in (timing or {}).items()]
    rows = list(earlier)
    started = time.perf_counter()
    with _phase(ctx.instruments, "capture"):
        if isinstance(model, Graph):
            graph = model
        else:
            if example_inputs is None:
                raise PeakcError("compile: example_inputs are required to capture a module")
            graph = capture(model, example_inputs, name=source, dynamic=dynamic)
    if generation is not None:
        graph.info["generation"] = dict(generation)
    capture_seconds = time.perf_counter() - started
    rows.append({"phase": "capture", "seconds": round(capture_seconds, 4)})
    started = time.perf_counter()
    graph, records = pipe.run(graph, ctx)
    passes_seconds = time.perf_counter() - started
    rows += [{"phase": f"pass {r['pass']}", "seconds": r.get("seconds", 0.0)} for r in records]
    # verification, parity and dumps around the passes: the pipeline's time beyond the passes'
    checks = passes_seconds - sum(r.get("seconds", 0.0) for r in records)
    rows.append({"phase": "pipeline checks (parity, dumps)", "seconds": round(max(checks, 0), 4)})
    fingerprint = graph.fingerprint()  # of the graph every backend is given
    lowered: dict[str, Compiled] = {}
    lower_rows = []
    for lowerer in lowerers:
        own = graph.copy() if len(lowerers) > 1 else graph  # a backend may rewrite its graph
        started = time.perf_counter()
        with _phase(ctx.instruments, f"lower ({lowerer.name})"):
            contents = lowerer.lower(own, ctx, str(pipe))
        row = {
            "phase": f"lower ({lowerer.name})",
            "seconds": round(time.perf_counter() - started, 4),
        }
        lower_rows.append(row)
        contents.source = source
        contents.extra_files.update(extra_files or {})
        contents.report.update(
            source=source,
            pipeline=str(pipe),
            backend=lowerer.name,
            backend_options=str(lowerer),
            target=profile.name,
            capture_seconds=round(capture_seconds, 4),
            passes=records,
            timing=[*rows, row],
            fusion_near_misses=[
                m for r in records for m in r.get("report", {}).get("near_misses", [])
            ],
            fingerprint=fingerprint,
            dtype=weights_dtype,
        )
        _record_graph_info(graph, contents)
        lowered[lowerer.name] = Compiled(graph, contents, records, listeners)
    measured = sum(r["seconds"] for r in rows[len(earlier) :] + lower_rows)
    other = {
        "phase": "setup and report",
        "seconds": round(max(0, _since(compile_started) - measured), 4),
    }
    one_pipeline = {"backends": list(lowered), "fingerprint": fingerprint}
    for compiled in lowered.values():
        compiled.contents.report["timing"].append(other)
        if len(lowered) > 1:  # each artifact says it was made from this one pipeline run
            compiled.contents.report["one_pipeline"] = one_pipeline
            compiled.contents.extra_manifest["one_pipeline"] = one_pipeline
        compiled.contents.report_md = render_report(compiled.contents.report)
    if len(lowered) == 1:
        return next(iter(lowered.values()))
    return CompiledSet(graph, lowered, listeners)


def _record_graph_info(graph: Graph, contents: ArtifactContents) -> None:
    """What the runtime reads from the graph beyond its programs: the cache layout of a
    generation decoder, the offload placement, the pruned linears (for sparse kernels)."""
    if "generation" in graph.info:
        contents.extra_manifest["generation"] = graph.info["generation"]
    if "offload" in graph.info:  # the offload pass's placement, followed on a GPU
        contents.extra_manifest["offload"] = graph.info["offload"]
    sparsity = graph.sparsity_record()
    if sparsity:  # pruned linears, so backends can pick sparse kernels (2:4 and friends)
        contents.extra_manifest["sparsity"] = sparsity
        contents.report["sparsity"] = sparsity


def _since(started: float) -> float:
    return time.perf_counter() - started


@contextmanager
def _phase(instruments: Sequence[Instrument], name: str) -> Iterator[None]:
    """A compile phase, told to the instruments as a one-step progress task (left open when
    the phase fails, so a progress display does not show it done)."""
    task = ProgressTask(name, 1, instruments)
    yield
    task.close()


def render_report(report: dict[str, Any]) -> str:
    """The readable report.md: what ran, how long, what changed."""
    lines = [
        f"# peakc report: {report.get('source')}",
        "",
        f"- pipeline: `{report.get('pipeline') or '(none)'}`",
        f"- backend: {report.get('backend')}, target: {report.get('target')}, "
        f"weights: {report.get('dtype') or 'as given'}",
        f"- capture: {report.get('capture_seconds')} s, graph fingerprint "
        f"{report.get('fingerprint')}",
        *_one_pipeline_lines(report.get("one_pipeline")),
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
    lines += _cost_lines(report.get("passes", []))
    lines += _timing_lines(report.get("timing") or [], report.get("total_seconds"))
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


def _one_pipeline_lines(shared: dict[str, Any] | None) -> list[str]:
    """For an artifact compiled with several backends: which artifacts share its graph."""
    if not shared:
        return []
    return [
        f"- one pipeline run, lowered by {', '.join(shared['backends'])} (one artifact each, "
        f"same graph fingerprint {shared['fingerprint']})"
    ]


def cost_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pass and phase whose predicted cost (GraphCost dicts) the pass recorded
    before and after it ran: pass, target, phase, before, after (PhaseCost dicts)."""
    rows = []
    for rec in records:
        cost = (rec.get("report") or {}).get("cost") or {}
        before, after = cost.get("before") or {}, cost.get("after") or {}
        for phase in ("prefill", "decode"):
            if before.get(phase) and after.get(phase):
                row = {"pass": rec["pass"], "phase": phase}
                row["target"] = f"{after.get('target')} ({after.get('runtime')})"
                rows.append({**row, "before": before[phase], "after": after[phase]})
    return rows


def _cost_lines(records: list[dict[str, Any]]) -> list[str]:
    rows = cost_rows(records)
    if not rows:
        return []
    lines = [
        "",
        f"## predicted cost on {rows[0]['target']}",
        "",
        "| pass | phase | batch x tokens (context) | ms before | ms after | "
        "device MB before | device MB after |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        before, after = row["before"], row["after"]
        shape = f"{after['batch']} x {after['tokens']} ({after['context']})"
        lines.append(
            f"| `{row['pass']}` | {row['phase']} | {shape} | {before['ms']:.3f} | "
            f"{after['ms']:.3f} | {before['device_mb']:.1f} | {after['device_mb']:.1f} |"
        )
    return lines


def _timing_lines(timing: list[dict[str, Any]], total: float | None) -> list[str]:
    if not timing:
        return []
    total = total if total is not None else sum(row["seconds"] for row in timing)
    lines = ["", "## time", "", "| phase | seconds | share |", "|-------|---------|-------|"]
    for row in timing:
        share = row["seconds"] / total if total else 0.0
        lines.append(f"| {row['phase']} | {row['seconds']:.3f} | {share:.0%} |")
    lines.append(f"| **total** | {total:.3f} | |")
    return lines


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

    use_cuda_kernels()
    return load_artifact(directory)


def use_cuda_kernels() -> None:
    """On a CUDA machine with Triton, run linear_wq, the 2:4 ops and grouped_mm_compressed of
    eager programs on the Triton kernels (their CUDA implementation); elsewhere they keep
    their references."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    from peakc.backends.triton.kernels import grouped_mm_compressed
    from peakc.backends.triton.kernels.compressed_linear import register_cuda_kernels

    register_cuda_kernels()
    grouped_mm_compressed.register_cuda_kernel()
