import pytest
import torch

import peakc
from peakc.cost_model.hardware import resolve_profile
from peakc.errors import PeakcError
from peakc.ir.ops import PackedWeight
from peakc.passes.base import PassContext
from peakc.passes.pipeline import Pipeline
from peakc.passes.quantize import QUANT_KEY, QuantizeOptions, QuantizePass

LINEAR = torch.ops.aten.linear.default
WQ = torch.ops.peakc.linear_wq.default


def _calib(graph, n=8):
    seq = graph.example_inputs[0].shape[1]
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))


def _run(graph, **options):
    ctx = PassContext(calibration_data=_calib(graph))
    return QuantizePass(QuantizeOptions(nsamples=8, **options)).run(graph, ctx)


def _wq_weights(graph):
    """Module path -> dequantized weight of every linear_wq node."""
    out = {}
    for node in graph.call_nodes():
        if node.target is WQ:
            _, packed, _ = PackedWeight.of(node.args)
            tensors = {key: graph.get_weight(a.target) for key, a in packed.tensors().items()}
            out[node.meta["peakc_module"]] = packed.with_tensors(tensors).dequantize()
    return out


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_replaces_block_linears_and_leaves_head_alone(graph, method):
    dense = graph.run()[0]
    weights_before = set(graph.weights())
    result = _run(graph, method=method, bits=8, group_size=32)
    g = result.graph
    g.verify()
    wq = [n for n in g.call_nodes() if n.target is WQ]
    linears = [n for n in g.call_nodes() if n.target is LINEAR]
    assert len(wq) == 14 and result.stats["layers"] == 14
    assert [n.meta["peakc_module"] for n in linears] == ["lm_head"]
    assert all(n.meta[QUANT_KEY]["bits"] == 8 for n in wq)
    assert wq[0].meta["val"].shape == (1, 16, 64)
    names = set(g.weights())
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert {"model.layers.0.self_attn.q_proj.qweight", "model.layers.0.mlp.down_proj.scales"} <= (
        names
    )
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in weights_before & names
    assert 8 < result.stats["bits_per_param"] < 10
    assert result.stats.get("gptq_kernel") == ("torch" if method == "gptq" else None)
    assert result.stats["weight_bytes_after"] < result.stats["weight_bytes_before"]
    out = g.run()[0]
    assert float((out - dense).norm() / dense.norm()) < 0.02


def test_quantized_artifact_saves_loads_runs_and_matches_reference(llama, tmp_path):
    model, inputs = llama
    compiled = peakc.compile(
        model,
        inputs,
        pipeline="quantize{method=gptq,bits=4,group_size=32,static_groups=false,nsamples=4}",
        calibration_data=torch.randint(0, 256, (4, 16)),
        parity=False,
    )
    path = compiled.save(tmp_path / "art")
    loaded = peakc.load(path)
    torch.testing.assert_close(loaded(*inputs)[0], compiled(*inputs)[0])
    from safetensors.torch import load_file

    stored = load_file(str(path / "weights.safetensors"))
    assert stored["model.layers.1.mlp.up_proj.qweight"].dtype == torch.uint8
    assert stored["model.layers.1.mlp.up_proj.g_idx"].dtype == torch.int32
    assert "model.layers.1.mlp.up_proj.weight" not in stored


def test_prune_then_quantize_keeps_zeros(graph):
    pipe = Pipeline.parse(
        "prune{method=sparsegpt,sparsity=0.5,nsamples=8},quantize{method=gptq,bits=4,nsamples=8}"
    )
    ctx = PassContext(calibration_data=_calib(graph))
    pruned_pass, quant_pass = pipe.passes
    pruned = pruned_pass.run(graph, ctx).graph
    masks = {
        n.meta["peakc_module"]: pruned.get_weight(n.args[1].target) == 0
        for n in pruned.call_nodes()
        if n.target is LINEAR and n.meta["peakc_module"] != "lm_head"
    }
    quantized = quant_pass.run(pruned, ctx).graph
    deq = _wq_weights(quantized)
    assert set(deq) == set(masks)
    for module, mask in masks.items():
        assert float(mask.float().mean()) == pytest.approx(0.5, abs=0.01)
        assert torch.equal(deq[module][mask], torch.zeros(int(mask.sum()))), module
        assert float((deq[module][~mask] != 0).float().mean()) > 0.9


def test_pipeline_spec_round_trips():
    spec = "quantize{method=gptq,bits=3,group_size=64,sym=true,kernel=torch}"
    pipe = Pipeline.parse(spec)
    assert Pipeline.parse(str(pipe)) == pipe
    assert pipe.passes[0].options.bits == 3 and pipe.passes[0].options.sym is True
    assert pipe.passes[0].options.kernel == "torch"


@pytest.mark.parametrize(
    "options,needle",
    [
        (dict(bits=5), "'bits'"),
        (dict(group_size=48), "'group_size'"),
        (dict(group_size=0), "'group_size'"),
        (dict(targets="("), "'targets'"),
        (dict(kernel="cuda"), "'kernel'"),
    ],
)
def test_bad_options_name_the_option(options, needle):
    with pytest.raises(PeakcError, match=needle):
        QuantizePass(QuantizeOptions(**options))


def test_group_size_larger_than_a_layer_names_the_layer(graph):
    with pytest.raises(PeakcError, match="group_size.*model.layers.0.self_attn.q_proj"):
        _run(graph, method="rtn", group_size=128)


def test_targets_matching_nothing_is_an_error(graph):
    with pytest.raises(PeakcError, match="'targets' 'nothing_here' matches no linear"):
        _run(graph, method="rtn", targets="nothing_here")


def test_explicit_targets_may_include_the_head(graph):
    result = _run(graph, method="rtn", bits=8, targets="lm_head")
    assert result.stats["layers"] == 1
    linears = [n.meta["peakc_module"] for n in result.graph.call_nodes() if n.target is LINEAR]
    assert "lm_head" not in linears and len(linears) == 14


def test_targets_matching_nothing_by_default_names_the_default():
    from peakc.ir.capture import capture

    graph = capture(torch.nn.Sequential(torch.nn.Linear(8, 4)), (torch.randn(2, 8),))
    with pytest.raises(PeakcError, match="'targets' \\(default: linears inside numbered layers\\)"):
        _run(graph, method="rtn")


@pytest.fixture(scope="module")
def generation_graph():
    """A one-layer demo Llama's decoder (KV cache, dynamic batch and sequence)."""
    from peakc.ir.capture import capture
    from peakc.models import kv_cache
    from peakc.models.demo import demo_llama

    model, _ = demo_llama(seed=0, num_layers=1)
    decoder, layout = kv_cache.wrap_for_generation(model, 32, 2, "demo")
    inputs = kv_cache.example_inputs(layout)
    graph = capture(decoder, inputs, name="demo", dynamic=kv_cache.dynamic_shapes(layout))
    graph.info["generation"] = layout.to_dict()
    return graph


def test_report_predicts_less_weight_memory_and_decode_time_after(generation_graph):
    ctx = PassContext(target=resolve_profile("h100-sxm"))
    pass_ = QuantizePass(QuantizeOptions(method="rtn", bits=4, group_size=32))
    result = pass_.run(generation_graph.copy(), ctx)
    before, after = result.report["cost"]["before"], result.report["cost"]["after"]
    assert before["target"] == after["target"] == "h100-sxm"
    assert after["decode"]["weights_mb"] < before["decode"]["weights_mb"]
    assert after["prefill"]["weights_mb"] < before["prefill"]["weights_mb"]
    assert after["decode"]["ms"] <= before["decode"]["ms"]
