"""compress_moe on a MoE-fied demo Llama: ternary GPTQ over experts, the dictionary code,
linear_compressed in the graph and the artifact, stats, and its refusals."""

import functools

import pytest
import torch
from safetensors.torch import load_file

import peakc
from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.ir.dictionary_code import decode
from peakc.models.demo import demo_llama
from peakc.models.moe import moefy
from peakc.passes.base import PassContext
from peakc.passes.compress_moe import CompressMoEOptions, CompressMoEPass
from peakc.passes.moe_experts import MOE_KEY, TABLE_WEIGHT
from peakc.passes.pipeline import Pipeline

COMPRESSED = torch.ops.peakc.linear_compressed.default
LINEAR = torch.ops.aten.linear.default
EXPERTS = 4


def moe_llama():
    """The demo Llama (2 layers, 64 MLP units) with each MLP split into 4 experts."""
    model, inputs = demo_llama(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.SiLU()  # what the demo MLP's forward applies
    moefy(model, EXPERTS)
    return model, inputs


@functools.cache
def moe_graph():
    model, inputs = moe_llama()
    return capture(model, inputs, name="demo:llama-moe")


def _calib(n=4):
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(1))


def _run(graph, **options):
    ctx = PassContext(calibration_data=_calib())
    opts = {**dict(nsamples=2, dictionary_size=256, segment=32, min_tokens=16), **options}
    return CompressMoEPass(CompressMoEOptions(**opts)).run(graph, ctx)


def test_ternary_gptq_codes_every_expert_linear():
    graph = moe_graph().copy()
    dense = graph.run()[0]
    result = _run(graph)
    g = result.graph
    g.verify()
    compressed = [n for n in g.call_nodes() if n.target is COMPRESSED]
    assert len(compressed) == 2 * EXPERTS * 3
    linears = [n.meta["peakc_module"] for n in g.call_nodes() if n.target is LINEAR]
    assert all("experts" not in m for m in linears) and "lm_head" in linears
    record = compressed[0].meta[MOE_KEY]
    assert record["levels"] == "ternary" and record["expert"] == 0 and record["tokens"] == 32
    s = result.stats
    assert s["experts"] == 2 * EXPERTS and s["layers"] == s["roundtrip_checked"] == 24
    assert s["params"] == 2 * 3 * 32 * 64
    assert 0 < s["zero_fraction"] < 1 and s["experts_below_floor"] == 0
    assert s["entropy_bits"] <= s["code_bits_per_param"] < s["bits_per_param"]
    assert s["compression_ratio"] > 1 and s["bytes_after"] < s["bytes_before"]
    assert 0 < s["recon_error.mean"] <= s["recon_error.max"] < 1
    # each node's stream decodes to ternary levels; one table serves every expert
    tables = {n.args[3].target for n in compressed}
    assert tables == {TABLE_WEIGHT}
    node = compressed[0]
    w = {i: g.get_weight(node.args[i].target) for i in (1, 2, 3, 4, 5)}
    levels = decode(w[1], w[2], w[3], w[4], w[5].shape[0], *node.args[7:])
    assert set(levels.unique().tolist()) <= {-1, 0, 1}
    out = g.run()[0]
    assert torch.isfinite(out).all() and float((out - dense).norm() / dense.norm()) < 1.0


def test_compressed_artifact_saves_loads_and_runs_on_eager(tmp_path):
    graph = moe_graph().copy()
    inputs = graph.example_inputs
    compiled = peakc.compile(
        graph,
        pipeline="compress_moe{method=rtn,dictionary_size=64,segment=16}",
        parity=False,
    )
    path = compiled.save(tmp_path / "art")
    loaded = peakc.load(path)
    torch.testing.assert_close(loaded(*inputs)[0], compiled(*inputs)[0])
    stored = load_file(str(path / "weights.safetensors"))
    assert stored["model.layers.0.mlp.experts.1.up_proj.words"].dtype == torch.int16
    assert stored[TABLE_WEIGHT].shape == (63, 8)  # 3 + 2k ternary words <= 64
    assert not any(k.endswith("experts.1.up_proj.weight") for k in stored)
    # a damaged code stream in the artifact is refused by its checksum
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PeakcError, match="checksum mismatch"):
        peakc.load(path)


def test_two_bit_levels_and_the_token_floor():
    result = _run(moe_graph().copy(), levels="2bit", min_tokens=1000, floor="rtn")
    s = result.stats
    assert s["experts_below_floor"] == 2 * EXPERTS and s["tokens_per_expert.min"] == 32
    assert "gptq_kernel" not in s  # every expert fell below the floor: rounded to nearest
    # floor=blend: all-active experts saw every token, their Hessian is the layer's own
    blended = _run(moe_graph().copy(), levels="2bit", min_tokens=1000).stats
    assert blended["experts_below_floor"] == 2 * EXPERTS and blended["gptq_kernel"] == "batched"
    g = result.graph
    node = next(n for n in g.call_nodes() if n.target is COMPRESSED)
    w = {i: g.get_weight(node.args[i].target) for i in (1, 2, 3, 4, 5)}
    levels = decode(w[1], w[2], w[3], w[4], w[5].shape[0], *node.args[7:])
    assert set(levels.unique().tolist()) <= {-2, -1, 0, 1} and (levels == -2).any()


def test_a_model_without_experts_is_an_error_naming_the_pass_and_model(llama_graph):
    with pytest.raises(PeakcError, match="'compress_moe': model 'demo:llama' has no mixture"):
        _run(llama_graph.copy())


def test_targets_matching_no_expert_is_an_error():
    with pytest.raises(PeakcError, match="'targets' 'attn' matches no expert weight"):
        _run(moe_graph().copy(), targets="attn")


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(levels="3bit"), "'levels'"),
        (dict(method="sparsegpt"), "'method'"),
        (dict(segment=8), "'segment'"),
        (dict(dictionary_size=70000), "'dictionary_size'"),
        (dict(min_tokens=-1), "'min_tokens'"),
        (dict(floor="identity"), "'floor'"),
        (dict(max_tokens_per_expert=-1), "'max_tokens_per_expert'"),
        (dict(expert_batch=0), "'expert_batch'"),
    ],
)
def test_bad_options_name_the_option(options, needle):
    with pytest.raises(PeakcError, match=needle):
        CompressMoEPass(CompressMoEOptions(**options))


def test_pipeline_spec_round_trips():
    pipe = Pipeline.parse("compress_moe{levels=2bit,segment=512,dictionary_size=4096}")
    assert Pipeline.parse(str(pipe)) == pipe and pipe.passes[0].options.segment == 512
