"""Dense linears at decode-sized M (`aten.linear`, `aten.mm`, `aten.addmm`) as the backend's own
op `peakc_triton::gemv`: cuBLAS by default, a Triton skinny GEMM where tuning measures it faster.

out [M, N] = x [M, K] @ Wᵀ (+ bias), W [N, K] (a linear's weight; `weight_kn`: a [K, N] matrix,
as mm and addmm take it, read through its transpose's strides). A program owns BLOCK_N output
columns of a BLOCK_M row tile and, with a K split, one part of K: each K step loads a [BLOCK_N,
BLOCK_K] weight tile along K (vectorized when K is W's unit-stride dim) and a [BLOCK_M, BLOCK_K]
x tile, and accumulates in fp32 either by broadcast products summed over K (few rows) or by
tl.dot (16 rows and more). Split parts are summed as linear_wq.py's "serial" reduction does: each
part stores fp32 partials, and the last part of a tile to arrive (linear_wq's arrival counters)
sums them, adds the bias and stores; one launch either way.

The launcher's first config is cuBLAS (`F.linear`, or `torch.mm`/`addmm` for the [K, N] form),
the default: with tune=false a program computes exactly what a "gemm" step would. With tune=true
(tuning.py) a Triton config is kept only for the shapes where it measured faster. The Triton
configs cover up to MAX_ROWS rows: beyond, a launcher refuses them (ValueError, which tuning
reads as "does not apply"). The lowering leaves the graph's nodes as they are, so the cost
model keeps pricing them as GEMMs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from peakc.backends.triton.kernels.linear_wq import _multiprocessors, arrival_counters
from peakc.backends.triton.kernels.operands import as_rows, dtype_reason, same_dtype_reason
from peakc.ir.ops import define_op, register_lowering

if TYPE_CHECKING:
    from torch import fx

BACKEND = "triton"
MAX_ROWS = 64  # the most rows x may have for the Triton configs

# kernel "cublas": the library GEMM. kernel "triton": gemv_kernel with [block_m, block_n] output
# tiles over K steps of block_k; split_k parts of K (0: enough programs for `waves` per
# multiprocessor); dot: tl.dot for the products of half inputs (block_m is then at least 16).
GEMV_CONFIGS = [
    {"kernel": "cublas"},
    {"kernel": "triton", "block_m": 1, "block_n": 16, "block_k": 256, "split_k": 0, "num_warps": 4},
    {"kernel": "triton", "block_m": 1, "block_n": 32, "block_k": 128, "split_k": 1, "num_warps": 4},
    {"kernel": "triton", "block_m": 1, "block_n": 64, "block_k": 128, "split_k": 0, "num_warps": 8},
    {"kernel": "triton", "block_m": 4, "block_n": 16, "block_k": 128, "split_k": 0, "num_warps": 4},
    {"kernel": "triton", "block_m": 16, "block_n": 64, "block_k": 64, "split_k": 0, "dot": True,
     "num_warps": 4},
    {"kernel": "triton", "block_m": 64, "block_n": 64, "block_k": 64, "split_k": 0, "dot": True,
     "num_warps": 4},
]  # fmt: skip
WAVES = 2.0  # programs per multiprocessor an automatic K split aims for


@triton.jit
def _products(x, w, acc, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x [BLOCK_M, BLOCK_K] @ w [BLOCK_N, BLOCK_K]ᵀ in fp32. UPCAST
    (the CPU interpreter, which would multiply bf16 bit patterns) gives tl.dot fp32 operands."""
    if DOT:
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, per_split, splits, stride_xm, stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
    UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Program (n, m, s): out[m-tile, n-tile] over K's part s, [s * per_split, (s + 1) *
    per_split). SPLIT: store fp32 partials [splits, M, N]; the tile's last part to arrive
    (count_ptr, zeroed, left zeroed) sums them into out (module docstring)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    first = pid_s * per_split
    last = tl.minimum(first + per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(first, last, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < last
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        acc = _products(x, w, acc, DOT, UPCAST)
    cell = offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tl.store(part_ptr + pid_s * M * N + cell, acc, mask=mask)
        tl.debug_barrier()  # every thread's partials written before the release below
        counter = count_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for split in range(0, splits):
                acc += tl.load(part_ptr + split * M * N + cell, mask=mask, other=0.0,
                               cache_modifier=".cg")  # fmt: skip
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + cell, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter, 0, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + cell, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- the op and its launcher ------------------------------------------------------------------


def _gemv_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_kn: bool
) -> torch.Tensor:
    """x @ Wᵀ + bias for a linear's weight W [N, K], or x @ W + bias for `weight_kn` W [K, N]
    (mm, addmm): the library GEMM the step ran before."""
    if not weight_kn:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


def _gemv_fake(x, weight, bias, weight_kn):
    return x.new_empty((*x.shape[:-1], weight.shape[1] if weight_kn else weight.shape[0]))


GEMV = define_op("gemv", _gemv_reference, _gemv_fake, backend=BACKEND)


def split_parts(k: int, block_k: int, split_k: int, programs: int, device: torch.device) -> int:
    """K's parts: split_k, or (0) enough for WAVES programs per multiprocessor; whole K steps
    per part and no empty part."""
    steps = triton.cdiv(k, block_k)
    want = split_k or round(WAVES * _multiprocessors(device) / programs)
    per_split = triton.cdiv(steps, max(1, min(steps, want)))
    return triton.cdiv(steps, per_split)


@register_lowering("gemv", BACKEND, label="triton/gemv")
def gemv(x, weight, bias, weight_kn, *, config=None):
    """peakc_triton::gemv: cuBLAS (the default config) or gemv_kernel, by `config`."""
    config = config or GEMV_CONFIGS[0]
    if config["kernel"] == "cublas":
        return _gemv_reference(x, weight, bias, weight_kn)
    w = weight.t() if weight_kn else weight  # [N, K] through strides
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = as_rows(x)
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"gemv: {m} rows exceed the Triton configs' {MAX_ROWS}")
    # fp32 on the GPU sums products without tl.dot (whose fp32 inputs would round to tf32)
    dot = bool(config.get("dot")) and not (x.dtype == torch.float32 and x.device.type == "cuda")
    block_m = min(config["block_m"], triton.next_power_of_2(m))
    block_m = max(block_m, 16) if dot else block_m
    block_n, block_k = config["block_n"], config["block_k"]
    tiles = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    splits = split_parts(k, block_k, config["split_k"], tiles[0] * tiles[1], x.device)
    per_split = triton.cdiv(triton.cdiv(k, block_k), splits) * block_k
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = splits > 1
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if split else out
    count = arrival_counters(x.device, tiles[0] * tiles[1]) if split else out
    upcast = x.device.type != "cuda"
    gemv_kernel[(*tiles, splits)](
        x2, w, bias if bias is not None else out, out, part, count,
        m, n, k, per_split, splits, x2.stride(0), w.stride(0), w.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot, UPCAST=upcast,
        HAS_BIAS=bias is not None, SPLIT=split, num_warps=config["num_warps"],
    )  # fmt: skip
    return out.view(*lead, n)


gemv.kernels = (gemv_kernel, _products)
gemv.configs = GEMV_CONFIGS


# --- which GEMM nodes it takes ----------------------------------------------------------------

GEMM_TARGETS = ("aten.linear.default", "aten.mm.default", "aten.addmm.default")


def gemv_arguments(node: fx.Node) -> list[Any]:
    """A GEMM node's operands as the op's arguments: [x, weight, bias, weight_kn] (FX nodes or
    None); `why_not_gemv` must have accepted the node."""
    target = str(node.target)
    if target == "aten.linear.default":
        x, weight, *rest = node.args
        return [x, weight, rest[0] if rest else node.kwargs.get("bias"), False]
    if target == "aten.mm.default":
        return [node.args[0], node.args[1], None, True]
    bias, x, weight = node.args[:3]
    return [x, weight, bias, True]


def why_not_gemv(node: fx.Node, dynamic: bool) -> str | None:
    """Why a GEMM node stays a plain cuBLAS step: not one of GEMM_TARGETS in the forms above
    (addmm with beta or alpha, or a bias that is not [N]), non-float or mixed dtypes, or (in a
    program with static shapes) more than MAX_ROWS rows. A program with `dynamic` dims runs
    other row counts than its example's, so its rows are judged per call (module docstring)."""
    target = str(node.target)
    if target not in GEMM_TARGETS:
        return f"{target} is not a dense GEMM"
    if target == "aten.addmm.default" and (len(node.args) > 3 or node.kwargs):
        return "addmm with beta or alpha"
    x, weight, bias, weight_kn = (
        a.meta.get("val") if hasattr(a, "meta") else a for a in gemv_arguments(node)
    )
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias)):
        reason = dtype_reason(name, tensor) if tensor is not None or name != "bias" else None
        if reason:
            return reason
    reason = same_dtype_reason("x, weight and bias", x, weight, bias)
    if reason:
        return reason
    if weight.dim() != 2 or x.dim() < 1:
        return "weight is not a matrix"
    columns = weight.shape[1 if weight_kn else 0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != columns):
        return "bias is not one value per output column"
    rows = x.numel() // max(1, x.shape[-1])
    if not dynamic and rows > MAX_ROWS:
        return f"x has {rows} rows (> {MAX_ROWS}): cuBLAS"
    return None
