"""fuse: rewrite ATen subgraphs into peakc ops with the rule engine."""

from __future__ import annotations

from dataclasses import dataclass

from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.ir.ops import peakc_op_name
from peakc.passes.base import Pass, PassContext, PassResult, register_pass
from peakc.passes.fuse.addmm_linear import AddmmLinearRule
from peakc.passes.fuse.attention import AttentionRule
from peakc.passes.fuse.engine import FusionRule, Match, apply_rule
from peakc.passes.fuse.gelu import GeluRule
from peakc.passes.fuse.glu import GluRule
from peakc.passes.fuse.horizontal import HorizontalLinearRule
from peakc.passes.fuse.layer_norm import LayerNormRule
from peakc.passes.fuse.linear_act import LinearActRule
from peakc.passes.fuse.pattern import PatternRule
from peakc.passes.fuse.redundant import RedundantRule
from peakc.passes.fuse.rms_norm import RmsNormRule
from peakc.passes.fuse.rotary import RotaryRule
from peakc.passes.fuse.skip_norm import SkipNormRule

# Application order: canonicalize first, norms before skip-norms, GLU before GELU/epilogues,
# horizontal fusion last (it needs the plain linears that remain).
RULES: dict[str, type[FusionRule]] = {
    rule.name: rule
    for rule in (
        RedundantRule,
        AddmmLinearRule,
        RmsNormRule,
        LayerNormRule,
        SkipNormRule,
        RotaryRule,
        AttentionRule,
        GluRule,
        GeluRule,
        LinearActRule,
        HorizontalLinearRule,
    )
}

__all__ = ["RULES", "Fuse", "FusionRule", "Match", "PatternRule", "register_rule"]


def register_rule(rule: type[FusionRule]) -> type[FusionRule]:
    """Class decorator: make a user rule selectable by name (applied after the built-ins)."""
    if not rule.name or rule.name in RULES and RULES[rule.name] is not rule:
        raise PeakcError(f"fusion rule '{rule.name}' has no name or is already registered")
    RULES[rule.name] = rule
    return rule


@dataclass
class FuseOptions:
    rules: str = "all"  # "all" or rule names joined by "+", e.g. "rms_norm+attention"


@register_pass
class Fuse(Pass):
    """Rewrite known ATen patterns into fused peakc ops (outputs unchanged)."""

    name = "fuse"
    Options = FuseOptions
    parity_tol = 1e-5

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
        return [rule for name, rule in RULES.items() if name in names]

    def validate(self) -> None:
        self.selected()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int | str] = {}
        near_misses: list[str] = []
        saving: dict[str, float] = {}  # rule -> predicted microseconds saved per step
        before = _step_seconds(ctx, graph)
        for rule_cls in self.selected():
            report = apply_rule(graph, rule_cls())
            stats[f"fused.{rule_cls.name}"] = report.matched
            near_misses += report.near_misses
            if report.matched and before is not None:
                after = _step_seconds(ctx, graph)
                saving[rule_cls.name] = round((before - after) * 1e6, 3)
                before = after
        matched = sum(v for k, v in stats.items() if k.startswith("fused."))
        # Generation graphs hold the model's own cached attention (no rule made it): counted
        # beside fused.attention, so the report does not read as if attention went unfused.
        cached = sum(peakc_op_name(n.target) == "attention_cache" for n in graph.call_nodes())
        if cached:
            stats["already_fused.attention_cache"] = cached
        report: dict = {"near_misses": near_misses} if near_misses else {}
        if saving:
            report["predicted_saving_us"] = {"target": ctx.target.name, **saving}
        return PassResult(graph, modified=matched > 0, stats=stats, report=report)


def _step_seconds(ctx: PassContext, graph: Graph) -> float | None:
    """The target's predicted step time (CostModel.step_seconds), or None for a graph the cost
    model cannot shape (dynamic dims outside a generation decoder)."""
    if ctx.target is None:
        return None
    try:
        return ctx.cost.step_seconds(graph)
    except PeakcError:
        return None
