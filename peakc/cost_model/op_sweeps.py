"""Per-op-class micro-benchmarks: elementwise, reductions, softmax, norms, gathers, attention.

Each case is one eager op at one shape; its bytes (inputs read once, output written once)
and FLOPs come from the same formulas the estimate uses, so a fitted efficiency curve maps
the estimate's nominal bytes to measured time. Shapes here are deliberately NOT the shapes
of the accuracy benchmark's test ops or models (other hidden sizes, head counts, token
counts), so the benchmark's rows are out of sample for these curves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peakc.cost_model.op_costs import lane_padding
from peakc.cost_model.timing import copies_for, count_kernels, device_seconds

Spec = tuple[tuple[int, ...], str]  # (shape, dtype name)
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int64": torch.int64,
}


@dataclass
class OpSample:
    """One measured op: its class, nominal bytes and FLOPs, kernels, and device seconds."""

    op_class: str  # hardware.OP_CLASSES, or "attention_prefill" (fits the FLOP curve)
    label: str
    bytes: float
    flops: float
    kernels: int
    seconds: float
    padding: float = 1.0  # op_costs.lane_padding of a row-wise kernel (softmax)


@dataclass
class OpCase:
    op_class: str
    label: str
    inputs: list[Spec]
    fn: Callable[..., torch.Tensor]
    flops: float = 0.0
    padding: float = 1.0
    nbytes: float = 0.0  # bytes as the estimate counts them, where inputs are read in part


def _sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


def _rms_norm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6)


def _embedding(ids, table):
    return F.embedding(ids, table)


def _neg_half(x):
    return -x[..., x.shape[-1] // 2 :]


def _cat_halves(x, a):
    return torch.cat((a, x[..., : x.shape[-1] // 2]), dim=-1)


def _add_transposed(x, y):
    return x.transpose(1, 2) + y


def strided_cases(shapes: list[tuple[int, int, int]]) -> list[OpCase]:
    """Rotate-half-like ops on (1, heads, seq, head_dim) bf16: a broadcast multiply, a neg of a
    half slice, a cat of a contiguous half with a sliced half, an add of a transposed view."""
    cases = []
    for h, s, d in shapes:
        x, half = ((1, h, s, d), "bf16"), ((1, h, s, d // 2), "bf16")
        n = h * s * d
        cases += [
            OpCase(
                "strided", f"mul bf16 bcast h={h} s={s} d={d}", [x, ((s, d), "bf16")], torch.mul
            ),
            OpCase(
                "strided", f"neg bf16 half-slice h={h} s={s} d={d}", [x], _neg_half, nbytes=2.0 * n
            ),
            OpCase(
                "strided",
                f"cat bf16 halves h={h} s={s} d={d}",
                [x, half],
                _cat_halves,
                nbytes=4.0 * n,
            ),
            OpCase(
                "strided",
                f"add bf16 transposed h={h} s={s} d={d}",
                [((1, s, h, d), "bf16"), x],
                _add_transposed,
            ),
        ]
    return cases


def softmax_cases(widths: list[int], rows: list[int], dtype: str) -> list[OpCase]:
    """Softmax over the last dim at several row widths, each at several row counts, so that
    bytes and row width vary apart (its speed depends on both)."""
    return [
        OpCase(
            "softmax",
            f"softmax {dtype} {r}x{w}",
            [((r, w), dtype)],
            lambda x: torch.softmax(x, -1),
            padding=lane_padding(w),
        )
        for w in widths
        for r in rows
    ]


def op_cases(scale: str) -> list[OpCase]:
    """The cases of a sweep: scale is "tiny" (tests), "cpu", "quick" or "full" (GPU)."""
    if scale == "tiny":
        rows, widths, attn, decode = [2, 64], [96], [(2, 48, 16)], [(1, 2, 2, 80, 16)]
        soft, soft_rows, vocab = [24, 40], [8, 96], [(300, 48, 40)]
        rope = [(2, 24, 16)]
    elif scale == "cpu":
        rows, widths, attn, decode = [3, 300], [384, 1000], [(6, 192, 64)], [(1, 6, 2, 500, 64)]
        soft, soft_rows, vocab = [96, 384], [64, 1500], [(5000, 384, 200)]
        rope = [(6, 300, 64)]
    else:
        rows = [3, 96, 1000, 6000] + ([20000] if scale == "full" else [])
        widths = [1024, 3072, 5120]
        attn = [
            (16, 384, 128),
            (16, 1536, 128),
            (12, 1000, 64),
            (12, 3000, 64),
            (24, 768, 128),
            (16, 3072, 128),
            (40, 2560, 128),
            (8, 6144, 128),
            (16, 4096, 64),
        ]
        decode = [
            (1, 16, 16, 768, 128),
            (1, 16, 16, 6000, 128),
            (4, 16, 16, 1536, 128),
            (1, 24, 8, 2500, 128),
            (1, 12, 4, 700, 64),
            (2, 16, 4, 12000, 64),
            (8, 16, 16, 3000, 128),
            (16, 8, 8, 5000, 128),
        ]
        soft, soft_rows = [200, 384, 1024, 1536, 2560, 3072, 4096], [300, 5000, 40000]
        vocab = [(50000, 1024, 700), (100000, 768, 6000), (50000, 1024, 3)]
        rope = [
            (12, 64, 64),
            (12, 700, 64),
            (12, 6000, 64),
            (24, 300, 128),
            (24, 3000, 128),
            (40, 1500, 96),
            (8, 20000, 128),
        ]
        if scale == "quick":
            attn, decode, widths, soft, rope = (
                attn[::2],
                decode[::2],
                widths[::2],
                soft[::2],
                rope[::2],
            )
    cases: list[OpCase] = []
    for w in widths:
        for r in rows:
            cases.append(
                OpCase("elementwise", f"add bf16 {r}x{w}", [((r, w), "bf16")] * 2, torch.add)
            )
            cases.append(
                OpCase("elementwise", f"silu bf16 {r}x{w + 8}", [((r, w + 8), "bf16")], F.silu)
            )
            cases.append(
                OpCase(
                    "strided",
                    f"mul fp32 {r}x{w} bcast",
                    [((r, w), "fp32"), ((w,), "fp32")],
                    torch.mul,
                )
            )
            cases.append(
                OpCase(
                    "reduction",
                    f"mean fp32 {r}x{w}",
                    [((r, w), "fp32")],
                    lambda x: x.mean(-1, keepdim=True),
                )
            )
            cases.append(
                OpCase(
                    "norm", f"rms_norm bf16 {r}x{w}", [((r, w), "bf16"), ((w,), "bf16")], _rms_norm
                )
            )
    cases += softmax_cases(soft, soft_rows, "bf16")
    if scale in ("tiny", "cpu"):
        cases += softmax_cases([s + 40 for s in soft], soft_rows[-1:], "fp32")
    cases += strided_cases(rope)
    for n, d, tokens in vocab:
        cases.append(
            OpCase(
                "gather",
                f"embedding {n}x{d} ids={tokens}",
                [((1, tokens), "int64"), ((n, d), "bf16")],
                _embedding,
            )
        )
    dt = "fp32" if scale in ("tiny", "cpu") else "bf16"
    for h, s, d in attn:
        flops = 2.0 * h * s * (s + 1) / 2 * 2 * d
        cases.append(
            OpCase(
                "attention_prefill",
                f"sdpa causal h={h} s={s} d={d}",
                [((1, h, s, d), dt)] * 3,
                _sdpa_causal,
                flops,
            )
        )
    for b, hq, hkv, ctx, d in decode:
        cases.append(
            OpCase(
                "attention",
                f"sdpa decode b={b} h={hq}/{hkv} ctx={ctx} d={d}",
                [((b, hq, 1, d), dt), ((b, hkv, ctx, d), dt), ((b, hkv, ctx, d), dt)],
                _sdpa_gqa,
                2.0 * b * hq * ctx * 2 * d,
            )
        )
    return cases


def _make(spec: Spec, device: str, n: int) -> torch.Tensor:
    shape, dtype = spec
    if dtype == "int64":
        return torch.randint(0, n, shape, device=device)
    return torch.randn(shape, device=device, dtype=DTYPES[dtype])


def case_bytes(case: OpCase) -> float:
    """Bytes as the estimate's rule counts them (inputs once, output once; a gather reads
    only the rows it copies), from a meta-device run."""
    if case.nbytes:
        return case.nbytes
    vocab = case.inputs[-1][0][0]
    metas = [_make(s, "meta", vocab) for s in case.inputs]
    out = case.fn(*metas)
    out_bytes = out.numel() * out.element_size()
    if case.op_class == "gather":
        return float(2 * out_bytes + metas[0].numel() * metas[0].element_size())
    return float(sum(t.numel() * t.element_size() for t in metas) + out_bytes)


def measure_op_classes(
    cases: list[OpCase], device: str, target: float, step: Callable[[], None]
) -> list[OpSample]:
    """Device seconds of every case, inputs rotated among copies larger than the cache."""
    samples = []
    kernels_of: dict[str, int] = {}
    for case in cases:
        moved = case_bytes(case)
        vocab = case.inputs[-1][0][0]
        sets = [
            [_make(s, device, vocab) for s in case.inputs]
            for _ in range(copies_for(moved) if device == "cuda" else 1)
        ]
        calls = [lambda xs=xs, fn=case.fn: fn(*xs) for xs in sets]
        kind = case.label.split(" ")[0] + " " + case.op_class
        if kind not in kernels_of:
            kernels_of[kind] = max(round(count_kernels(calls[0])), 1) if device == "cuda" else 1
        seconds = device_seconds(calls, device, target)
        samples.append(
            OpSample(
                case.op_class,
                case.label,
                moved,
                case.flops,
                kernels_of[kind],
                seconds,
                case.padding,
            )
        )
        step()
    return samples


def measure_kernel_gap(device: str) -> float:
    """Device seconds per near-empty kernel replayed back to back (a CUDA graph of adds)."""
    if device != "cuda":
        return 1e-7  # no device-side launch: a CPU pays its per-op cost on the host
    x = torch.zeros(1, device=device)
    return device_seconds([lambda: x.add_(1.0)], device, 1e-3, repeats=5)


def count_eager_kernels(device: str) -> dict[str, int]:
    """Kernels eager PyTorch launches for single nodes whose count may not be one."""
    if device != "cuda":
        return {}
    x = torch.randn(1, 256, 1024, device=device, dtype=torch.bfloat16)
    w = torch.ones(1024, device=device, dtype=torch.bfloat16)
    q = torch.randn(1, 8, 256, 64, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 256, 64, device=device, dtype=torch.bfloat16)
    cases = {
        "aten.rms_norm": lambda: _rms_norm(x, w),
        "aten.layer_norm": lambda: F.layer_norm(x, (1024,), w, w),
        "aten.scaled_dot_product_attention": lambda: _sdpa_gqa(q[:, :, :1], kv, kv),
        "aten._softmax": lambda: torch.softmax(x, -1),
    }
    return {name: max(round(count_kernels(fn)), 1) for name, fn in cases.items()}
