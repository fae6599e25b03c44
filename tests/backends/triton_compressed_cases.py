"""The low-bit and 2:4 linear kernels against their ops' references, run as a script under
TRITON_INTERPRET=1 (the interpreter must be chosen before kernels are decorated, so the tests
run this once in a fresh process: tests/backends/conftest.py). Prints one JSON line:
{"linear_wq": [...], "sparse24": [...], "lowering": [...]} (each case with its relative error)
and the case tables.
"""

import json

import torch

from peakc.backends.triton.kernels import compressed_linear as lowering
from peakc.backends.triton.kernels.linear_wq import (
    KernelConfig,
    choose_config,
    linear_wq_triton,
    repack_linear_wq,
)
from peakc.backends.triton.kernels.sparse24 import (
    Sparse24Config,
    choose_sparse24_config,
    linear_sparse24_triton,
    repack_sparse24,
    repack_sparse24_wq,
)
from peakc.ir.ops import (
    _linear_sparse24_reference,
    _linear_sparse24_wq_reference,
    _linear_wq_reference,
    compress_sparse24,
    pack_bits,
)

ROWS = [1, 3, 17, 64]
# linear_wq layouts: (bits, group_size, act_order, sym, N, K); per channel is group_size == K
WQ_LAYOUTS = [
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
# per M, a configuration beside the M bucket's own: every kernel, reduction and dequantization
# (corrected sums, or in registers: affine)
WQ_OTHER = {
    1: KernelConfig("fused", 8, 32, split_k=2, reduction="partials", affine=True),
    3: KernelConfig("fused", 16, 32, split_k=2, reduction="atomic"),
    17: KernelConfig("dequant", 1, 32),
    64: KernelConfig("fused", 32, 64, split_k=3, affine=True),
}
# 2:4 layouts: (bits: 0 float, group_size: dense columns, 0 per channel; sym, N, K)
SPARSE_LAYOUTS = [(0, 0, False, 40, 100), (4, 32, False, 48, 128), (4, 64, True, 40, 200),
                  (4, 0, False, 24, 96), (8, 32, True, 40, 160)]  # fmt: skip
SPARSE_OTHER = {
    1: Sparse24Config(1, 32, 64, split_k=2),
    3: Sparse24Config(16, 32, 64, kernel="dense"),
    17: Sparse24Config(16, 32, 64, split_k=2),
    64: Sparse24Config(32, 64, 128),
}


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def codes(gen, bits, n, k, groups, sym):
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    if sym:
        z = torch.full((n, groups), 2 ** (bits - 1))
    else:
        z = torch.randint(0, 2**bits, (n, groups), generator=gen)
    return q, z


def linear_wq_cases() -> list[dict]:
    out = []
    for i, (bits, gs, act_order, sym, n, k) in enumerate(WQ_LAYOUTS):
        gen = torch.Generator().manual_seed(i)
        groups = -(-k // gs)
        q, z = codes(gen, bits, n, k, groups, sym)
        g_idx = None
        if act_order:
            g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).to(torch.int32)
        for j, m in enumerate(ROWS):
            dtype = (torch.float16, torch.bfloat16)[(i + j) % 2]
            s = (torch.rand(n, groups, generator=gen) * 0.02 + 0.002).to(dtype)
            args = (pack_bits(q, bits), s, pack_bits(z, bits), g_idx)
            packed = repack_linear_wq(*args, bits, gs, k)
            x = torch.randn(m, k, generator=gen).to(dtype)
            bias = torch.randn(n, generator=gen).to(dtype) if j % 2 else None
            ref_bias = None if bias is None else bias.float()
            ref = _linear_wq_reference(x.float(), *args, ref_bias, bits, gs, k)
            for config in (choose_config(m, packed), WQ_OTHER[m]):
                y = linear_wq_triton(x, packed, bias, config)
                out.append(dict(layout=i, m=m, dtype=str(dtype), kernel=config.kernel,
                                reduction=config.reduction, affine=config.affine,
                                err=relative_error(y, ref), shape=list(y.shape),
                                out_dtype=str(y.dtype)))  # fmt: skip
    return out


def counter_state() -> dict:
    """The serial reduction's arrival counters after the linear_wq cases: kept per device and
    left zeroed by the kernel (so one buffer serves every launch)."""
    from peakc.backends.triton.kernels.linear_wq import _COUNTERS

    return dict(devices=len(_COUNTERS), nonzero=sum(int(b.count_nonzero()) for b in
                                                    _COUNTERS.values()))  # fmt: skip


def sparse_weight(gen, n, k) -> torch.Tensor:
    """A random 2:4 weight, one row with a group of fewer than two nonzeros."""
    w = torch.randn(n, k, generator=gen)
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    w = w * mask.view(n, k)
    w[0, :4] = 0.0
    return w


def sparse_cases() -> list[dict]:
    out = []
    for i, (bits, gs, sym, n, k) in enumerate(SPARSE_LAYOUTS):
        gen = torch.Generator().manual_seed(100 + i)
        values, meta = compress_sparse24(sparse_weight(gen, n, k))
        group = gs or k  # dense columns per group
        for j, m in enumerate(ROWS):
            dtype = (torch.float16, torch.bfloat16)[(i + j) % 2]
            x = torch.randn(m, k, generator=gen).to(dtype)
            bias = torch.randn(n, generator=gen).to(dtype) if j % 2 else None
            ref_bias = None if bias is None else bias.float()
            if bits == 0:
                vals = values.to(dtype)
                packed = repack_sparse24(vals, meta, k)
                ref = _linear_sparse24_reference(x.float(), vals.float(), meta, ref_bias, k)
            else:
                groups = -(-(k // 2) // (group // 2))
                q, z = codes(gen, bits, n, k // 2, groups, sym)
                s = (torch.rand(n, groups, generator=gen) * 0.02 + 0.002).to(dtype)
                args = (pack_bits(q, bits), s, pack_bits(z, bits), meta)
                packed = repack_sparse24_wq(*args, bits, group, k)
                ref = _linear_sparse24_wq_reference(x.float(), *args, ref_bias, bits, group, k)
            for config in (choose_sparse24_config(m, packed), SPARSE_OTHER[m]):
                y = linear_sparse24_triton(x, packed, bias, config)
                out.append(dict(layout=i, m=m, dtype=str(dtype), kernel=config.kernel,
                                block_m=config.block_m, err=relative_error(y, ref),
                                shape=list(y.shape), out_dtype=str(y.dtype)))  # fmt: skip
    return out


def lowering_cases() -> list[dict]:
    """The backend ops' launchers (the emit lowerings, with a config from fn.configs) against
    the backend ops' references, on repacked operands."""
    gen = torch.Generator().manual_seed(7)
    q, z = codes(gen, 4, 40, 128, 4, False)
    s = (torch.rand(40, 4, generator=gen) * 0.02).to(torch.bfloat16)
    packed = repack_linear_wq(pack_bits(q, 4), s, pack_bits(z, 4), None, 4, 32, 128)
    wq_args = (packed.qweight, packed.scales, packed.zeros, None, None, 4, 32, 128)
    values, meta = compress_sparse24(sparse_weight(gen, 40, 128))
    sp = repack_sparse24(values.to(torch.bfloat16), meta, 128)
    sp_args = (sp.values, sp.meta, sp.values, sp.values, None, 0, 1, 128)
    out = []
    for name, launch, reference, args in (
        ("linear_wq", lowering.launch_linear_wq, lowering._linear_wq_repacked_reference,
         wq_args),
        ("linear_sparse24", lowering.launch_linear_sparse24,
         lowering._linear_sparse24_repacked_reference, sp_args),
    ):  # fmt: skip
        for m, config in zip((1, 17), launch.configs):
            x = torch.randn(m, 128, generator=gen).to(torch.bfloat16)
            ref = reference(x.float(), *args)
            y = launch(x, *args, config=config)
            out.append(dict(op=name, m=m, config=config, err=relative_error(y, ref)))
    return out


def eager_cases() -> list[dict]:
    """The ops' CUDA implementations (what eager programs run on a GPU) called directly on
    peakc-layout weights: repacked on first use, cached per weight tensor."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 128, generator=gen).to(torch.float16)
    q, z = codes(gen, 4, 40, 128, 4, False)
    s = (torch.rand(40, 4, generator=gen) * 0.02).to(torch.float16)
    wq_args = (pack_bits(q, 4), s, pack_bits(z, 4), None, None, 4, 32, 128)
    values, meta = compress_sparse24(sparse_weight(gen, 40, 128))
    values = values.to(torch.float16)
    qv, zv = codes(gen, 8, 40, 64, 1, True)
    sv = (torch.rand(40, 1, generator=gen) * 0.02).to(torch.float16)
    sq_args = (pack_bits(qv, 8), sv, pack_bits(zv, 8), meta, None, 8, 128, 128)
    out = []
    for name, fn, reference, args in (
        ("linear_wq", lowering._cuda_linear_wq, _linear_wq_reference, wq_args),
        ("linear_sparse24", lowering._cuda_linear_sparse24, _linear_sparse24_reference,
         (values, meta, None, 128)),
        ("linear_sparse24_wq", lowering._cuda_linear_sparse24_wq, _linear_sparse24_wq_reference,
         sq_args),
    ):  # fmt: skip
        ref = reference(x.float(), *args)
        first = fn(x, *args)
        cached = len(lowering._REPACKED)
        again = fn(x, *args)
        out.append(dict(op=name, err=relative_error(first, ref), same=torch.equal(first, again),
                        cached=cached == len(lowering._REPACKED)))  # fmt: skip
    return out


if __name__ == "__main__":
    results = {
        "rows": ROWS,
        "wq_layouts": WQ_LAYOUTS,
        "sparse_layouts": SPARSE_LAYOUTS,
        "linear_wq": linear_wq_cases(),
        "wq_counters": counter_state(),
        "sparse24": sparse_cases(),
        "lowering": lowering_cases(),
        "eager": eager_cases(),
    }
    print(json.dumps(results))
