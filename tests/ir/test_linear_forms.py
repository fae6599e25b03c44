"""Linears a module computes by hand (`x @ W.T + b`) are captured as aten.linear, so the
calibrating passes (prune, quantize) find and change them."""

import pytest
import torch
from torch import nn

from peakc.ir import capture
from peakc.passes.base import PassContext
from peakc.passes.prune import PruneOptions, PrunePass
from peakc.passes.quantize import QuantizeOptions, QuantizePass

LINEAR = torch.ops.aten.linear.default
WQ = torch.ops.peakc.linear_wq.default
SEQ = 8


class MatmulLinear(nn.Linear):
    """Some transformers architectures subclass nn.Linear with their own forward like this."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class TorchMatmulLinear(nn.Linear):
    def forward(self, x):
        out = torch.matmul(x, self.weight.t())
        return out if self.bias is None else self.bias + out


class Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = MatmulLinear(width, 2 * width)
        self.gate = TorchMatmulLinear(width, 2 * width, bias=False)
        self.down = TorchMatmulLinear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)) * self.gate(x))


class HandWrittenLinears(nn.Module):
    def __init__(self, vocab: int = 256, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Layer(width) for _ in range(layers))
        self.head = MatmulLinear(width, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.fixture(scope="module")
def model_and_graph():
    torch.manual_seed(0)
    model = HandWrittenLinears().eval()
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return model, capture(model, (ids,), name="hand-written linears")


def test_hand_written_linears_are_captured_as_linear(model_and_graph):
    model, graph = model_and_graph
    graph.verify()
    linears = [n for n in graph.call_nodes() if n.target is LINEAR]
    assert [n.meta["peakc_module"] for n in linears] == [
        "layers.0.up", "layers.0.gate", "layers.0.down",
        "layers.1.up", "layers.1.gate", "layers.1.down", "head",
    ]  # fmt: skip
    assert [len(n.args) for n in linears] == [3, 2, 3, 3, 2, 3, 3]  # gate has no bias
    assert all(n.args[1].op == "get_attr" for n in linears)
    ops = {n.target for n in graph.call_nodes()}
    assert not ops & {torch.ops.aten.mm.default, torch.ops.aten.permute.default}
    with torch.no_grad():
        expected = model(*graph.example_inputs)
    torch.testing.assert_close(graph.run()[0], expected, rtol=1e-6, atol=1e-6)


def test_dynamic_sequence_hand_written_linears(model_and_graph):
    model, _ = model_and_graph
    ids = torch.randint(0, 256, (2, SEQ))
    dynamic = {"dims": {"seq": [1, 32]}, "inputs": [{"1": "seq"}]}
    graph = capture(model, (ids,), dynamic=dynamic)
    graph.verify()
    assert sum(n.target is LINEAR for n in graph.call_nodes()) == 7
    # The views' size arithmetic went with them.
    assert all(n.target is not torch.ops.aten.sym_size.int for n in graph.call_nodes())
    longer = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(graph.run(longer)[0], model(longer), rtol=1e-6, atol=1e-6)


def test_a_matmul_with_an_activation_is_not_a_linear():
    class Bilinear(nn.Module):
        def forward(self, x, y):
            return x @ y.T

    x, y = torch.randn(4, 8), torch.randn(6, 8)
    graph = capture(Bilinear(), (x, y))
    assert not any(n.target is LINEAR for n in graph.call_nodes())


def _ctx():
    windows = torch.randint(0, 256, (4, SEQ), generator=torch.Generator().manual_seed(1))
    return PassContext(calibration_data=windows)


def test_prune_changes_hand_written_linears(model_and_graph):
    _, graph = model_and_graph
    result = PrunePass(PruneOptions(sparsity=0.5, nsamples=4)).run(graph.copy(), _ctx())
    assert result.modified
    for layer in range(2):
        for proj in ("up", "gate", "down"):
            name = f"layers.{layer}.{proj}.weight"
            pruned = result.graph.get_weight(name)
            assert float((pruned == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
            assert not torch.equal(pruned, graph.get_weight(name))
    assert torch.equal(result.graph.get_weight("head.weight"), graph.get_weight("head.weight"))


def test_quantize_changes_hand_written_linears(model_and_graph):
    _, graph = model_and_graph
    options = QuantizeOptions(method="rtn", bits=8, group_size=32, nsamples=4)
    result = QuantizePass(options).run(graph.copy(), _ctx())
    result.graph.verify()
    wq = [n for n in result.graph.call_nodes() if n.target is WQ]
    assert len(wq) == 6 and result.stats["layers"] == 6
    assert "layers.0.up.weight" not in result.graph.weights()
    dense, quantized = graph.run()[0], result.graph.run()[0]
    assert float((quantized - dense).norm() / dense.norm()) < 0.02
