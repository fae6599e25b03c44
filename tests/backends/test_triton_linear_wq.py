"""The Triton linear_wq kernels against the op's reference, on CPU under TRITON_INTERPRET=1;
the repack's round trip and its refusals in this process.

TRITON_INTERPRET must be set before a kernel is decorated, so the kernel comparisons run in a
fresh interpreter (one subprocess for all cases) and report errors; this process only asserts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peakc.errors import PeakcError
from peakc.ir.ops import dequantize_weight, pack_bits

pytest.importorskip("triton")

from peakc.backends.triton.kernels.linear_wq import (  # noqa: E402
    dequantize_repacked,
    repack_linear_wq,
    unpack_linear_wq,
)

ROOT = Path(__file__).resolve().parents[2]

# layout: (bits, group_size, act_order, sym, N, K); per channel is group_size == K.
LAYOUTS = [
    (4, 32, False, False, 48, 128),
    (4, 64, False, True, 72, 128),
    (4, 128, False, False, 48, 128),
    (4, 96, False, True, 72, 96),  # per channel, K padded to 128
    (4, 32, True, False, 48, 80),  # act-order, partial last group
    (8, 32, False, True, 72, 128),
    (8, 64, False, False, 48, 128),
    (8, 128, False, True, 48, 128),
    (8, 96, False, False, 48, 96),  # per channel
    (8, 32, True, True, 72, 96),  # act-order
]
ROWS = [1, 3, 17, 64]
# per M: an explicit configuration beside the M bucket's own (other kernel, reduction or tile);
# block_k per bits: tl.dot needs 16 word rows (128 4-bit or 64 8-bit columns)
OTHER_CONFIG = {
    1: dict(kernel="splitk", block_m=1, block_n=32, block_k={4: 64, 8: 32}, split_k=2,
            reduction="atomic"),
    3: dict(kernel="gemm", block_m=16, block_n=32, block_k={4: 128, 8: 64}),
    17: dict(kernel="splitk", block_m=32, block_n=64, block_k={4: 256, 8: 128}, split_k=3),
    64: dict(kernel="gemm", block_m=64, block_n=32, block_k={4: 256, 8: 64}),
}  # fmt: skip

COMPARE = """
import json, sys, torch
from peakc.ir.ops import _linear_wq_reference, pack_bits
from peakc.backends.triton.kernels.linear_wq import (
    KernelConfig, choose_config, linear_wq_triton, repack_linear_wq)

layouts, rows, others = json.loads(sys.argv[1])
out = []
for i, (bits, gs, act_order, sym, n, k) in enumerate(layouts):
    gen = torch.Generator().manual_seed(i)
    groups = -(-k // gs)
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    if sym:
        z = torch.full((n, groups), 2 ** (bits - 1))
    else:
        z = torch.randint(0, 2**bits, (n, groups), generator=gen)
    g_idx = None
    if act_order:
        g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).to(torch.int32)
    for j, m in enumerate(rows):
        dtype = (torch.float16, torch.bfloat16)[(i + j) % 2]
        s = (torch.rand(n, groups, generator=gen) * 0.02 + 0.002).to(dtype)
        args = (pack_bits(q, bits), s, pack_bits(z, bits), g_idx)
        packed = repack_linear_wq(*args, bits, gs, k)
        x = torch.randn(m, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype) if j % 2 else None
        ref_bias = None if bias is None else bias.float()
        ref = _linear_wq_reference(x.float(), *args, ref_bias, bits, gs, k)
        other = dict(others[str(m)], block_k=others[str(m)]['block_k'][str(bits)])
        for config in (choose_config(m, packed), KernelConfig(**other)):
            y = linear_wq_triton(x, packed, bias, config)
            err = float((y.float() - ref).norm() / ref.norm())
            out.append(dict(layout=i, m=m, dtype=str(dtype), kernel=config.kernel,
                            reduction=config.reduction, err=err, shape=list(y.shape),
                            out_dtype=str(y.dtype)))
print(json.dumps(out))
"""


def test_kernels_match_the_reference():
    """Every layout x M = 1, 3, 17, 64, both the M bucket's kernel and another; fp16 and bf16
    alternate. bf16 tolerates more: the interpreter truncates float32 to bf16 (the GPU rounds
    to nearest), and bf16 outputs carry their own rounding."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    arg = json.dumps([LAYOUTS, ROWS, OTHER_CONFIG])
    proc = subprocess.run(
        [sys.executable, "-c", COMPARE, arg], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(LAYOUTS) * len(ROWS)
    assert {r["kernel"] for r in results} == {"splitk", "gemm"}
    assert {r["reduction"] for r in results} == {"partials", "atomic"}
    for r in results:
        bits, gs, act_order, sym, n, k = LAYOUTS[r["layout"]]
        assert r["shape"] == [r["m"], n] and r["out_dtype"] == r["dtype"], r
        limit = 2e-3 if r["dtype"] == "torch.float16" else 1.5e-2
        assert r["err"] < limit, (LAYOUTS[r["layout"]], r)


def _random_layer(bits, gs, n, k, act_order, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // gs)
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    z = torch.randint(0, 2**bits, (n, groups), generator=gen)
    s = torch.rand(n, groups, generator=gen).to(torch.bfloat16)
    g_idx = None
    if act_order:
        g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).to(torch.int32)
    return pack_bits(q, bits), s, pack_bits(z, bits), g_idx


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "gs, k, act_order", [(32, 128, False), (128, 256, False), (40, 40, False), (16, 72, True)]
)
def test_repack_round_trips(bits, gs, k, act_order):
    args = _random_layer(bits, gs, 24, k, act_order)
    packed = repack_linear_wq(*args, bits, gs, k)
    assert packed.k_padded % packed.group == 0 and packed.k_padded >= k
    assert packed.qweight.shape == (packed.k_padded * bits // 32, 24)
    assert (packed.perm is not None) == act_order
    assert all(t.is_contiguous() for t in (packed.qweight, packed.scales, packed.zeros))
    qweight, scales, qzeros, g_idx = unpack_linear_wq(packed)
    assert torch.equal(qweight, args[0]) and torch.equal(scales, args[1])
    assert torch.equal(qzeros, args[2])
    if act_order:
        assert torch.equal(g_idx, args[3])
    expected = dequantize_weight(*args, bits, gs, k)
    assert torch.equal(dequantize_repacked(packed), expected)


def test_repack_takes_gptq_act_order_output():
    """A real GPTQ layer (act-order, dynamic groups) repacks and round trips."""
    from peakc.passes.quantize.gptq import gptq_quantize
    from peakc.passes.quantize.grid import GridSpec
    from peakc.passes.quantize.rewrite import pack_layer

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=gen)
    x = torch.randn(128, 64, generator=gen) * torch.linspace(0.2, 3.0, 64)
    spec = GridSpec(4, 16, False)
    q = gptq_quantize(w, 2 * x.T @ x / 128, spec, act_order=True, static_groups=False)
    layer = pack_layer(q, 4, 16, torch.float16)
    args = (layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4, 16, 64)
    packed = repack_linear_wq(*args)
    assert packed.perm is not None
    assert torch.equal(dequantize_repacked(packed), dequantize_weight(*args))


def test_repack_refuses_uncovered_layouts():
    args = _random_layer(4, 32, 8, 64, False)
    with pytest.raises(PeakcError, match="layers.0.q: 3-bit"):
        repack_linear_wq(*args, 3, 32, 64, name="layers.0.q")
    uneven = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)
    with pytest.raises(PeakcError, match="not 32 columns each"):
        repack_linear_wq(args[0], args[1], args[2], uneven, 4, 32, 64)
    args = _random_layer(4, 24, 8, 48, False)
    with pytest.raises(PeakcError, match="group size 24"):
        repack_linear_wq(*args, 4, 24, 48)
