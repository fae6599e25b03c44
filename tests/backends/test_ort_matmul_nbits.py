"""ort backend: linear_wq as MatMulNBits (layout, reasons for the fallback, end to end on CPU)."""

import onnx
import pytest
import torch

import peakc
from peakc.backends.ort.matmul_nbits import _matmul_nbits_reference, block_size_for, to_layout
from peakc.ir.ops import _linear_wq_reference, pack_bits
from peakc.models import load_source_for_task
from peakc.models.demo import demo_llama
from peakc.runtime.generate import Generator, SamplingConfig


def _packed(bits, rows, cols, group, act_order, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = -(-cols // group)
    q = torch.randint(0, 2**bits, (rows, cols), generator=g)
    z = torch.randint(0, 2**bits, (rows, n_groups), generator=g)
    s = torch.rand(rows, n_groups, generator=g) + 0.1
    g_idx = None
    if act_order:
        g_idx = (torch.argsort(torch.randperm(cols, generator=g)) // group).to(torch.int32)
    return pack_bits(q, bits), s, pack_bits(z, bits), g_idx


@pytest.mark.parametrize(
    "bits,cols,group,act_order",
    [
        (4, 64, 32, False),
        (4, 80, 32, False),
        (2, 96, 96, False),
        (8, 576, 576, False),
        (4, 512, 256, False),
        (4, 64, 16, True),
        (8, 48, 16, True),
    ],
)
def test_layout_matches_linear_wq(bits, cols, group, act_order):
    qweight, scales, qzeros, g_idx = _packed(bits, 24, cols, group, act_order)
    layout = to_layout(qweight, scales, qzeros, g_idx, bits, group, cols, torch.float32)
    assert layout.b.dtype == torch.uint8 and layout.b.shape[0] == 24
    assert layout.b.shape[2] == layout.block_size * bits // 8
    assert (layout.perm is not None) == act_order
    x = torch.randn(3, cols)
    want = _linear_wq_reference(x, qweight, scales, qzeros, g_idx, None, bits, group, cols)
    got = _matmul_nbits_reference(
        x,
        layout.b,
        layout.scales,
        layout.zero_points,
        layout.perm,
        None,
        bits,
        layout.block_size,
        cols,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,cols,group", [(4, 64, 32), (8, 128, 16), (2, 256, 128)])
def test_blocks_of_one_group_reuse_the_packed_rows(bits, cols, group):
    """When each block is one group, MatMulNBits' layout is linear_wq's packing itself: equal
    to the unpack/re-pack path (forced here by an identity g_idx)."""
    qweight, scales, qzeros, _ = _packed(bits, 8, cols, group, False)
    fast = to_layout(qweight, scales, qzeros, None, bits, group, cols, torch.float16)
    identity = (torch.arange(cols) // group).to(torch.int32)
    slow = to_layout(qweight, scales, qzeros, identity, bits, group, cols, torch.float16)
    assert fast.block_size == slow.block_size == group
    assert torch.equal(fast.b, slow.b)
    assert torch.equal(fast.scales, slow.scales)
    assert torch.equal(fast.zero_points, slow.zero_points)


@pytest.mark.parametrize("act_order", [False, True])
def test_symmetric_weights_leave_out_zero_points(act_order):
    """Every zero at 2^(bits-1) is MatMulNBits' default: no zero_points input, same product."""
    qweight, scales, _, g_idx = _packed(4, 16, 64, 16, act_order)
    qzeros = pack_bits(torch.full((16, 4), 8), 4)
    layout = to_layout(qweight, scales, qzeros, g_idx, 4, 16, 64, torch.float32)
    assert layout.zero_points is None
    x = torch.randn(3, 64)
    want = _linear_wq_reference(x, qweight, scales, qzeros, g_idx, None, 4, 16, 64)
    got = _matmul_nbits_reference(
        x, layout.b, layout.scales, None, layout.perm, None, 4, layout.block_size, 64
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_block_sizes():
    assert block_size_for(32, 64) == 32 and block_size_for(256, 512) == 128
    assert block_size_for(576, 576) == 128  # per channel: blocks repeat the channel's scale
    assert block_size_for(48, 48) == 32 and block_size_for(12, 12) == 0


def _quantized(tmp_path, pipeline, name):
    model, inputs = demo_llama()
    compiled = peakc.compile(
        model,
        inputs,
        pipeline=pipeline,
        backend="ort",
        calibration_data=torch.randint(0, 256, (4, inputs[0].shape[1])),
    )
    return model, inputs, compiled, peakc.load(compiled.save(tmp_path / name))


@pytest.mark.parametrize(
    "spec,reordered",
    [
        ("method=rtn,bits=4,group_size=32", 0),
        ("method=gptq,bits=4,group_size=16,static_groups=false,nsamples=4", 14),
    ],
)
def test_quantized_model_uses_matmul_nbits(tmp_path, spec, reordered):
    check_matmul_nbits(tmp_path, spec, reordered)


def check_matmul_nbits(tmp_path, spec, reordered):
    """Every linear as MatMulNBits, parity and outputs against the linear_wq reference."""
    model, inputs, compiled, artifact = _quantized(tmp_path, f"quantize{{{spec}}},fuse", "q")
    ort = compiled.contents.report["ort"]
    assert ort["contrib_ops"]["MatMulNBits"] == 14  # 7 linears in each of 2 layers
    assert ort["matmul_nbits"] == {
        "rewritten": 14,
        "reordered_act_order": reordered,
        "not_rewritten": {},
    }
    assert compiled.contents.report["ops"]["linear_wq"] == "contrib/onnx (MatMulNBits)"
    assert ort["parity_rel_error"] < 1e-4
    nodes = onnx.load(str(artifact.directory / "forward.onnx")).graph.node
    mnb = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in mnb[0].attribute}["bits"] == 4
    want = compiled(*inputs)[0]  # peakc eager: the linear_wq reference op
    got = artifact(*inputs)[0]
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    return compiled, artifact


def test_symmetric_quantized_model_has_no_zero_points(tmp_path):
    spec = "method=rtn,bits=4,group_size=32,sym=true"
    compiled, artifact = check_matmul_nbits(tmp_path, spec, 0)
    nodes = onnx.load(str(artifact.directory / "forward.onnx")).graph.node
    mnb = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(mnb) == 14 and all(len(n.input) == 3 for n in mnb)


def test_three_bit_falls_back_with_a_reason(tmp_path):
    _, inputs, compiled, artifact = _quantized(
        tmp_path, "quantize{method=rtn,bits=3,group_size=32}", "q3"
    )
    ort = compiled.contents.report["ort"]
    assert "MatMulNBits" not in ort["contrib_ops"] and ort["matmul_nbits"]["rewritten"] == 0
    reasons = set(ort["matmul_nbits"]["not_rewritten"].values())
    assert len(ort["matmul_nbits"]["not_rewritten"]) == 14
    assert reasons == {
        "3-bit weights: MatMulNBits takes (2, 4, 8) bits here; exported as a float MatMul"
    }
    assert compiled.contents.report["ops"]["linear_wq"] == (
        "14 as float MatMul (dequantized at export)"
    )
    torch.testing.assert_close(artifact(*inputs)[0], compiled(*inputs)[0], rtol=1e-4, atol=1e-4)


def test_quantized_generation_matches_eager(tmp_path):
    source = load_source_for_task("demo:llama", "generate", 48, 2)
    spec = "quantize{method=rtn,bits=4,group_size=32},fuse"
    tokens = {}
    for backend in ("eager", "ort"):
        compiled = peakc.compile(
            source,
            pipeline=spec,
            backend=backend,
        )
        generator = Generator.from_artifact(peakc.load(compiled.save(tmp_path / backend)), "cpu")
        prompts = [[5, 17, 99, 3, 250, 7], [42, 8]]
        tokens[backend] = generator.generate(prompts, SamplingConfig(max_new_tokens=8)).tokens
    assert compiled.contents.report["ort"]["contrib_ops"]["MatMulNBits"] == 14
    assert tokens["ort"] == tokens["eager"]


def test_cuda_export_uses_shared_gqa_and_cuda_bit_widths(tmp_path):
    """The export for CUDA (checked here without a GPU: export and checker only) has
    attention_cache as GroupQueryAttention over shared buffers, as on the CPU, and makes 2-bit
    weights a float MatMul."""
    from peakc.backends.ort.export import export_onnx

    source = load_source_for_task("demo:llama", "generate", 32, 2)
    compiled = peakc.compile(
        source,
        pipeline="quantize{method=rtn,bits=2,group_size=32},fuse",
        parity=False,
    )
    cuda = export_onnx(compiled.graph, tmp_path / "cuda.onnx", "cuda")
    assert cuda.contrib_ops["GroupQueryAttention"] == 2 and len(cuda.shared_cache.buffers) == 4
    assert "MultiHeadAttention" not in cuda.contrib_ops and "MatMulNBits" not in cuda.contrib_ops
    assert len(cuda.matmul_nbits.not_rewritten) == 14
    cpu = export_onnx(compiled.graph, tmp_path / "cpu.onnx", "cpu")
    assert cpu.contrib_ops["GroupQueryAttention"] == 2 and cpu.contrib_ops["MatMulNBits"] == 14
