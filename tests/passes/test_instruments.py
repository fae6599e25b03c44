import pytest
import torch

import peakc
from peakc.errors import PeakcError
from peakc.passes.base import PassContext
from peakc.passes.instruments import DumpIR, Parity, Reproducer, Timing
from peakc.passes.pipeline import Pipeline

aten = torch.ops.aten


@peakc.register_pass
class ScaleLogits(peakc.Pass):
    """Multiplies the first output by 1.01: a numerics change the parity check must catch."""

    name = "scale_logits"

    def run(self, graph, ctx):
        out = graph.output_nodes()[0]
        with graph.graph.inserting_after(out):
            scaled = graph.graph.call_function(aten.mul.Tensor, (out, 1.01))
        out.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
        graph.propagate_meta()
        return peakc.PassResult(graph, modified=True)


@peakc.register_pass
class BreakShapes(peakc.Pass):
    """Records a wrong shape on a node: verification must name the pass and node."""

    name = "break_shapes"

    def run(self, graph, ctx):
        node = next(graph.call_nodes())
        node.meta["val"] = torch.empty(7, device="meta")
        return peakc.PassResult(graph, modified=True)


@peakc.register_pass
class Explode(peakc.Pass):
    """Raises."""

    name = "explode"

    def run(self, graph, ctx):
        raise RuntimeError("kaboom")


def _ctx(*instruments):
    return PassContext(instruments=[Timing(), *instruments])


def test_timing_and_dump_ir(graph, tmp_path):
    _, records = Pipeline.parse("cleanup,fuse").run(graph, _ctx(DumpIR(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_captured.txt",
        "001_cleanup.txt",
        "002_fuse.txt",
    ]
    assert "peakc.rms_norm" in (tmp_path / "002_fuse.txt").read_text()
    assert "peakc.rms_norm" not in (tmp_path / "000_captured.txt").read_text()
    assert all(r["seconds"] >= 0 for r in records)


def test_parity_catches_numeric_change(graph):
    with pytest.raises(
        PeakcError,
        match=r"pass 'scale_logits' \(#2\) failed after \[cleanup\]: "
        r"outputs moved by relative error 0.01",
    ):
        Pipeline.parse("cleanup,scale_logits").run(graph, _ctx(Parity()))


def test_parity_records_error_of_exact_passes(graph):
    _, records = Pipeline.parse("cleanup,fuse").run(graph, _ctx(Parity()))
    assert [r["parity_rel_error"] for r in records] == [0.0, 0.0]


def test_verify_names_pass_and_node(graph):
    with pytest.raises(PeakcError, match="pass 'break_shapes' .*graph invalid after pass: node '"):
        Pipeline.parse("break_shapes").run(graph, _ctx())


def test_failure_writes_reproducer(graph, tmp_path):
    repro = Reproducer(tmp_path / "repro")
    with pytest.raises(
        PeakcError, match="pass 'explode' \\(#2\\) failed after \\[cleanup\\]: kaboom"
    ):
        Pipeline.parse("cleanup,explode,fuse").run(graph, _ctx(repro))
    assert (tmp_path / "repro" / "pipeline.txt").read_text().strip() == "explode,fuse"
    assert "aten.linear" in (tmp_path / "repro" / "before.txt").read_text()
    # The saved program is an artifact that compiles again with the remaining spec.
    reloaded = peakc.load(tmp_path / "repro" / "program").to_graph()
    assert (
        reloaded.fingerprint()
        == Pipeline.parse("cleanup").run(graph.copy(), _ctx())[0].fingerprint()
    )


def test_cleanup_merges_and_removes(graph):
    x = graph.input_nodes()[0]
    first = next(graph.call_nodes())
    with graph.graph.inserting_before(first):
        a = graph.graph.call_function(aten.add.Tensor, (x, 1))
        b = graph.graph.call_function(aten.add.Tensor, (x, 1))
        graph.graph.call_function(aten.mul.Tensor, (a, b))  # dead
    graph.propagate_meta()
    result, records = Pipeline.parse("cleanup").run(graph, _ctx())
    assert records[0]["stats"] == {"cse": 1, "removed": 3}
    assert records[0]["modified"] is True
    again, records = Pipeline.parse("cleanup").run(result, _ctx())
    assert records[0]["modified"] is False


def test_fuse_rms_norm(graph):
    result, records = Pipeline.parse("fuse").run(graph, _ctx(Parity()))
    assert records[0]["stats"]["fused.rms_norm"] == 5
    fused = [n for n in result.call_nodes() if n.target == torch.ops.peakc.rms_norm.default]
    assert fused[0].meta["peakc_module"] == "model.layers.0.input_layernorm"
    assert not any(n.target == aten.rsqrt.default for n in result.call_nodes())


def test_fuse_rejects_unknown_rule():
    with pytest.raises(PeakcError, match="option 'rules' names unknown rule 'nope'"):
        Pipeline.parse("fuse{rules=nope}")
