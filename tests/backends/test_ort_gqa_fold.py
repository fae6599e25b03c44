"""gqa_fold (CPU provider): GroupQueryAttention takes the rotary and the packed QKV itself; the
decode program loses the Split/Transpose/RotaryEmbedding chain; results stay those of the
module, for rotate-half and interleaved rotary, fused and separate q/k/v, GQA and MHA; a
partial rotary is left apart."""

from collections import Counter

import onnx_ir as ir
import pytest
import torch

import peakc
from peakc.backends.ort.gqa_fold import cancel_transpose_pairs
from peakc.errors import PeakcError
from peakc.models import kv_cache
from peakc.models.demo import demo_llama
from peakc.runtime.generate import Generator, SamplingConfig, write_cache

MAX_LEN, MAX_BATCH = 32, 3
UNFUSED_QKV = "cleanup,fuse{rules=redundant+addmm_linear+rms_norm+skip_norm+rotary+glu}"


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


class VariantRotaryDecoder(kv_cache.DecoderWithCache):
    """demo:llama's decoder with rotary over the first `rotary_dim` channels, rotate-half on
    [B, H, S, D] or interleaved (GPT-J) on [B, S, H, D]."""

    def __init__(self, causal_lm, scale: float, rotary_dim: int, interleaved: bool) -> None:
        super().__init__(causal_lm, None, scale)
        self.rotary_dim, self.interleaved = rotary_dim, interleaved
        inv = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
        freqs = torch.outer(torch.arange(causal_lm.config.max_positions).float(), inv)
        self.register_buffer("cos_half", freqs.cos(), persistent=False)
        self.register_buffer("sin_half", freqs.sin(), persistent=False)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        rot, rest = x[..., :r], x[..., r:]
        if self.interleaved:  # x [B, S, H, D], tables [B, S, 1, R]
            rot = rot * cos + rotate_every_two(rot) * sin
        else:  # x [B, H, S, D], tables [B, 1, S, R]
            rot = rot * cos + kv_cache._rotate_half(rot) * sin
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot

    def forward(self, input_ids, positions, k_cache, v_cache):
        batch, seq = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.cos_half[positions], self.sin_half[positions]  # [B, S, R/2]
        if self.interleaved:
            cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
            sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
        else:
            cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
        new_k, new_v = [], []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, seq, self.num_heads, self.head_dim)
            k = attn.k_proj(h).view(batch, seq, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(h).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if self.interleaved:
                q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if not self.interleaved:
                q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            out = torch.ops.peakc.attention_cache(
                q, k, v, k_cache[i], v_cache[i], positions, self.scale
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_k.append(k)
            new_v.append(v)
        return self.lm_head(self.model.norm(x)), torch.stack(new_k), torch.stack(new_v)


def decoder(rotary_dim: int | None = None, interleaved: bool = False, **cfg):
    """(module, example inputs, dynamic, generation) for a demo:llama generation decoder."""
    causal_lm, _ = demo_llama(**cfg)
    module, layout = kv_cache.wrap_for_generation(causal_lm, MAX_LEN, MAX_BATCH, "demo:llama")
    if rotary_dim is not None:
        module = VariantRotaryDecoder(causal_lm, module.scale, rotary_dim, interleaved).eval()
    inputs = kv_cache.example_inputs(layout)
    return module, inputs, kv_cache.dynamic_shapes(layout), layout.to_dict()


def compile_ort(model, backend: str, folder, pipeline: str = "default"):
    module, inputs, dynamic, generation = model
    compiled = peakc.compile(
        module, inputs, pipeline=pipeline, backend=backend, dynamic=dynamic, generation=generation
    )
    return compiled, peakc.load(compiled.save(folder))


def gqa_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "GroupQueryAttention"]


def assert_prefill_and_decode_match(module, program, tol: float = 1e-4) -> None:
    """Prompts of different lengths (right-padded), then a decode step at unequal positions:
    logits and new k/v equal the module's (the ORT program is called like the graph)."""
    layers = len(module.model.layers)
    shape = (layers, 2, module.num_kv_heads, MAX_LEN, module.head_dim)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    steps = [(ids, torch.arange(7).expand(2, 7).contiguous())]
    steps.append((torch.tensor([[11], [200]]), torch.tensor([[7], [4]])))  # lengths 7 and 4
    steps.append((torch.tensor([[3], [9]]), torch.tensor([[8], [5]])))
    with torch.no_grad():
        for ids, positions in steps:
            want = module(ids, positions, k_cache, v_cache)
            got = program(ids, positions, k_cache, v_cache)
            for w, g in zip(want, got):
                assert float((w - g).abs().max() / w.abs().max()) < tol
            write_cache(k_cache, v_cache, *want[1:], positions)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """demo:llama (GQA 4/2, fused QKV): eager, ort folded (static decode 1+2), ort unfolded."""
    folder = tmp_path_factory.mktemp("gqa_fold")
    model = decoder()
    return {
        "model": model,
        "eager": compile_ort(model, "eager", folder / "eager"),
        "ort": compile_ort(model, "ort{device=cpu,decode_batches=[1,2]}", folder / "ort"),
        "off": compile_ort(
            model, "ort{device=cpu,decode_batches=[1],fold_rotary=false}", folder / "off"
        ),
    }


def test_decode_program_has_no_chain_between_qkv_matmul_and_gqa(llama):
    compiled, artifact = llama["ort"]
    report = compiled.contents.report["ort"]["gqa_fold"]
    assert report["enabled"] and report["rotary_folded"] == 2 and report["packed_qkv"] == 2
    assert report["not_folded"] == {}
    assert llama["off"][0].contents.report["ort"]["gqa_fold"] == {"enabled": False}
    folded = ir.load(artifact.directory / "decoder.decode_b1.onnx")
    unfolded = ir.load(llama["off"][1].directory / "decoder.decode_b1.onnx")
    ops, before = (
        Counter(n.op_type for n in folded.graph),
        Counter(n.op_type for n in unfolded.graph),
    )
    # per layer: MatMul(qkv) -> GroupQueryAttention -> Reshape -> MatMul(o_proj)
    assert ops["RotaryEmbedding"] == ops["Transpose"] == 0
    assert ops["Split"] == 2  # the MLP's gate|up split only
    assert before["RotaryEmbedding"] == 4 and before["Transpose"] == 8 and before["Split"] == 4
    assert len(list(folded.graph)) == 29 and len(list(unfolded.graph)) == 62
    for node in gqa_nodes(folded):
        query = node.inputs[0].producer()
        assert query.op_type == "MatMul" and node.inputs[1] is None and node.inputs[2] is None
        assert node.attributes.get_int("do_rotary") == 1
        assert node.attributes.get_int("rotary_interleaved") == 0
        cos, sin = node.inputs[7:9]
        assert cos.const_value is not None and list(cos.shape) == [MAX_LEN, 8]
        assert sin.const_value is not None and list(sin.shape) == [MAX_LEN, 8]


def test_folded_programs_match_the_module(llama):
    module = llama["model"][0]
    assert_prefill_and_decode_match(module, llama["ort"][1].program("decoder"))


def test_generation_with_unequal_prompts_equals_eager(llama):
    """Batch 2 decodes on its static program, batch 3 on the dynamic decoder."""
    prompts = {
        2: [[5, 17, 99, 3, 250, 7, 1, 4], [42, 8]],
        3: [[1, 2], [3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13]],
    }
    generators = {b: Generator.from_artifact(llama[b][1], "cpu") for b in ("eager", "ort")}
    step = generators["ort"].step
    config = SamplingConfig(max_new_tokens=8)
    for batch in (2, 3):
        tokens = {b: g.generate(prompts[batch], config).tokens for b, g in generators.items()}
        assert tokens["ort"] == tokens["eager"], batch
        static = step.program.decode_sessions.get(batch)
        assert (step.decode[batch].session is static) == (batch == 2)


def test_mha_with_separate_qkv_linears(tmp_path):
    """kv_heads == heads and no horizontal fusion: q, k, v go in as three [B, S, H*D] inputs."""
    model = decoder(num_kv_heads=4)
    compiled, artifact = compile_ort(
        model, "ort{device=cpu,decode_batches=[1]}", tmp_path / "a", UNFUSED_QKV
    )
    report = compiled.contents.report["ort"]["gqa_fold"]
    assert report["rotary_folded"] == 2 and report["packed_qkv"] == 0
    decode = ir.load(artifact.directory / "decoder.decode_b1.onnx")
    for node in gqa_nodes(decode):
        assert [node.inputs[i].producer().op_type for i in range(3)] == ["MatMul"] * 3
        assert node.attributes.get_int("num_heads") == node.attributes.get_int("kv_num_heads")
    assert not {"RotaryEmbedding", "Transpose", "Split"} & {n.op_type for n in decode.graph}
    assert_prefill_and_decode_match(model[0], artifact.program("decoder"))


def test_interleaved_rotary_is_folded(tmp_path):
    model = decoder(rotary_dim=16, interleaved=True)
    compiled, artifact = compile_ort(model, "ort{device=cpu,decode_batches=[1]}", tmp_path / "a")
    assert compiled.contents.report["ort"]["gqa_fold"]["rotary_folded"] == 2
    decode = ir.load(artifact.directory / "decoder.decode_b1.onnx")
    assert all(n.attributes.get_int("rotary_interleaved") == 1 for n in gqa_nodes(decode))
    assert "RotaryEmbedding" not in {n.op_type for n in decode.graph}
    assert_prefill_and_decode_match(model[0], artifact.program("decoder"))


def test_partial_rotary_is_left_apart_and_correct(tmp_path):
    model = decoder(rotary_dim=8)  # 8 of head dim 16
    compiled, artifact = compile_ort(model, "ort{device=cpu,decode_batches=[1]}", tmp_path / "a")
    report = compiled.contents.report["ort"]["gqa_fold"]
    assert report["rotary_folded"] == 0 and len(report["not_folded"]) == 2
    assert all("partial rotary (8 of head dim 16" in r for r in report["not_folded"].values())
    decode = ir.load(artifact.directory / "decoder.decode_b1.onnx")
    assert Counter(n.op_type for n in decode.graph)["RotaryEmbedding"] == 4
    assert all(n.attributes.get_int("do_rotary", 0) == 0 for n in gqa_nodes(decode))
    assert_prefill_and_decode_match(model[0], artifact.program("decoder"))


def test_fold_rotary_option_is_validated(tmp_path):
    with pytest.raises(
        PeakcError,
        match=r"backend 'ort': option 'fold_rotary' expects true or false, got 'maybe' "
        r"\(column 16\)",
    ):
        compile_ort(decoder(), "ort{device=cpu,fold_rotary=maybe}", tmp_path / "a")


def test_transformers_llama_rotary_is_folded(tmp_path):
    """transformers computes cos/sin as Cos/Sin(positions * inv_freq): the tables come from
    evaluating that subgraph (the form the llama-1b benchmark exports)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    causal_lm = transformers.LlamaForCausalLM(config).eval()
    module, layout = kv_cache.wrap_for_generation(causal_lm, MAX_LEN, MAX_BATCH, "hf-llama")
    inputs, dynamic = kv_cache.example_inputs(layout), kv_cache.dynamic_shapes(layout)
    model = (module, inputs, dynamic, layout.to_dict())
    compiled, artifact = compile_ort(model, "ort{device=cpu,decode_batches=[1]}", tmp_path / "a")
    report = compiled.contents.report["ort"]["gqa_fold"]
    assert report["rotary_folded"] == 2 and report["packed_qkv"] == 2
    decode = ir.load(artifact.directory / "decoder.decode_b1.onnx")
    assert not {"RotaryEmbedding", "Cos", "Sin", "Transpose"} & {n.op_type for n in decode.graph}
    assert_prefill_and_decode_match(module, artifact.program("decoder"))


def test_transpose_pairs_that_cancel_are_bypassed():
    x = ir.Value(name="x", shape=ir.Shape([1, 2, 3, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    first = ir.node("Transpose", [x], {"perm": [0, 2, 1, 3]})
    second = ir.node("Transpose", [first.outputs[0]], {"perm": [0, 2, 1, 3]})
    other = ir.node("Transpose", [first.outputs[0]], {"perm": [0, 1, 3, 2]})  # no identity
    relu = ir.node("Relu", [second.outputs[0]])
    sigmoid = ir.node("Sigmoid", [other.outputs[0]])
    graph = ir.Graph(
        [x],
        [relu.outputs[0], sigmoid.outputs[0]],
        nodes=[first, second, other, relu, sigmoid],
        opset_imports={"": 18},
    )
    assert cancel_transpose_pairs(ir.Model(graph, ir_version=10)) == 1
    assert relu.inputs[0] is x and sigmoid.inputs[0] is other.outputs[0]


def test_cos_table_reading_a_cache_shape_is_evaluated_per_position():
    """torch 2.11's export takes the batch size for the rotary's inv_freq Expand from a cache
    input (Shape(past)): the table subgraph is accepted and evaluated with zeros of its shape,
    and a subgraph mixing positions is refused."""
    from onnx import TensorProto, helper

    from peakc.backends.ort.gqa_fold import check_table_subgraph, evaluate_tables

    inv = torch.tensor([1.0, 0.5, 0.25, 0.125]).view(1, 4, 1)
    nodes = [
        helper.make_node("Shape", ["past"], ["batch"], start=0, end=1),
        helper.make_node("Concat", ["batch", "one", "one"], ["shape"], axis=0),
        helper.make_node("Expand", ["inv", "shape"], ["inv_b"]),
        helper.make_node("Unsqueeze", ["positions", "one"], ["pos3"]),
        helper.make_node("Cast", ["pos3"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["inv_b", "posf"], ["freqs"]),  # [B, 4, S]
        helper.make_node("Transpose", ["freqs"], ["freqs_t"], perm=[0, 2, 1]),
        helper.make_node("Cos", ["freqs_t"], ["cos"]),
        helper.make_node("Reshape", ["cos", "rows"], ["cos_rows"]),
        helper.make_node("ReduceSum", ["posf", "one"], ["total"], keepdims=1),  # mixes positions
        helper.make_node("Mul", ["cos_rows", "total"], ["mixed"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rotary",
        [
            helper.make_tensor_value_info("positions", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 2, 8, 8]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("cos_rows", "mixed")],
        initializer=[
            helper.make_tensor("inv", TensorProto.FLOAT, [1, 4, 1], inv.flatten().tolist()),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
            helper.make_tensor("rows", TensorProto.INT64, [2], [-1, 4]),
        ],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    cos = next(v for v in model.graph.outputs if v.name == "cos_rows")
    assert check_table_subgraph(cos, "positions") is None
    (table,) = evaluate_tables(model, [cos], "positions", 8)
    expected = torch.cos(torch.arange(8.0).view(8, 1) * inv.view(1, 4))
    torch.testing.assert_close(torch.from_numpy(table), expected)
    mixed = next(v for v in model.graph.outputs if v.name == "mixed")
    assert "ReduceSum" in check_table_subgraph(mixed, "positions")
