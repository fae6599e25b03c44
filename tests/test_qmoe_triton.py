"""The Triton backend on QMoE's routed experts: a tiny random Mixtral compressed by compress_moe,
compiled with backend "triton" (grouped_mm_compressed rewritten into the grouped sliced-ELL
layout, one kernel launch per layer), saved, loaded and run under TRITON_INTERPRET=1 (a
subprocess: the interpreter is chosen before kernels are decorated) equals its graph; the
rewrite alone equals the op's reference, and refuses a damaged stream naming the layer."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

from peakc.errors import PeakcError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

COMPILE = """
import json, sys, tempfile
from pathlib import Path
import torch
from safetensors.torch import load_file
import peakc
from peakc.ir.capture import capture
from peakc.models.hf import CausalLMLogits
sys.path.insert(0, sys.argv[1])
from test_qmoe_routed import SEQ, routed_model

model = CausalLMLogits(routed_model("mixtral", layers=1))
ids = torch.randint(0, 96, (1, SEQ), generator=torch.Generator().manual_seed(1))
graph = capture(model, (ids,))
compiled = peakc.compile(graph, pipeline="compress_moe{method=rtn,dictionary_size=64,segment=16}",
                         backend="triton", parity=False)
path = compiled.save(Path(tempfile.mkdtemp()) / "art")
stored = load_file(str(path / "weights.safetensors"))
other = torch.randint(0, 96, (1, SEQ), generator=torch.Generator().manual_seed(2))
want, got = compiled(other)[0], peakc.load(path)(other)[0]
print("RESULT " + json.dumps(dict(
    ops=compiled.contents.report["ops"],
    stored=sorted(stored),
    err=float((got - want).norm() / want.norm()),
    dtype=str(got.dtype),
)))
"""


def test_compressed_mixtral_runs_on_the_triton_backend_from_its_artifact(interpreted):
    result = interpreted(COMPILE, ROOT / "tests", timeout=300)
    assert result["ops"]["grouped_mm_compressed"] == "triton/grouped_mm_compressed"
    stored = result["stored"]
    for proj in ("gate_up_proj", "down_proj"):
        prefix = f"model.layers.0.mlp.experts.{proj}_coded"
        assert f"{prefix}.ell_entries" in stored and f"{prefix}.ell_blocks" in stored
        assert f"{prefix}.words" not in stored  # the artifact keeps the transcoded layout only
    assert result["err"] < 1e-5, result


def test_rewrite_equals_the_reference_and_refuses_a_damaged_stream_naming_the_layer():
    import peakc.ir.ops  # noqa: F401  (defines torch.ops.peakc)
    from peakc.backends.triton.lower import apply_rewrites
    from peakc.cost_model.op_costs import CostContext, node_cost
    from peakc.ir.capture import capture
    from peakc.ir.dictionary_code import encode, tunstall

    experts, rows, k = 3, 6, 32  # rows per expert: not whole slices of 8
    gen = torch.Generator().manual_seed(4)
    levels = torch.randint(-1, 2, (experts * rows, k), generator=gen)
    code = encode(levels, tunstall({-1: 1, 0: 2, 1: 1}, size=64), 16)

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("words", "offsets", "table", "checksum"):
                self.register_buffer(name, getattr(code, name).clone())
            self.register_buffer("scales", torch.rand(experts * rows, generator=gen) + 0.1)

        def forward(self, x, group_offsets):
            return torch.ops.peakc.grouped_mm_compressed(
                x, self.words, self.offsets, self.table, self.checksum, self.scales,
                group_offsets, k, 16, code.max_words,
            )  # fmt: skip

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

        def forward(self, x, group_offsets):
            return self.experts(x, group_offsets)

    model = Layer()
    inputs = (torch.randn(5, k, generator=gen), torch.tensor([2, 2, 4], dtype=torch.int32))
    graph = capture(model, inputs)
    rewritten = apply_rewrites(graph)
    targets = [str(n.target) for n in rewritten.call_nodes()]
    assert any("grouped_mm_compressed_ell" in t for t in targets)
    stored = {n.target for n in rewritten.graph.nodes if n.op == "get_attr"}
    assert {"experts.ell_entries", "experts.ell_blocks"} <= stored
    assert "experts.words" not in stored
    torch.testing.assert_close(rewritten.run()[0], graph.run()[0])
    costs = {
        str(n.target): node_cost(n, CostContext())
        for g in (graph, rewritten)
        for n in g.call_nodes()
        if "grouped_mm_compressed" in str(n.target)
    }
    for cost in costs.values():  # 5 token rows: every one of the 3 experts may be read
        assert cost.op_class == "lowbit" and cost.flops == 2 * 5 * rows * k, costs
    rules = sorted(cost.rule for cost in costs.values())
    assert rules == ["peakc.grouped_mm_compressed", "peakc_triton.grouped_mm_compressed_ell"]
    graph.get_weight("experts.words")[0] ^= 1
    with pytest.raises(PeakcError, match=r"^experts: compressed weight: checksum mismatch"):
        apply_rewrites(graph)
