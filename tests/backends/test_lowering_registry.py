"""The lowering registry is the one mechanism: a toy backend registers a lowering for a toy op,
and both its program and its report come from the registry (used, declined per node, absent)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import pytest
import torch

import peakc
from peakc.backends.base import (
    BACKENDS,
    Backend,
    get_backend,
    lowering_report,
    register_backend,
)
from peakc.errors import PeakcError
from peakc.ir.ops import OPS, define_op, lowering_for, peakc_op_name, register_lowering
from peakc.passes.base import PassContext
from peakc.runtime.artifact import ArtifactContents


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x * factor (a toy op for the registry tests)."""
    return x * factor


TOY_SCALE = define_op("test_toy_scale", _scaled, lambda x, factor: torch.empty_like(x))
CALLS: list[float] = []


@register_lowering(
    "test_toy_scale",
    "toy",
    label="toy kernel",
    why_not=lambda node, graph, context: "factor 0 has no kernel" if node.args[1] == 0 else None,
)
def toy_scale_kernel(x: torch.Tensor, factor: float) -> torch.Tensor:
    CALLS.append(factor)
    return x * factor


@dataclasses.dataclass
class ToyOptions:
    mode: Literal["fast", "safe"] = "fast"
    batches: list[int] = dataclasses.field(default_factory=lambda: [1])


@register_backend
class ToyBackend(Backend):
    """Runs the graph in Python, calling each node's registered toy lowering."""

    name: ClassVar[str] = "toy"
    Options: ClassVar[type] = ToyOptions

    def lower(self, graph, ctx: PassContext, pipeline: str) -> ArtifactContents:
        lowered = graph.copy()
        for node in lowered.call_nodes():
            name = peakc_op_name(node.target)
            lowering = lowering_for(name, self.name) if name else None
            if lowering and not (lowering.why_not and lowering.why_not(node, lowered, None)):
                node.target = lowering.fn
        lowered.recompile()
        self.program = lowered
        return ArtifactContents(
            backend=self.name,
            pipeline=pipeline,
            source="toy",
            weights={},
            example_inputs=graph.example_inputs,
            programs={},
            report={"ops": lowering_report(graph, self.name)},
        )


class Scales(torch.nn.Module):
    def forward(self, x):
        return torch.ops.peakc.test_toy_scale(x, 2.0) + torch.ops.peakc.test_toy_scale(x, 0.0)


def test_toy_lowering_is_used_and_reported():
    backend = get_backend("toy{mode=safe,batches=[1,4]}")
    assert backend.options == ToyOptions(mode="safe", batches=[1, 4])
    assert str(backend) == "toy{mode=safe,batches=[1,4]}"
    x = torch.randn(3, 5)
    compiled = peakc.compile(Scales(), (x,), pipeline="none", backend=backend)
    report = compiled.contents.report["ops"]
    assert report == {"test_toy_scale": "toy kernel; 1 reference (factor 0 has no kernel)"}
    CALLS.clear()
    (out,) = backend.program.run(x)
    assert CALLS == [2.0]  # the lowered node ran the registered kernel; the declined one did not
    torch.testing.assert_close(out, x * 2.0)
    # the eager backend registered nothing for the op: its report says reference
    assert peakc.compile(Scales(), (x,), pipeline="none").contents.report["ops"] == {
        "test_toy_scale": "reference"
    }


def test_backend_option_errors_name_backend_option_and_column():
    with pytest.raises(PeakcError, match=r"backend 'toy' has no option 'speed' .*\(column 15\)"):
        get_backend("toy{mode=fast,speed=2}")
    with pytest.raises(PeakcError, match=r"option 'mode' expects one of fast\|safe, got 'x'"):
        get_backend("toy{mode=x}")
    with pytest.raises(PeakcError, match=r"option 'batches' expects a list like \[1, 8\]"):
        get_backend("toy{batches=4}")
    with pytest.raises(PeakcError, match=r"unknown backend 'nosuch' \(known: .*eager.*\)"):
        get_backend("nosuch")


def test_ort_options_parse_and_round_trip():
    pytest.importorskip("onnxruntime")
    spec = "ort{cuda_graph=true,decode_batches=[1,8]}"
    backend = get_backend(spec)
    assert str(backend) == spec and get_backend(str(backend)) == backend
    assert backend.options.decode_batches == [1, 8] and backend.options.cuda_graph is True
    with pytest.raises(
        PeakcError, match=r"backend 'ort': option 'cuda_graph' expects true or false, got '2'"
    ):
        get_backend("ort{cuda_graph=2}")


def test_every_ort_translation_is_in_the_registry():
    pytest.importorskip("onnxruntime")
    from peakc.backends.ort import contrib
    from peakc.backends.ort.export import translation_table

    table = translation_table()
    for name in ("rms_norm", "attention_cache", "linear_act", "glu"):
        assert table[OPS[name].overload] is lowering_for(name, "ort").fn
    # linear_wq is lowered by a rewrite into the backend's own op, which is not in the op set
    assert lowering_for("linear_wq", "ort").stage == "rewrite"
    assert lowering_for("matmul_nbits", "ort").fn is contrib.matmul_nbits
    assert "matmul_nbits" not in OPS


def test_registered_backends_listed():
    assert {"eager", "toy"} <= set(BACKENDS)
