"""Pipeline-stage artifacts: one program and one weights file per stage of a partition plan.

The partition pass records its plan in `graph.info["partition"]`; a backend that finds one
lowers each stage's Graph (`peakc.ir.stages.split_stages`) as its own program `stage_<s>` with
its own `stage_<s>.safetensors`, so a process reads only the stage it runs (a backend that
rewrites weights into its kernels' layout rewrites each stage alone). The manifest's
`partition` entry records the cut, the schedule, the microbatches, the world size the
artifact expects and, per stage, its program, weights file, rank, units and cached layers
(`peakc.runtime.pipeline` runs it).
"""

from __future__ import annotations

from collections.abc import Callable

from peakc.backends.base import lowering_report
from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.ir.stages import split_stages, stage_units
from peakc.passes.base import PassContext
from peakc.runtime.artifact import ArtifactContents, ProgramFile
from peakc.runtime.pipeline import PLAN_KEY

ExportFn = Callable[[Graph], tuple[bytes, ProgramFile]]
PrepareFn = Callable[[Graph], Graph]


def lower_stages(
    graph: Graph,
    ctx: PassContext,
    backend: str,
    pipeline: str,
    export: ExportFn,
    prepare: PrepareFn | None = None,
) -> ArtifactContents:
    """Artifact contents holding every stage of the graph's partition plan, each exported by
    `export` (the backend's program exporter) after `prepare` (the backend's rewrites of a
    stage, e.g. triton's weight repacking): a stage's weights file holds the prepared stage's
    weights."""
    plan = graph.info[PLAN_KEY]
    world = plan["world_size"]
    names = [u.name for u in stage_units(graph)]
    if names != plan["units"]:
        raise PeakcError(
            "partition: the graph's blocks changed after the partition pass (a later pass "
            "rewrote them); put partition last in the pipeline"
        )
    bounds = plan["boundaries"]
    programs, weight_files, entries = {}, {}, []
    for s, stage in enumerate(split_stages(graph, bounds)):
        name = f"stage_{s}"
        if prepare is not None:
            stage = prepare(stage)
        with ctx.progress(f"export {name}", 1):  # a line of the CLI's progress display
            programs[name] = export(stage)
        weight_files[f"{name}.safetensors"] = stage.weights()
        entries.append(
            {
                "program": name,
                "weights": f"{name}.safetensors",
                "rank": s % world,
                "units": names[bounds[s] : bounds[s + 1]],
                "layers": stage.info["stage"]["layers"],
            }
        )
    return ArtifactContents(
        backend=backend,
        pipeline=pipeline,
        source=graph.info.get("name", "model"),
        weights={},
        example_inputs=graph.example_inputs,
        programs=programs,
        report={"ops": lowering_report(graph, backend), PLAN_KEY: plan},
        extra_manifest={PLAN_KEY: {**plan, "stages": entries}},
        weight_files=weight_files,
    )
