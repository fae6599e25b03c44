"""eager: the transformed program in torch.export's format, run by PyTorch.

peakc ops run their reference implementations (or, where one is registered for "eager",
their lowering); the report lists each op from the lowering registry.
"""

from __future__ import annotations

from typing import ClassVar

from peakc.backends.base import Backend, lowering_report, programs_to_export, register_backend
from peakc.backends.stages import PLAN_KEY, lower_stages
from peakc.ir.graph import Graph
from peakc.passes.base import PassContext
from peakc.runtime.artifact import ArtifactContents, export_program


@register_backend
class EagerBackend(Backend):
    """The program as torch.export archives with weights as leading inputs; nothing pickled."""

    name: ClassVar[str] = "eager"
    lowers_stages: ClassVar[bool] = True

    def lower(self, graph: Graph, ctx: PassContext, pipeline: str) -> ArtifactContents:
        if PLAN_KEY in graph.info:  # the partition pass ran: one program per pipeline stage
            return lower_stages(graph, ctx, self.name, pipeline, export_program)
        programs = {}
        for name, program in programs_to_export(graph).items():
            with ctx.progress(f"export {name}", 1):  # a line of the CLI's progress display
                programs[name] = export_program(program)
        return ArtifactContents(
            backend=self.name,
            pipeline=pipeline,
            source=graph.info.get("name", "model"),
            weights=graph.weights(),
            example_inputs=graph.example_inputs,
            programs=programs,
            report={"ops": lowering_report(graph, self.name)},
        )
