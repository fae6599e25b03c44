"""triton backend: the transformed graph as a program of Triton kernels, cuBLAS GEMMs and ATen.

resolve the device -> the backend's rewrites (linear_wq into its kernels' layout) -> per
program (forward, or decoder + decode_step): lower (fusion groups, templated kernels,
fallbacks) -> build it on the device (every kernel checked against the GPU's capability and
the installed triton) -> parity against the graph on the example inputs -> tune the kernels'
configs (CUDA, tune=true) -> price it with the cost model, at the example shapes and, for a
generation decoder, at sample shapes `peakc estimate` interpolates -> artifact contents.
A graph cut by the partition pass is lowered stage by stage instead: one program and one
weights file per stage (backends/stages.py), each rewritten, built, checked and priced alone.
Nothing here imports torch or triton at module level (`peakc backends` lists the options).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from peakc.backends.base import Backend, lowering_report, programs_to_export, register_backend

if TYPE_CHECKING:
    from peakc.ir.graph import Graph
    from peakc.passes.base import PassContext
    from peakc.runtime.artifact import ArtifactContents, ProgramFile

# on the norm-wise relative error ‖triton − graph‖ / ‖graph‖, per output dtype
PARITY_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass
class TritonOptions:
    """Options of the triton backend (`triton{cuda_graph=true,decode_batches=[1,8]}`)."""

    # decode steps replayed as CUDA graphs, one per batch size in decode_batches (CUDA only)
    cuda_graph: bool = False
    # the decode batch sizes that get a CUDA graph: auto = 1..max_batch
    decode_batches: Literal["auto"] | list[int] = "auto"
    # time every config of each kernel on the device at compile time (CUDA only)
    tune: bool = False
    # the compile-time parity bound: auto = PARITY_TOL for the output's dtype, or a number
    parity_tol: Literal["auto"] | float = "auto"


@register_backend
class TritonBackend(Backend):
    """Triton kernels (templated for peakc ops, generated for fused ATen chains), cuBLAS for
    dense GEMMs, ATen for the rest; CUDA graphs for decode; per-shape tuned configs."""

    name: ClassVar[str] = "triton"
    Options: ClassVar[type] = TritonOptions
    lowers_stages: ClassVar[bool] = True

    def validate(self) -> None:
        self.check_runtime_options("auto")

    def lower(self, graph: Graph, ctx: PassContext, pipeline: str) -> ArtifactContents:
        from peakc.backends.stages import PLAN_KEY
        from peakc.backends.triton.device import resolve_device
        from peakc.runtime.artifact import ArtifactContents

        staged = PLAN_KEY in graph.info  # the partition pass ran: one program per stage
        if staged and self.options.cuda_graph:
            raise self.option_error(
                "cuda_graph",
                "does not apply to pipeline stages (partition): the pipeline runtime sends each "
                "decode step down the stages; leave cuda_graph off",
            )
        device = resolve_device()
        if (self.options.cuda_graph or self.options.tune) and device != "cuda":
            option = "cuda_graph" if self.options.cuda_graph else "tune"
            raise self.option_error(option, "needs a CUDA device (Triton is interpreting on CPU)")
        if staged:
            return self.lower_pipeline_stages(graph, ctx, pipeline, device)
        from peakc.backends.triton.lower import apply_rewrites

        batches = self.decode_batches(graph)
        rewritten = apply_rewrites(graph)  # imports the kernels, registering their lowerings
        ops = lowering_report(graph, self.name)
        graph = rewritten
        programs, reports = {}, {}
        for name, program in programs_to_export(graph).items():
            with ctx.progress(f"lower {name}", 1):  # a line of the CLI's progress display
                data, info, reports[name] = self.lower_one(name, program, ctx, device, batches)
            programs[name] = (data, info)
        if "decode_step" in programs:
            programs["decoder"][1].runtime["decode_program"] = "decode_step"
        return ArtifactContents(
            backend=self.name,
            pipeline=pipeline,
            source=graph.info.get("name", "model"),
            weights=graph.weights(),
            example_inputs=graph.example_inputs,
            programs=programs,
            report={
                "ops": ops,
                "triton": {"device": device, "decode_batches": batches, "programs": reports},
            },
        )

    def lower_pipeline_stages(
        self, graph: Graph, ctx: PassContext, pipeline: str, device: str
    ) -> ArtifactContents:
        """One triton program per stage of the graph's partition plan, each stage rewritten
        alone (so its weights file holds its rewritten weights). A stage is one program for
        prefill and decode alike: tune=true tunes it at its example shapes (other shapes run
        the default configs); no stage replays a CUDA graph (lower refuses cuda_graph)."""
        from peakc.backends.stages import lower_stages
        from peakc.backends.triton.lower import apply_rewrites

        reports: dict[str, Any] = {}

        def lower_stage(stage: Graph) -> tuple[bytes, ProgramFile]:
            name = f"stage_{stage.info['stage']['index']}"
            data, info, reports[name] = self.lower_one(name, stage, ctx, device, [])
            return data, info

        contents = lower_stages(graph, ctx, self.name, pipeline, lower_stage, apply_rewrites)
        contents.report["triton"] = {"device": device, "decode_batches": [], "programs": reports}
        return contents

    def decode_batches(self, graph: Graph) -> list[int]:
        """The batch sizes that get a decode CUDA graph (none without cuda_graph)."""
        generation = graph.info.get("generation")
        if not self.options.cuda_graph or generation is None:
            return []
        limit = int(generation["max_batch"])
        batches = self.options.decode_batches
        if batches == "auto":
            return list(range(1, limit + 1))
        if max(batches) > limit:
            raise self.option_error("decode_batches", f"{batches} exceeds max_batch {limit}")
        return sorted(set(batches))

    def lower_one(
        self, name: str, program: Graph, ctx: PassContext, device: str, batches: list[int]
    ):
        """(program file bytes, its ProgramFile, its report) for one program. Building it on
        the device checks every kernel against the GPU and triton (device.check_kernels)."""
        from peakc.backends.triton.cost import (
            ARTIFACT_PHASES,
            estimate_at_examples,
            price_program,
            sample_launches,
        )
        from peakc.backends.triton.lower import lower_program
        from peakc.backends.triton.program import TritonProgram, device_key
        from peakc.backends.triton.tuning import decode_inputs, tune_program
        from peakc.runtime.artifact import program_signature

        est = estimate_at_examples(program, ctx)
        sizes = {} if isinstance(est, str) else {n.name: n.bytes for n in est.nodes}
        bytes_of = (lambda node: sizes.get(node.name, 0.0)) if sizes else None
        lowered = lower_program(program, None, bytes_of)
        runnable = TritonProgram(lowered.spec, device)
        weights = [program.get_weight(name) for name in lowered.weights]
        parity = self.check_parity(program, runnable, weights)
        if self.options.tune:
            example = program.example_inputs
            sets = [example]
            if "generation" in program.info and example[0].shape[1] == 1:  # the decode step
                sets += [decode_inputs(example, batch) for batch in batches]
            configs = tune_program(runnable, weights, sets)
            lowered.spec["tuning"] = {"key": device_key(), "configs": configs}
        info = program_signature(program, lowered.weights, format="triton")
        info.runtime = {"cuda_graph": bool(self.options.cuda_graph), "decode_batches": batches}
        groups = lowered.plan.groups
        report = {
            "steps": len(lowered.spec["steps"]),
            "fusion_groups": len(groups),
            "fused_nodes": sum(len(g.nodes) for g in groups),
            "not_fused": lowered.plan.not_fused,
            "kernels": [k.get("label") for k in lowered.spec["kernels"]],
            "parity_rel_error": parity,
            "load_seconds": runnable.load_report["seconds"],
            "cost": est if isinstance(est, str) else price_program(lowered, est, ctx),
        }
        # `peakc estimate --batch`: the whole decoder's programs (a stage's inputs are not a
        # decoder's, so its launches are not sampled at other shapes)
        if not isinstance(est, str) and "generation" in program.info and name in ARTIFACT_PHASES:
            phase = ARTIFACT_PHASES[name]
            report["cost"]["shapes"] = sample_launches(program, lowered.plan, ctx.cost, phase)
        if isinstance(est, str):
            report["fallbacks"] = lowered.fallbacks
        return json.dumps(lowered.spec).encode(), info, report

    def check_parity(self, program: Graph, runnable: Any, weights: list) -> float:
        """The program against the graph on the example inputs: the worst output's norm-wise
        relative error, bounded by parity_tol or PARITY_TOL for its dtype."""
        import torch

        from peakc.errors import PeakcError
        from peakc.passes.instruments import relative_error

        with torch.no_grad():
            expected = program.run(*program.example_inputs)
            actual = runnable(*weights, *program.example_inputs)
        worst = 0.0
        for i, (want, got) in enumerate(zip(expected, actual)):
            if not isinstance(want, torch.Tensor):
                continue
            error = relative_error(got.to(want.device), want)
            tol = self.options.parity_tol
            if tol == "auto":
                tol = PARITY_TOL.get(str(want.dtype).removeprefix("torch."), 0.0)
            if error > tol:
                raise PeakcError(
                    f"backend triton: output_{i} differs from the graph by {error:.2e} relative "
                    f"(tolerance {tol:.0e}; triton{{parity_tol=...}} sets it)"
                )
            worst = max(worst, error)
        return worst
