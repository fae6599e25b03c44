"""The fusion engine: rule selection, the default pipeline on demo:llama, user rules gone bad."""

from __future__ import annotations

import pytest
import torch

import peakc
from peakc.errors import PeakcError
from peakc.ir import capture
from peakc.ir.ops import OPS
from peakc.models.demo import demo_llama
from peakc.passes.base import PassContext
from peakc.passes.fuse import RULES, Fuse, FuseOptions, PatternRule
from peakc.passes.fuse.engine import FusionRule, Match, apply_rule

aten = torch.ops.aten


@pytest.fixture(scope="module")
def llama_graph():
    model, inputs = demo_llama()
    return capture(model, inputs, name="demo:llama")


def test_default_pipeline_on_demo_llama(llama_graph):
    model, inputs = demo_llama()
    compiled = peakc.compile(model, inputs, pipeline="default")
    fuse = compiled.records[-1]
    assert fuse["name"] == "fuse" and fuse["parity_rel_error"] <= 1e-5
    assert fuse["stats"]["fused.attention"] == 2
    assert fuse["stats"]["fused.rotary"] == 4
    ref = llama_graph.run(*inputs)[0]
    assert torch.allclose(compiled(*inputs)[0], ref, rtol=1e-5, atol=1e-6)


def test_rules_option_selects_and_rejects(llama_graph):
    graph = llama_graph.copy()
    result = Fuse(FuseOptions(rules="rms_norm+attention")).run(graph, PassContext())
    assert set(result.stats) == {"fused.rms_norm", "fused.attention"}
    assert result.stats["fused.attention"] == 2
    with pytest.raises(PeakcError, match="unknown rule 'nope'"):
        Fuse(FuseOptions(rules="rms_norm+nope"))


def test_every_rule_and_op_is_documented():
    assert list(RULES)[0] == "redundant" and list(RULES)[-1] == "horizontal_linear"
    for name in (
        "rms_norm",
        "layer_norm",
        "skip_rms_norm",
        "skip_layer_norm",
        "rotary_embedding",
        "attention",
        "gelu",
        "glu",
        "linear_act",
    ):
        assert OPS[name].doc


class ShrinkingRule(FusionRule):
    """A broken user rule: its rewrite drops the last column."""

    name = "shrinking"

    def is_anchor(self, node):
        return node.target is aten.silu.default

    def match(self, node):
        return Match(outputs=[node], nodes=[node], values={"x": node.args[0]})

    def rewrite(self, graph, match):
        return graph.graph.call_function(aten.slice.Tensor, (match.values["x"], -1, 0, 1))


class DtypeRule(ShrinkingRule):
    name = "dtype_changing"

    def rewrite(self, graph, match):
        return graph.graph.call_function(
            aten._to_copy.default, (match.values["x"],), {"dtype": torch.float16}
        )


@pytest.mark.parametrize(
    "rule, expected", [(ShrinkingRule, "f32[1,16,128]"), (DtypeRule, "f16[1,16,128]")]
)
def test_bad_rewrite_is_refused_and_rolled_back(llama_graph, rule, expected):
    graph = llama_graph.copy()
    before = graph.dump()
    with pytest.raises(PeakcError, match=rf"fusion rule '{rule.name}': rewrite of 'silu' produces"):
        apply_rule(graph, rule())
    assert graph.dump() == before
    graph.verify()


class UntraceableRule(PatternRule):
    name = "untraceable"

    def pattern(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return aten.relu.default(x)
        return x


def test_untraceable_pattern_names_the_rule(llama_graph):
    graph = llama_graph.copy()
    before = graph.dump()
    with pytest.raises(PeakcError, match="fusion rule 'untraceable': pattern does not trace"):
        apply_rule(graph, UntraceableRule())
    assert graph.dump() == before


class SiluMulRule(PatternRule):
    """A user pattern rule: silu(a) * b → peakc::glu(a, b, 'silu'), refused for tiny widths."""

    name = "silu_mul"

    def __init__(self, min_width: int = 0) -> None:
        self.min_width = min_width

    def pattern(self, gate, up):
        return aten.mul.Tensor(aten.silu.default(gate), up)

    def check(self, values):
        width = values["gate"].meta["val"].shape[-1]
        return f"width {width} < {self.min_width}" if width < self.min_width else None

    def rewrite(self, graph, match):
        v = match.values
        return graph.graph.call_function(torch.ops.peakc.glu.default, (v["gate"], v["up"], "silu"))


def test_pattern_rule_matches_checks_and_preserves_outputs(llama_graph):
    graph = llama_graph.copy()
    report = apply_rule(graph, SiluMulRule())
    assert report.matched == 2
    graph.recompile()
    graph.verify()
    ref = llama_graph.run()[0]
    assert torch.allclose(graph.run()[0], ref, rtol=1e-6, atol=1e-6)
    refused = apply_rule(llama_graph.copy(), SiluMulRule(min_width=1000))
    assert refused.matched == 0
    assert refused.near_misses[0].endswith("width 128 < 1000")


class EscapingRule(ShrinkingRule):
    """Claims the linear feeding silu as inner although other nodes read it."""

    name = "escaping"

    def match(self, node):
        return Match(outputs=[node], nodes=[node.args[0].args[0], node.args[0], node])


def test_inner_value_used_outside_is_a_near_miss(llama_graph):
    graph = llama_graph.copy()
    report = apply_rule(graph, EscapingRule())
    assert report.matched == 0
    assert "is used outside" in report.near_misses[0]


def test_fuse_records_the_predicted_saving_per_rule():
    """The cost model on the target prices each rule that fired (microseconds per step)."""
    import peakc
    from peakc.models.demo import demo_llama

    model, inputs = demo_llama()
    compiled = peakc.compile(model, inputs, pipeline="cleanup,fuse", target="h200")
    fuse = compiled.contents.report["passes"][-1]
    saving = fuse["report"]["predicted_saving_us"]
    assert saving.pop("target") == "h200"
    fired = {k.removeprefix("fused."): v for k, v in fuse["stats"].items() if v}
    assert set(saving) == set(fired)  # one entry per rule that matched
    assert saving["rms_norm"] > 0  # fewer kernels: fewer launches on the eager runtime
