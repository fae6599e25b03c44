"""fuse: rewrite ATen subgraphs into peakc ops with the rule engine."""

from __future__ import annotations

from dataclasses import dataclass

from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.passes.base import Pass, PassContext, PassResult, register_pass
from peakc.passes.fuse.engine import FusionRule, apply_rule
from peakc.passes.fuse.rms_norm import RmsNormRule

RULES: dict[str, type[FusionRule]] = {rule.name: rule for rule in (RmsNormRule,)}


@dataclass
class FuseOptions:
    rules: str = "all"  # "all" or rule names separated by "+", e.g. "rms_norm"


@register_pass
class Fuse(Pass):
    """Rewrite known ATen patterns into fused peakc ops (outputs unchanged)."""

    name = "fuse"
    Options = FuseOptions

    def selected(self) -> list[type[FusionRule]]:
        if self.options.rules == "all":
            return list(RULES.values())
        names = [r for r in self.options.rules.split("+") if r]
        for r in names:
            if r not in RULES:
                raise PeakcError(
                    f"pass 'fuse': option 'rules' names unknown rule '{r}' "
                    f"(known: {', '.join(RULES)})"
                )
        return [RULES[r] for r in names]

    def validate(self) -> None:
        self.selected()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int | str] = {}
        near_misses: list[str] = []
        for rule_cls in self.selected():
            report = apply_rule(graph, rule_cls())
            stats[f"fused.{rule_cls.name}"] = report.matched
            near_misses += report.near_misses
        ctx.settings.setdefault("fusion_near_misses", []).extend(near_misses)
        matched = sum(v for k, v in stats.items() if k.startswith("fused."))
        return PassResult(graph, modified=matched > 0, stats=stats)
