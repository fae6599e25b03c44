"""GroupQueryAttention in the shared-buffer form (CPU provider): the exported node against the
contrib op spec, the fixed decode binding, generation equal to eager across batch sizes."""

import onnx
import pytest
import torch

import peakc
from peakc.backends.ort.shared_cache import METADATA_KEY, read_layout
from peakc.errors import PeakcError
from peakc.models import load_source_for_task
from peakc.models.demo import demo_mlp
from peakc.runtime.generate import Generator, SamplingConfig

MAX_LEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 16  # demo:llama: hidden 64, GQA 4/2


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    source = load_source_for_task("demo:llama", "generate", MAX_LEN, 3)
    folder = tmp_path_factory.mktemp("shared")
    out = {}
    for backend in ("eager", "ort"):
        compiled = peakc.compile(
            source,
            backend=backend,
        )
        out[backend] = (compiled, peakc.load(compiled.save(folder / backend)))
    return out


def test_gqa_node_follows_the_spec(artifacts):
    compiled, artifact = artifacts["ort"]
    model = onnx.load(str(artifact.directory / "decoder.onnx"))
    graph = model.graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    assert "k_cache" not in inputs and "v_cache" not in inputs  # only layers were read
    total = inputs["total_sequence_length"].type.tensor_type
    assert total.elem_type == onnx.TensorProto.INT32 and len(total.shape.dim) == 0
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == 2 and all(n.domain == "com.microsoft" for n in nodes)
    producers = {o: n for n in graph.node for o in n.output}
    for layer, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == HEADS and attrs["kv_num_heads"] == KV_HEADS
        assert attrs["scale"] == pytest.approx(HEAD_DIM**-0.5)
        assert attrs.get("local_window_size", -1) == -1
        # gqa_fold: the rotary and the packed QKV of the fused linear moved into the node
        assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
        query, key, value, past_k, past_v, seqlens, total_len, cos, sin = node.input[:9]
        assert producers[query].op_type == "MatMul" and key == "" and value == ""
        tables = {t.name: t for t in graph.initializer}
        for table in (cos, sin):
            assert list(tables[table].dims) == [MAX_LEN, HEAD_DIM // 2]
        # past BNSH at the cache's max length, present the same graph value shape (one buffer)
        assert (past_k, past_v) == (f"past_key.{layer}", f"past_value.{layer}")
        assert node.output[1:3] == [f"present_key.{layer}", f"present_value.{layer}"]
        for past, present in ((past_k, node.output[1]), (past_v, node.output[2])):
            dims = inputs[past].type.tensor_type.shape.dim
            assert [d.dim_value for d in dims[1:]] == [KV_HEADS, MAX_LEN, HEAD_DIM]
            assert dims[0].dim_param  # batch stays dynamic
            assert outputs[present].type == inputs[past].type
        assert total_len == "total_sequence_length"
        # seqlens_k: total length - 1 per sequence, int32 = Cast(ReduceMax(positions, axis 1))
        cast = producers[seqlens]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.INT32
        assert producers[cast.input[0]].op_type == "ReduceMax"
    layout = read_layout({p.key: p.value for p in model.metadata_props})
    assert {p.key for p in model.metadata_props} >= {METADATA_KEY}
    assert [(b.source, b.index) for b in layout.buffers] == [
        ("k_cache", 0),
        ("v_cache", 0),
        ("k_cache", 1),
        ("v_cache", 1),
    ]
    assert compiled.contents.report["ort"]["shared_kv_buffers"] == 4


def test_called_like_the_graph_with_the_original_inputs(artifacts):
    """The program keeps the original call (cache in, new k/v out) on the CPU provider."""
    _, eager = artifacts["eager"]
    _, ort = artifacts["ort"]
    torch.manual_seed(0)
    k = torch.randn(2, 2, KV_HEADS, MAX_LEN, HEAD_DIM)
    v = torch.randn(2, 2, KV_HEADS, MAX_LEN, HEAD_DIM)
    ids = torch.tensor([[7], [100]])
    positions = torch.tensor([[9], [9]])  # a decode step after 9 cached tokens
    want = eager.program("decoder")(*eager.weight_list("decoder"), ids, positions, k, v)
    got = ort.program("decoder")(ids, positions, k, v)
    for w, g in zip(want, got):
        assert float((w - g).abs().max() / w.abs().max()) < 1e-4


def test_decode_binding_is_reused_and_generation_equals_eager(artifacts):
    prompts = {3: [[5, 17, 99, 3, 250, 7], [42], [1, 2, 3, 4, 5, 6, 7, 8]], 1: [[9, 8, 7]]}
    generators = {b: Generator.from_artifact(artifacts[b][1], "cpu") for b in ("eager", "ort")}
    step = generators["ort"].step
    assert type(step).__name__ == "SharedCacheStep"
    config = SamplingConfig(max_new_tokens=6)
    for batch in (3, 1, 1):  # a new batch size rebinds; the same one reuses its binding
        tokens = {b: g.generate(prompts[batch], config).tokens for b, g in generators.items()}
        assert tokens["ort"] == tokens["eager"]
    assert list(step.decode) == [1] and step.decode[1].runs == 2 * 5
    key = step.cache.buffers[0].past
    assert step.buffers[key].shape == (1, KV_HEADS, MAX_LEN, HEAD_DIM)
    assert step.buffers[key].abs().sum() > 0  # the op wrote the cache in place


def test_cuda_graph_option_needs_cuda():
    with pytest.raises(PeakcError, match="cuda_graph=true needs device=cuda"):
        peakc.compile(*demo_mlp(), backend="ort{device=cpu,cuda_graph=true}")
