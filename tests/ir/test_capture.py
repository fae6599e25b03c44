import pytest
import torch

from peakc.errors import PeakcError
from peakc.ir import capture

aten = torch.ops.aten


def test_capture_keeps_meaningful_ops_and_module_paths(llama_graph):
    targets = {n.target for n in llama_graph.call_nodes()}
    for op in (
        aten.linear.default,
        aten.embedding.default,
        aten.silu.default,
        aten.scaled_dot_product_attention.default,
    ):
        assert op in targets
    paths = {
        n.meta["peakc_module"] for n in llama_graph.call_nodes() if n.target == aten.linear.default
    }
    assert "model.layers.1.mlp.down_proj" in paths
    assert "lm_head" in paths
    assert "model.layers.0.self_attn.q_proj.weight" in llama_graph.weights()


def test_captured_graph_matches_model(llama, llama_graph):
    model, inputs = llama
    with torch.no_grad():
        expected = model(*inputs)
    (out,) = llama_graph.run()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_blocks_one_per_layer(llama_graph):
    blocks = llama_graph.blocks()
    assert [b.name for b in blocks] == ["prologue", "model.layers.0", "model.layers.1", "epilogue"]
    layer0 = blocks[1]
    assert "model.layers.0.mlp.down_proj.weight" in layer0.weights()
    # The layer's activation input comes from the embedding, its output feeds layer 1.
    assert any(n.target == aten.embedding.default for n in layer0.inputs)
    assert len(layer0.outputs) == 1
    assert layer0.outputs[0] in blocks[2].inputs


def test_verify_names_node_with_wrong_meta(graph):
    node = next(n for n in graph.call_nodes() if n.target == aten.linear.default)
    node.meta["val"] = torch.empty(3, 3, device="meta")
    with pytest.raises(PeakcError, match=f"node '{node.name}'.*recorded f32\\[3,3\\]"):
        graph.verify()


def test_fingerprint_is_structural(graph, llama_graph):
    assert graph.fingerprint() == llama_graph.fingerprint()
    graph.set_weight("lm_head.weight", torch.zeros_like(graph.get_weight("lm_head.weight")))
    assert graph.fingerprint() == llama_graph.fingerprint()  # values do not count
    node = next(n for n in graph.call_nodes() if n.target == aten.silu.default)
    with graph.graph.inserting_after(node):
        extra = graph.graph.call_function(aten.neg.default, (node,))
    node.replace_all_uses_with(extra, delete_user_cb=lambda u: u is not extra)
    graph.propagate_meta()
    assert graph.fingerprint() != llama_graph.fingerprint()


def test_dump_is_readable(llama_graph):
    text = llama_graph.dump()
    assert "input %input_ids : i64[1,16]" in text
    assert "aten.linear(" in text and "# model.layers.0.self_attn.q_proj" in text


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value cannot be exported
            return x + 1
        return x - 1


def test_unexportable_model_names_the_construct():
    with pytest.raises(PeakcError, match=r"cannot export bad: .*test_capture.py:\d+ in forward"):
        capture(DataDependent(), (torch.randn(3),), name="bad")


def test_non_tensor_input_is_rejected(mlp):
    model, _ = mlp
    with pytest.raises(PeakcError, match="example input 0 is a list"):
        capture(model, ([1, 2],), name="m")
