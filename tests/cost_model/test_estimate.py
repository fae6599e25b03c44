"""Whole-graph estimates: block totals, memory tiers, prefill/decode, bad input."""

import pytest
import torch
from torch import nn

from peakc.cost_model.estimate import estimate, register_cost_rule
from peakc.cost_model.hardware import resolve_profile
from peakc.cost_model.memory import kv_cache_bytes, kv_cache_formula, peak_activation_bytes
from peakc.cost_model.op_costs import COST_RULES, OpCost
from peakc.cost_model.phases import estimate_decode, estimate_prefill
from peakc.errors import PeakcError
from peakc.ir import capture
from peakc.models.demo import demo_llama

CFG = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def llama():
    return demo_llama(0, **CFG)


@pytest.fixture(scope="module")
def llama_graph(llama):
    return capture(*llama)


@pytest.mark.parametrize("target", ["h100-sxm", "cpu"])
def test_block_totals_sum_to_graph_total(llama_graph, target):
    est = estimate(llama_graph, resolve_profile(target))
    names = [b.name for b in est.blocks]
    assert names == ["prologue", "model.layers.0", "model.layers.1", "epilogue"]
    assert sum(b.time for b in est.blocks) == pytest.approx(est.total_time)
    assert sum(b.flops for b in est.blocks) == pytest.approx(est.total_flops)
    assert sum(b.kernels for b in est.blocks) == est.kernels
    assert est.total_time >= max(est.host_time, est.device_busy) * (1 - 1e-9)


def test_kv_cache_matches_formula(llama_graph):
    # 2 layers, kv heads 2, head_dim 16, fp32
    expected = kv_cache_formula(
        layers=2, batch=3, tokens=50, kv_heads=2, head_dim=16, dtype_bytes=4
    )
    assert kv_cache_bytes(llama_graph, batch=3, tokens=50) == expected
    assert expected == 2 * 2 * 3 * 50 * 2 * 16 * 4


class Chain(nn.Module):
    def forward(self, x):
        a = x * 2.0  # 4 KiB
        b = a + 1.0  # 4 KiB; a dies here
        c = b.view(-1)  # view: shares b
        return c * 3.0  # 4 KiB; b dies here


def test_peak_activation_memory_on_a_chain():
    x = torch.randn(32, 32)  # 4 KiB
    graph = capture(Chain(), (x,))
    # Each step holds its input and its output: x+a, then a+b, then b+out; never three.
    assert peak_activation_bytes(graph) == 2 * 4096


def test_memory_tiers(llama, llama_graph):
    est = estimate(llama_graph, resolve_profile("h100-sxm"), batch=1, kv_tokens=16)
    weights = sum(p.numel() * 4 for p in llama[0].parameters())
    buffers = sum(b.numel() * 4 for b in llama[0].buffers())
    assert est.memory.weights == weights + buffers
    assert est.memory.kv_cache == kv_cache_formula(2, 1, 16, 2, 16, 4)
    assert 0 < est.memory.peak_activations < 1e6
    assert est.memory.fits_device


def test_prefill_and_decode(llama):
    profile = resolve_profile("h100-sxm")
    prefill = estimate_prefill(*llama, profile, batch=2, seq=64)
    decode = estimate_decode(*llama, profile, batch=2, context=64)
    assert prefill.phase == "prefill" and decode.phase == "decode"
    linear_flops = sum(n.flops for n in prefill.nodes if n.op == "aten.linear")
    linear_flops_decode = sum(n.flops for n in decode.nodes if n.op == "aten.linear")
    assert linear_flops == pytest.approx(64 * linear_flops_decode)
    attn = [n for n in decode.nodes if n.kind == "attention"]
    assert all(n.flops == 2 * 2 * 4 * 64 * 32 for n in attn)
    assert decode.memory.kv_cache == prefill.memory.kv_cache


def test_prefill_needs_token_ids():
    model = nn.Linear(4, 4)
    with pytest.raises(PeakcError, match="token ids"):
        estimate_prefill(model, (torch.randn(2, 4),), resolve_profile("cpu"), 1, 8)


def test_unknown_shape_names_the_node(llama_graph):
    graph = llama_graph.copy()
    node = next(n for n in graph.call_nodes() if n.name == "linear_2")
    del node.meta["val"]
    with pytest.raises(PeakcError, match="node 'linear_2' \\(aten.linear\\): output shape unknown"):
        estimate(graph, resolve_profile("cpu"))


def test_fused_peakc_op_is_one_kernel_with_its_rule(llama_graph):
    from peakc.passes.base import PassContext
    from peakc.passes.pipeline import Pipeline

    fused, _ = Pipeline.parse("default").run(llama_graph.copy(), PassContext(target=None))
    est = estimate(fused, resolve_profile("h100-sxm"), batch=1, kv_tokens=16)
    peakc_ops = {n.op for n in est.nodes if n.op.startswith("peakc.")}
    assert peakc_ops, "the default pipeline fuses the demo Llama into peakc ops"
    assert all(op in COST_RULES for op in peakc_ops) and not est.notes
    attn = [n for n in est.nodes if n.op == "peakc.attention"]
    assert attn and all(n.kind == "attention" for n in attn)
    assert est.memory.kv_cache == kv_cache_formula(2, 1, 16, 2, 16, 4)
    assert est.kernels < estimate(llama_graph, resolve_profile("h100-sxm")).kernels


def test_registered_rule_and_generic_note(llama_graph):
    est = estimate(llama_graph, resolve_profile("cpu"))
    assert not est.notes  # every op of the demo Llama has a rule

    @register_cost_rule("aten.neg")
    def free_neg(node, ctx):
        return OpCost(0.0, 0.0, "free", rule="test")

    try:
        est2 = estimate(llama_graph, resolve_profile("cpu"))
        assert est2.kernels < est.kernels
    finally:
        from peakc.cost_model.op_costs import elementwise

        COST_RULES["aten.neg"] = elementwise


def test_runtime_graph_is_device_time_and_eager_adds_host(llama_graph):
    profile = resolve_profile("h100-sxm")
    graph = estimate(llama_graph, profile, runtime="graph")
    eager = estimate(llama_graph, profile)
    assert eager.runtime == "eager" and graph.runtime == "graph"
    assert graph.total_time == pytest.approx(sum(n.device_time for n in graph.nodes))
    assert graph.total_time == pytest.approx(graph.device_time)
    assert graph.device_time == pytest.approx(eager.device_time)
    # Tiny kernels: eager is bound by the host's issue time, the graph replay is not.
    assert eager.total_time > 1.2 * graph.total_time
    gap_only = sum(n.kernels for n in graph.nodes) * profile.kernel_gap
    assert gap_only < graph.total_time < eager.total_time
    with pytest.raises(PeakcError, match="runtime must be one of eager, graph, got 'cuda'"):
        estimate(llama_graph, profile, runtime="cuda")


def test_eager_kernels_per_node_from_the_profile(llama_graph):
    profile = resolve_profile("h100-sxm")
    base = estimate(llama_graph, profile, runtime="graph")
    profile.eager_kernels = {"aten.scaled_dot_product_attention": 3}
    more = estimate(llama_graph, profile, runtime="graph")
    attn = [n for n in more.nodes if n.kind == "attention"]
    assert attn and all(n.kernels == 3 for n in attn)
    assert more.kernels == base.kernels + 2 * len(attn)
    assert more.total_time == pytest.approx(base.total_time + 2 * len(attn) * profile.kernel_gap)


def test_cpu_graph_runtime_keeps_the_host_on_its_clock(llama_graph):
    profile = resolve_profile("cpu")
    graph = estimate(llama_graph, profile, runtime="graph")
    eager = estimate(llama_graph, profile, runtime="eager")
    assert graph.total_time == pytest.approx(eager.total_time)
    assert any("no device-side replay" in note for note in graph.notes)
