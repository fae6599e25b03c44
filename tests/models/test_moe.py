"""MoE-fied Llama: the split MLPs equal the dense ones, and capture marks each expert.

A small random transformers Llama stands in for SmolLM2-135M (loading the GGUF takes over a
minute here); benchmarks/qmoe.py checks the same equality on the real weights."""

import pytest
import torch

from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.ir.experts import EXPERT_KEY, expert_of
from peakc.ir.graph import MODULE_KEY
from peakc.models.moe import AllActiveExperts, moefy

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0, layers=2):
    from peakc.models.hf import CausalLMLogits

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    return CausalLMLogits(transformers.LlamaForCausalLM(config).eval())


def test_moefied_model_equals_the_dense_one_and_capture_marks_experts():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        dense = model(ids)
        assert moefy(model, 4) == 2
        split = model(ids)
    torch.testing.assert_close(split, dense, rtol=1e-5, atol=1e-5)
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp, AllActiveExperts) and len(mlp.experts) == 4
    assert mlp.experts[3].down_proj.weight.shape == (32, 16)

    graph = capture(model, (ids,))
    torch.testing.assert_close(graph.run(ids)[0], dense, rtol=1e-5, atol=1e-5)
    linears = [n for n in graph.call_nodes() if n.target is torch.ops.aten.linear.default]
    tagged = [n for n in linears if EXPERT_KEY in n.meta]
    assert len(tagged) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    indices = {(n.meta[EXPERT_KEY]["moe"], n.meta[EXPERT_KEY]["index"]) for n in tagged}
    assert len(indices) == 8 and {i for _, i in indices} == {0, 1, 2, 3}
    for node in tagged:  # the index agrees with the expert's weight
        weight = node.args[1].target
        assert f".experts.{node.meta[EXPERT_KEY]['index']}." in weight
        assert node.meta[EXPERT_KEY]["moe"].endswith("mlp")
    attention = [n for n in linears if "self_attn" in n.meta[MODULE_KEY]]
    assert attention and all(EXPERT_KEY not in n.meta for n in attention)


def test_expert_of_reads_module_paths():
    assert expert_of("model.layers.3.mlp.experts.12.down_proj") == ("model.layers.3.mlp", 12)
    assert expert_of("model.layers.3.block_sparse_moe.experts.0") == (
        "model.layers.3.block_sparse_moe",
        0,
    )
    assert expert_of("model.layers.3.mlp.down_proj") is None


def test_bad_splits_are_errors():
    model = tiny_llama(layers=1)
    with pytest.raises(PeakcError, match="64 MLP units do not split into 5"):
        moefy(model, 5)
    with pytest.raises(PeakcError, match="Linear has no gated MLP"):
        moefy(torch.nn.Linear(4, 4), 2)


def _routed_moe(kind):
    """A random small transformers MoE model (2 layers, 4 experts, top-2)."""
    from peakc.models.hf import CausalLMLogits

    torch.manual_seed(0)
    common = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        use_cache=False,
    )
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(
            transformers.MixtralConfig(num_local_experts=4, **common)
        )
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **common
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    else:
        model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(num_experts=4, **common))
    return CausalLMLogits(model.eval())


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_routed_moe_models_capture_fuse_and_run_like_transformers(kind, tmp_path):
    """Router, top-k and the stacked experts' grouped matmul capture (transformers' op becomes
    peakc::grouped_mm) and fuse, equal to transformers for inputs routed differently from the
    example; Mixtral's artifact runs on eager and loads without transformers' op."""
    import peakc
    from peakc.passes.base import PassContext
    from peakc.passes.pipeline import Pipeline

    model = _routed_moe(kind)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    graph = capture(model, (ids,))
    fused, records = Pipeline.parse("cleanup,fuse").run(graph, PassContext())
    assert records[-1]["modified"]  # rms_norm, attention, ... fused around the experts
    targets = {str(n.target) for n in fused.call_nodes()}
    assert "peakc.grouped_mm.default" in targets
    assert not any(t.startswith("transformers.") for t in targets)
    with torch.no_grad():
        for x in (ids, other):
            torch.testing.assert_close(fused.run(x)[0], model(x), rtol=1e-5, atol=1e-5)
    if kind == "mixtral":
        compiled = peakc.compile(fused, parity=False, pipeline="none")
        loaded = peakc.load(compiled.save(tmp_path / "art"))
        torch.testing.assert_close(loaded(other)[0], model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_routed_moe_models_run_on_ort(kind, tmp_path):
    """The ort backend exports the routed experts (peakc::grouped_mm: every expert's product,
    each token's row selected) and the routing around them; the loaded artifact equals
    transformers on tokens routed differently from the example's."""
    pytest.importorskip("onnxruntime")
    import peakc

    model = _routed_moe(kind)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    compiled = peakc.compile(capture(model, (ids,)), backend="ort", parity=False)
    report = compiled.contents.report
    assert report["ops"]["grouped_mm"] == "contrib/onnx" and report["ort"]["reference_ops"] == []
    loaded = peakc.load(compiled.save(tmp_path / "art"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(other)[0], model(other), rtol=1e-5, atol=1e-5)


def test_mixtral_generates_on_ort_as_its_decoder_does(tmp_path):
    """Mixtral wrapped as a KV-cache decoder compiles to ort with dynamic batch and length
    (the grouped matmul's token count varies per step) and decodes greedily from its artifact
    the tokens its own decoder module gives."""
    pytest.importorskip("onnxruntime")
    import peakc
    from peakc.models import kv_cache
    from peakc.runtime.generate import Generator, SamplingConfig

    model = _routed_moe("mixtral").hf_model
    decoder, layout = kv_cache.wrap_for_generation(model, 32, 2, "mixtral")
    compiled = peakc.compile(
        decoder,
        kv_cache.example_inputs(layout),
        backend="ort",
        dynamic=kv_cache.dynamic_shapes(layout),
        generation=layout.to_dict(),
        parity=False,
    )
    artifact = peakc.load(compiled.save(tmp_path / "mixtral"))
    prompts, config = [[5, 6, 7, 8, 9], [11, 12]], SamplingConfig(max_new_tokens=6)

    def step(ids, positions, k_cache, v_cache):
        with torch.no_grad():
            return decoder(ids, positions, k_cache, v_cache)

    reference = Generator(step, layout.to_dict(), "cpu").generate(prompts, config).tokens
    assert Generator.from_artifact(artifact, "cpu").generate(prompts, config).tokens == reference
