"""Fusion on small hand-written modules: GELU formulas and bias-GELU, redundant pairs."""

from __future__ import annotations

import math

import pytest
import torch

from peakc.ir import capture
from peakc.passes.base import PassContext
from peakc.passes.fuse import Fuse, FuseOptions

aten = torch.ops.aten
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
ACTIVATIONS = {
    "erf formula": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "erf formula, x * 1/sqrt(2)": lambda h: h * 0.5 * (1.0 + torch.erf(h * (1 / math.sqrt(2)))),
    "tanh formula": lambda h: (
        0.5 * h * (1 + torch.tanh(SQRT_2_OVER_PI * (h + 0.044715 * torch.pow(h, 3))))
    ),
    "aten gelu": torch.nn.functional.gelu,
}
APPROXIMATE = {
    "erf formula": "none",
    "erf formula, x * 1/sqrt(2)": "none",
    "tanh formula": "tanh",
    "aten gelu": "none",
}


class MatmulAct(torch.nn.Module):
    """act(x @ w [+ bias]): a matmul, not a linear, so the bias add stays a separate add."""

    def __init__(self, act, bias: bool) -> None:
        super().__init__()
        self.act = act
        self.w = torch.nn.Parameter(torch.randn(16, 32))
        self.bias = torch.nn.Parameter(torch.randn(32)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w
        return self.act(h + self.bias if self.bias is not None else h)


def fuse_rules(graph, rules: str):
    """Run fuse{rules=...} on a copy; returns (fused graph, stats, near misses)."""
    fused = graph.copy()
    ctx = PassContext()
    result = Fuse(FuseOptions(rules=rules)).run(fused, ctx)
    fused.recompile()
    fused.verify()
    return fused, result.stats, result.report.get("near_misses", [])


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bias", [False, True], ids=["gelu", "bias-gelu"])
@pytest.mark.parametrize("form", sorted(ACTIVATIONS))
def test_gelu_forms_fuse_with_parity(form, bias):
    torch.manual_seed(0)
    graph = capture(MatmulAct(ACTIVATIONS[form], bias), (torch.randn(2, 4, 16),), name=form)
    fused, stats, _ = fuse_rules(graph, "gelu")
    assert stats["fused.gelu"] == 1
    (gelu,) = [n for n in fused.call_nodes() if n.target is torch.ops.peakc.gelu.default]
    x, b, approximate = gelu.args
    assert approximate == APPROXIMATE[form]
    assert (b is not None) is bias and (b is None or b.op == "get_attr")
    left = {n.target for n in fused.call_nodes()}
    assert not left & {aten.erf.default, aten.tanh.default, aten.gelu.default, aten.add.Tensor}
    ref, out = graph.run(*graph.example_inputs)[0], fused.run(*graph.example_inputs)[0]
    assert rel_error(out, ref) <= 1e-5


def test_gelu_near_miss_names_the_wrong_constant():
    graph = capture(
        MatmulAct(lambda h: 0.5 * h * (1 + torch.erf(h / 2.0)), False),
        (torch.randn(2, 4, 16),),
        name="not-gelu",
    )
    _, stats, misses = fuse_rules(graph, "gelu")
    assert stats["fused.gelu"] == 0
    assert any(
        m.startswith("gelu: node 'erf'") and "erf input is not x / sqrt(2)" in m for m in misses
    )


class Roundabout(torch.nn.Module):
    """Pairs that undo each other around a tanh, and a lossy cast pair that must stay."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, d = x.shape
        y = x.float().to(x.dtype)  # bf16 → fp32 → bf16: exact, removable
        y = y.transpose(1, 2).transpose(1, 2)  # permute pair
        y = y.view(b, s, 4, d // 4).view(b, s, d)  # view pair
        lossy = torch.tanh(x).float().to(torch.float16).float()  # fp32 → fp16 → fp32: lossy
        return torch.tanh(y), lossy


def test_redundant_removes_undone_pairs_and_keeps_lossy_casts():
    x = torch.randn(2, 8, 16).to(torch.bfloat16)
    graph = capture(Roundabout(), (x,), name="roundabout")
    before = [n.target for n in graph.call_nodes()]
    assert before.count(aten.permute.default) == 2 and before.count(aten.view.default) == 2
    fused, stats, _ = fuse_rules(graph, "redundant")
    after = [n.target for n in fused.call_nodes()]
    assert aten.permute.default not in after and aten.view.default not in after
    tanhs = [n for n in fused.call_nodes() if n.target is aten.tanh.default]
    assert len(tanhs) == 2 and all(n.args[0].op == "placeholder" for n in tanhs)  # y is x
    casts = [n for n in fused.call_nodes() if n.target is aten._to_copy.default]
    assert [n.kwargs["dtype"] for n in casts] == [torch.float32, torch.float16, torch.float32]
    assert stats["fused.redundant"] == 3
    ref, out = graph.run(x), fused.run(x)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
