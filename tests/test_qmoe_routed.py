"""compress_moe on routed experts stacked in one weight (random tiny transformers Mixtral,
Qwen2-MoE and OLMoE): routing-aware calibration (each expert's Hessian from the tokens the
router sends it, the cap and the floor), peakc::grouped_mm_compressed, artifacts, and a
compressed Mixtral decoding from its artifact."""

import functools

import pytest
import torch
from safetensors.torch import load_file

import peakc
from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.ir.dictionary_code import encode, tunstall
from peakc.ir.ops import GROUPED_MM, GROUPED_MM_COMPRESSED
from peakc.passes.base import PassContext
from peakc.passes.compress_moe import CompressMoEOptions, CompressMoEPass
from peakc.passes.moe_experts import (
    MOE_KEY,
    ExpertSolver,
    RoutedInputs,
    RoutedSite,
    expert_hessians,
)

transformers = pytest.importorskip("transformers")

COMPRESSED = GROUPED_MM_COMPRESSED.overload
EXPERTS, LAYERS, SEQ = 4, 2, 16


def routed_model(kind, layers=LAYERS):
    """A random tiny transformers MoE causal LM (4 experts, top-2), returning logits."""
    from peakc.models.hf import CausalLMLogits

    torch.manual_seed(0)
    common = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
    )
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=EXPERTS, **common)
        return transformers.MixtralForCausalLM(config).eval()
    if kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            num_experts=EXPERTS,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            **common,
        )
        return CausalLMLogits(transformers.Qwen2MoeForCausalLM(config).eval())
    config = transformers.OlmoeConfig(num_experts=EXPERTS, **common)
    return CausalLMLogits(transformers.OlmoeForCausalLM(config).eval())


def _ids(seed, n=1):
    return torch.randint(0, 96, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@functools.cache
def routed_graph(kind):
    from peakc.models.hf import CausalLMLogits

    model = routed_model(kind)
    model = model if isinstance(model, CausalLMLogits) else CausalLMLogits(model)
    return capture(model, (_ids(1),), name=kind)


def _run(graph, **options):
    ctx = PassContext(calibration_data=_ids(3, 4))
    opts = {**dict(nsamples=4, dictionary_size=256, segment=32, min_tokens=4), **options}
    return CompressMoEPass(CompressMoEOptions(**opts)).run(graph, ctx)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_stacked_experts_are_coded_from_the_tokens_routed_to_them(kind):
    graph = routed_graph(kind).copy()
    dense = graph.run()[0]
    result = _run(graph)
    g = result.graph
    g.verify()
    nodes = [n for n in g.call_nodes() if n.target is COMPRESSED]
    assert len(nodes) == LAYERS * 2  # gate_up and down of every layer
    assert not any(n.target is GROUPED_MM.overload for n in g.call_nodes())
    assert not any(w.endswith(("experts.gate_up_proj", "experts.down_proj")) for w in g.weights())
    s = result.stats
    assert s["experts"] == LAYERS * EXPERTS and s["stacked_weights"] == s["layers"] == 4
    assert s["roundtrip_checked"] == 4 and s["gptq_kernel"] == "batched"
    assert s["experts_at_cap"] == 0 and s["entropy_bits"] <= s["code_bits_per_param"]
    record = nodes[0].meta[MOE_KEY]
    assert record["experts"] == EXPERTS and record["moe"] == "model.layers.0.mlp.experts"
    assert sum(record["tokens"]) == 4 * SEQ * 2  # every routed token, top-2, no cap
    assert s["tokens_per_expert.max"] == max(t for n in nodes for t in n.meta[MOE_KEY]["tokens"])
    out = g.run()[0]
    assert torch.isfinite(out).all() and float((out - dense).norm() / dense.norm()) < 1.0
    if kind == "qwen2_moe":  # the shared expert is not routed: it stays a float linear
        assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in g.weights()


def test_targets_pick_stacked_weights_by_path():
    g = _run(routed_graph("mixtral").copy(), targets=r"down_proj").graph
    coded = [n.args[1].target for n in g.call_nodes() if n.target is COMPRESSED]
    assert coded == [f"model.layers.{i}.mlp.experts.down_proj_coded.words" for i in (0, 1)]
    assert sum(n.target is GROUPED_MM.overload for n in g.call_nodes()) == 2  # gate_up kept


def test_the_cap_and_the_floor_are_counted():
    graph = routed_graph("mixtral")
    capped = _run(graph.copy(), max_tokens_per_expert=8).stats
    assert capped["tokens_per_expert.max"] == 8 and capped["experts_at_cap"] >= 1
    blended = _run(graph.copy(), min_tokens=10_000).stats  # every expert below the floor
    assert blended["experts_below_floor"] == LAYERS * EXPERTS
    assert blended["gptq_kernel"] == "batched"  # solved with the blended Hessians
    rounded = _run(graph.copy(), min_tokens=10_000, floor="rtn").stats
    assert rounded["experts_below_floor"] == LAYERS * EXPERTS and "gptq_kernel" not in rounded


def test_each_experts_statistics_come_from_the_tokens_its_router_sends_it(monkeypatch):
    """The gate_up site's per-expert sums of x xᵀ and token counts equal those gathered from
    transformers' own router on the same calibration windows."""
    from peakc.passes import moe_experts

    model = routed_model("mixtral", layers=1)
    seen = []
    real = moe_experts.expert_hessians

    def spy(received, site, solver):
        seen.append((site.module, received.sums.clone(), list(received.tokens)))
        return real(received, site, solver)

    monkeypatch.setattr(moe_experts, "expert_hessians", spy)
    from peakc.models.hf import CausalLMLogits

    graph = capture(CausalLMLogits(model), (_ids(1),))
    calib = _ids(3, 4)
    _run(graph)
    module, sums, tokens = seen[0]
    assert module == "model.layers.0.mlp.experts.gate_up_proj"
    inputs = []
    moe = model.model.layers[0].mlp
    hook = moe.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    with torch.no_grad():
        for window in calib:
            model(window[None])
    hook.remove()
    x = torch.cat(inputs).reshape(-1, 32)
    with torch.no_grad():
        _, _, chosen = moe.gate(x)
    for e in range(EXPERTS):
        rows = x[(chosen == e).any(-1)]
        assert tokens[e] == rows.shape[0]
        torch.testing.assert_close(sums[e], rows.T @ rows, rtol=1e-4, atol=1e-4)


def _site():
    return RoutedSite(None, "m.experts.gate_up_proj", "m.experts.gate_up_proj", None, None, None, 4)


def test_expert_hessians_blend_the_layers_tokens_below_the_floor():
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(n, 6, generator=gen) for n in (0, 5, 100, 300)]
    sums = torch.stack([xe.T @ xe for xe in x])
    pooled = sums.sum(0) / 405
    solver = ExpertSolver(CompressMoEOptions(min_tokens=50), {})
    received = RoutedInputs(sums.clone(), [0, 5, 100, 300], [False, False, False, True])
    h, rounded = expert_hessians(received, _site(), solver)
    torch.testing.assert_close(h[0], 2 * pooled)  # no token: the layer's all-token Hessian
    torch.testing.assert_close(h[1], 2 * (sums[1] + 45 * pooled) / 50)  # made up to 50 tokens
    torch.testing.assert_close(h[2], 2 * sums[2] / 100)
    torch.testing.assert_close(h[3], 2 * sums[3] / 300)
    assert rounded == [False] * 4
    assert solver.below_floor == {("m.experts", 0), ("m.experts", 1)}
    assert solver.at_cap == {("m.experts", 3)}
    assert solver.tokens["m.experts.gate_up_proj[1]"] == 5

    rtn = ExpertSolver(CompressMoEOptions(min_tokens=50, floor="rtn"), {})
    _, rounded = expert_hessians(
        RoutedInputs(sums.clone(), [0, 5, 100, 300], [False] * 4), _site(), rtn
    )
    assert rounded == [True, True, False, False]
    nothing = RoutedInputs(torch.zeros(4, 6, 6), [0] * 4, [False] * 4)  # no token to blend with
    _, rounded = expert_hessians(nothing, _site(), ExpertSolver(CompressMoEOptions(), {}))
    assert rounded == [True] * 4


def test_the_reference_op_is_grouped_mm_over_the_decoded_experts():
    gen = torch.Generator().manual_seed(0)
    experts, n, k = 3, 5, 40
    levels = torch.randint(-1, 2, (experts * n, k), generator=gen)
    code = encode(levels, tunstall({-1: 1, 0: 3, 1: 1}, size=64), segment=16)
    scales = torch.rand(experts * n, generator=gen) + 0.5
    x = torch.randn(7, k, generator=gen)
    offsets = torch.tensor([2, 2, 6], dtype=torch.int32)  # expert 1 gets nothing; row 6 none
    args = (code.words, code.offsets, code.table, code.checksum, scales, offsets, k, 16)
    out = GROUPED_MM_COMPRESSED.reference(x, *args, code.max_words)
    w = (levels.float() * scales[:, None]).view(experts, n, k)
    want = GROUPED_MM.reference(x, w.transpose(1, 2), offsets)
    torch.testing.assert_close(out, want)
    assert (out[6] == 0).all()
    damaged = code.words.clone()
    damaged[0] ^= 1
    with pytest.raises(PeakcError, match="checksum mismatch"):
        GROUPED_MM_COMPRESSED.reference(x, damaged, *args[1:], code.max_words)


def test_bfloat16_capture_adopts_pytorchs_grouped_mm():
    """transformers routes bfloat16 experts through aten._grouped_mm; capture makes it the
    same peakc::grouped_mm, and compress_moe codes it."""
    from peakc.models.hf import CausalLMLogits

    model = CausalLMLogits(routed_model("mixtral", layers=1)).to(torch.bfloat16)
    graph = capture(model, (_ids(1),))
    targets = {n.target for n in graph.call_nodes()}
    assert GROUPED_MM.overload in targets
    assert torch.ops.aten._grouped_mm.default not in targets
    with torch.no_grad():
        torch.testing.assert_close(graph.run(_ids(2))[0], model(_ids(2)))
    result = _run(graph, method="rtn")
    assert sum(n.target is COMPRESSED for n in result.graph.call_nodes()) == 2
    assert (
        result.graph.get_weight("model.layers.0.mlp.experts.down_proj_coded.scales").dtype
        == torch.bfloat16
    )


def test_compressed_routed_artifact_stores_the_code_and_runs_on_eager(tmp_path):
    graph = routed_graph("olmoe").copy()
    inputs = graph.example_inputs
    compiled = peakc.compile(
        graph, pipeline="compress_moe{method=rtn,dictionary_size=64,segment=16}", parity=False
    )
    path = compiled.save(tmp_path / "art")
    loaded = peakc.load(path)
    torch.testing.assert_close(loaded(*inputs)[0], compiled(*inputs)[0])
    stored = load_file(str(path / "weights.safetensors"))
    assert stored["model.layers.1.mlp.experts.gate_up_proj_coded.words"].dtype == torch.int16
    assert "model.layers.1.mlp.experts.gate_up_proj" not in stored
    report = (path / "report.json").read_text()
    assert "grouped_mm_compressed" in report


def test_a_compressed_mixtral_decoder_generates_from_its_artifact(tmp_path):
    """Mixtral wraps for generation like the Llama family (logits equal to transformers');
    its compressed decoder decodes with the KV cache exactly what a full prefill of the same
    artifact predicts."""
    from peakc.models import kv_cache
    from peakc.runtime.generate import Generator, SamplingConfig

    model = routed_model("mixtral", layers=1)
    decoder, layout = kv_cache.wrap_for_generation(model, 32, 1, "mixtral")
    ids = _ids(4)
    positions = torch.arange(SEQ)[None]
    cache = kv_cache.empty_cache(layout, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            decoder(ids, positions, cache, cache.clone())[0], model(ids).logits
        )
    graph = capture(
        decoder, kv_cache.example_inputs(layout), dynamic=kv_cache.dynamic_shapes(layout)
    )
    compiled = peakc.compile(
        graph,
        pipeline=f"compress_moe{{nsamples=4,seq_len={SEQ},dictionary_size=256,min_tokens=4}}",
        parity=False,
        generation=layout.to_dict(),
        calibration_data=_ids(3, 4),
    )
    artifact = peakc.load(compiled.save(tmp_path / "art"))
    assert set(artifact.manifest["programs"]) == {"decoder", "decode_step"}
    generator = Generator.from_artifact(artifact, "cpu")
    prompt = [5, 9, 2, 40]
    tokens = generator.generate([prompt], SamplingConfig(max_new_tokens=6)).tokens[0]
    logits = generator.prefill_logits(torch.tensor([prompt + tokens]))
    assert logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == tokens
