"""eager: the transformed program in torch.export's format, run by PyTorch.

peakc ops run their reference implementations; the report lists them as such.
"""

from __future__ import annotations

from typing import ClassVar

from peakc.backends.base import op_lowering_report, programs_to_export, register_backend
from peakc.ir.graph import Graph
from peakc.passes.base import PassContext
from peakc.runtime.artifact import ArtifactContents, export_program


@register_backend
class EagerBackend:
    name: ClassVar[str] = "eager"

    def lower(self, graph: Graph, ctx: PassContext, pipeline: str) -> ArtifactContents:
        programs = {name: export_program(g) for name, g in programs_to_export(graph).items()}
        return ArtifactContents(
            backend=self.name,
            pipeline=pipeline,
            source=graph.info.get("name", "model"),
            weights=graph.weights(),
            example_inputs=graph.example_inputs,
            programs=programs,
            report={"ops": op_lowering_report(graph, self.name)},
        )
