"""fuse: rewrite ATen subgraphs into peakc ops with the rule engine."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peakc.errors import PeakcError
from peakc.passes.base import Pass, PassContext, PassResult, register_pass

if TYPE_CHECKING:
    from peakc.ir.graph import Graph
    from peakc.passes.fuse.engine import FusionRule

# Application order: canonicalize first, norms before skip-norms, GLU before GELU/epilogues,
# horizontal fusion last (it needs the plain linears that remain). Each built-in rule is
# named here and imported when a fuse pass runs, so declaring the pass needs no torch.
BUILTIN_RULES = {
    "redundant": "redundant:RedundantRule",
    "addmm_linear": "addmm_linear:AddmmLinearRule",
    "rms_norm": "rms_norm:RmsNormRule",
    "layer_norm": "layer_norm:LayerNormRule",
    "skip_norm": "skip_norm:SkipNormRule",
    "rotary": "rotary:RotaryRule",
    "attention": "attention:AttentionRule",
    "glu": "glu:GluRule",
    "gelu": "gelu:GeluRule",
    "linear_act": "linear_act:LinearActRule",
    "horizontal_linear": "horizontal:HorizontalLinearRule",
}
USER_RULES: dict[str, type[FusionRule]] = {}  # register_rule's, applied after the built-ins

# Names this package re-exports from its heavier modules, imported on first use.
_LAZY = {
    "RULES": None,
    "FusionRule": "engine",
    "Match": "engine",
    "PatternRule": "pattern",
}

__all__ = ["RULES", "Fuse", "FusionRule", "Match", "PatternRule", "register_rule", "rules"]


def rules() -> dict[str, type[FusionRule]]:
    """Every fusion rule by name, in application order (built-ins, then registered ones)."""
    found = {}
    for name, where in BUILTIN_RULES.items():
        module, cls = where.split(":")
        found[name] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    return found | USER_RULES


def rule_names() -> list[str]:
    return [*BUILTIN_RULES, *(n for n in USER_RULES if n not in BUILTIN_RULES)]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _LAZY[name] is None:
        return rules()
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def register_rule(rule: type[FusionRule]) -> type[FusionRule]:
    """Class decorator: make a user rule selectable by name (applied after the built-ins)."""
    taken = rule.name in BUILTIN_RULES or USER_RULES.get(rule.name, rule) is not rule
    if not rule.name or taken:
        raise PeakcError(f"fusion rule '{rule.name}' has no name or is already registered")
    USER_RULES[rule.name] = rule
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

    def selected_names(self) -> list[str]:
        known = rule_names()
        if self.options.rules == "all":
            return known
        names = [r for r in self.options.rules.split("+") if r]
        for r in names:
            if r not in known:
                raise PeakcError(
                    f"pass 'fuse': option 'rules' names unknown rule '{r}' "
                    f"(known: {', '.join(known)})"
                )
        return [name for name in known if name in names]

    def selected(self) -> list[type[FusionRule]]:
        every = rules()
        return [every[name] for name in self.selected_names()]

    def validate(self) -> None:
        self.selected_names()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from peakc.ir.ops import peakc_op_name
        from peakc.passes.fuse.engine import apply_rule

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
