"""FLOP and byte rules against hand computation, and the roofline's binding resource."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peakc.cost_model.estimate import estimate, kernel_time
from peakc.cost_model.hardware import resolve_profile
from peakc.cost_model.op_costs import CostContext, OpCost, node_cost
from peakc.ir import capture


def _nodes(module, *inputs):
    graph = capture(module, inputs)
    return graph, {n.name: n for n in graph.call_nodes()}


def test_linear_flops_and_bytes():
    m, k, n = 8, 32, 48
    graph, nodes = _nodes(nn.Linear(k, n, bias=True), torch.randn(m, k))
    (lin,) = [v for v in nodes.values() if v.target == torch.ops.aten.linear.default]
    cost = node_cost(lin, CostContext())
    assert cost.kind == "gemm" and cost.dtype == "fp32"
    assert cost.flops == 2 * m * n * k + m * n
    assert cost.bytes == 4 * (m * k + n * k + n + m * n)


class Attn(nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_flops_and_bytes(causal):
    b, h, s, d = 2, 4, 16, 8
    q = torch.randn(b, h, s, d, dtype=torch.bfloat16)
    graph, nodes = _nodes(Attn(causal), q, q.clone(), q.clone())
    (node,) = nodes.values()
    cost = node_cost(node, CostContext())
    pairs = s * (s + 1) / 2 if causal else s * s
    assert cost.kind == "attention" and cost.dtype == "bf16"
    assert cost.flops == 2 * b * h * pairs * (d + d)
    assert cost.bytes == 4 * b * h * s * d * 2  # q, k, v, out in bf16


def test_sdpa_decode_reads_the_kv_cache():
    b, h, d, ctx = 1, 4, 8, 100
    q = torch.randn(b, h, 1, d)
    graph, nodes = _nodes(Attn(False), q, q.clone(), q.clone())
    (node,) = nodes.values()
    cost = node_cost(node, CostContext(kv_len=ctx))
    assert cost.flops == 2 * b * h * ctx * 2 * d
    assert cost.bytes == 4 * (2 * b * h * d + 2 * b * h * ctx * d)


class Chain(nn.Module):
    def forward(self, x, w):
        return (x * w + 1.0).view(-1)


def test_elementwise_bytes_and_views_are_free():
    x, w = torch.randn(16, 32), torch.randn(32)
    graph, nodes = _nodes(Chain(), x, w)
    mul = node_cost(nodes["mul"], CostContext())
    assert mul.kind == "memory"
    assert mul.bytes == 4 * (16 * 32 + 32 + 16 * 32)
    add = node_cost(nodes["add"], CostContext())
    assert add.bytes == 4 * (16 * 32 * 2)
    view = node_cost(nodes["view"], CostContext())
    assert view.kind == "free" and view.bytes == 0


def test_roofline_binding_resource():
    profile = resolve_profile("h100-sxm")
    big_gemm = OpCost(flops=2 * 4096**3, bytes=3 * 2 * 4096**2, kind="gemm", dtype="bf16")
    gemv = OpCost(flops=2 * 4096 * 4096, bytes=2 * 4096 * 4096, kind="gemm", dtype="bf16")
    copy = OpCost(flops=1e6, bytes=1e9, kind="memory")
    t, bound = kernel_time(big_gemm, profile)
    assert bound == "compute"
    assert t == pytest.approx(
        big_gemm.flops / (989e12 * profile.gemm_efficiency_for("bf16", big_gemm.flops))
    )
    assert kernel_time(gemv, profile)[1] == "memory"
    t, bound = kernel_time(copy, profile)
    assert bound == "memory"
    assert t == pytest.approx(1e9 / (profile.memory_bandwidth * profile.copy_efficiency_for(1e9)))


def test_tiny_kernels_are_launch_bound():
    graph, _ = _nodes(Chain(), torch.randn(2, 4), torch.randn(4))
    est = estimate(graph, resolve_profile("h100-sxm"))
    kernels = [n for n in est.nodes if n.kind != "free"]
    assert kernels and all(n.bound == "launch" for n in kernels)
    # Host-bound: the device finishes when the last kernel, issued after both, has run.
    launch = resolve_profile("h100-sxm").launch_overhead
    assert est.total_time == pytest.approx(2 * launch + kernels[-1].device_time)
    assert est.host_time == pytest.approx(2 * launch + resolve_profile("h100-sxm").view_overhead)
