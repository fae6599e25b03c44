"""Pipeline: a textual spec of passes that round-trips, and the loop that runs them.

The grammar (`name{key=value,...},...`, typed values, lists) is peakc/passes/spec.py's, shared
with backend specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.passes.base import Pass, PassContext, PassResult, get_pass
from peakc.passes.spec import SpecError, build_options, format_options, parse_items

__all__ = ["NAMED_PIPELINES", "Pipeline", "SpecError", "format_pass"]

NAMED_PIPELINES = {
    "default": "cleanup,fuse",
    "none": "",
}


@dataclass
class Pipeline:
    passes: list[Pass]

    @classmethod
    def parse(cls, spec: str) -> Pipeline:
        """Parse a spec (or a named pipeline); raise SpecError that says where it is wrong."""
        text = NAMED_PIPELINES.get(spec.strip(), spec)
        return cls([_instantiate(item) for item in parse_items(text, "pass")])

    def __str__(self) -> str:
        return ",".join(format_pass(p) for p in self.passes)

    def check(self, ctx: PassContext) -> None:
        """Before any work: every pass's requirements are met by the context."""
        have = ctx.provides()
        for i, p in enumerate(self.passes):
            missing = [r for r in p.requires if r not in have]
            if missing:
                raise PeakcError(
                    f"pass '{p.name}' (#{i + 1}) needs {', '.join(missing)}, which was not given"
                    + (" (use --calib-data PATH)" if "calibration_data" in missing else "")
                )

    def run(self, graph: Graph, ctx: PassContext) -> tuple[Graph, list[dict[str, Any]]]:
        """Run every pass in order with the context's instruments; returns graph and records."""
        self.check(ctx)
        graph.verify()  # always: instruments observe, they never decide whether graphs are valid
        for inst in ctx.instruments:
            inst.before_pipeline(graph, ctx)
        records = []
        for index, p in enumerate(self.passes):
            before = graph
            record: dict[str, Any] = {"pass": str(p), "name": p.name}
            for inst in ctx.instruments:
                inst.before_pass(p, graph, index)
            try:
                result = p.run(graph.copy(), ctx)
                if not isinstance(result, PassResult):
                    raise PeakcError(f"returned {type(result).__name__}, not PassResult")
                result.graph.recompile()
                try:
                    result.graph.verify()
                except PeakcError as exc:
                    raise PeakcError(f"graph invalid after pass: {exc}") from exc
                for inst in ctx.instruments:
                    inst.after_pass(p, result, index, record)
            except Exception as exc:
                done = [str(q) for q in self.passes[:index]]
                remaining = Pipeline(self.passes[index:])
                for inst in ctx.instruments:
                    inst.on_failure(p, before, index, remaining, exc)
                detail = (
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                )
                raise PeakcError(
                    f"pass '{p.name}' (#{index + 1}) failed after [{', '.join(done)}]: {detail}"
                ) from exc
            record.update(modified=result.modified, stats=result.stats)
            if result.report:
                record["report"] = result.report
            records.append(record)
            graph = result.graph
        return graph, records


def format_pass(p: Pass) -> str:
    """`name{k=v,...}` listing options that differ from their defaults."""
    return format_options(p.name, p.options, type(p)().options)


def _instantiate(item) -> Pass:
    cls = get_pass(item.name)
    return cls(build_options(cls, item))
