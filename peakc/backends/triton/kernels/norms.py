"""RMSNorm and LayerNorm, plain and with the residual add fused (`peakc::rms_norm`,
`skip_rms_norm`, `layer_norm`, `skip_layer_norm`), as Triton lowerings.

One program normalizes one row with fp32 statistics. A row that fits `max_block` elements is
read once into registers (the common case: hidden sizes up to 16384); a longer one is walked
in chunks, re-reading its inputs rather than its own stores. Rounding follows the references:
RMSNorm rounds the normalized row to the output dtype before scaling (Llama's order), LayerNorm
applies weight and bias in fp32 and rounds once (ATen's), and the residual sum is rounded to
its dtype before it is normalized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from peakc.backends.triton.kernels.operands import (
    as_rows,
    dtype_reason,
    finish_rows,
    node_arguments,
    rows_output,
    same_dtype_reason,
)
from peakc.ir.ops import register_lowering

if TYPE_CHECKING:
    from torch import fx

# max_block: the longest row held in registers; num_warps: threads per row.
NORM_CONFIGS = [
    {"max_block": 16384, "num_warps": 8},
    {"max_block": 16384, "num_warps": 4},
    {"max_block": 16384, "num_warps": 16},
    {"max_block": 4096, "num_warps": 8},
]


@triton.jit
def _residual(x_ptr, skip_ptr, total_ptr, cols, mask, HAS_SKIP: tl.constexpr, STORE: tl.constexpr):
    """A chunk of the row in fp32: x, or x + skip rounded to the sum's dtype (stored if asked)."""
    value = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SKIP:
        value += tl.load(skip_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        value = value.to(total_ptr.dtype.element_ty)
        if STORE:
            tl.store(total_ptr + cols, value, mask=mask)
        value = value.to(tl.float32)
    return value


@triton.jit
def _normalized(
    value, mean, rstd, w_ptr, b_ptr, cols, mask, out_dtype,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """A chunk of the output: (value - mean) * rstd scaled as the reference orders it."""
    y = (value - mean) * rstd
    if RMS:
        y = y.to(out_dtype).to(tl.float32)
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return y.to(out_dtype)


@triton.jit
def norm_row_kernel(
    x_ptr, skip_ptr, w_ptr, b_ptr, out_ptr, total_ptr,
    x_row, skip_row, out_row, total_row, width, eps,
    RMS: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    """One row: statistics in fp32, then the normalized, scaled row (and the residual sum)."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * x_row
    skip_ptr += row * skip_row
    out_ptr += row * out_row
    total_ptr += row * total_row
    out_dtype = out_ptr.dtype.element_ty
    offsets = tl.arange(0, BLOCK)
    if SINGLE:
        mask = offsets < width
        value = _residual(x_ptr, skip_ptr, total_ptr, offsets, mask, HAS_SKIP, True)
        mean = 0.0
        if not RMS:
            mean = tl.sum(value, axis=0) / width
        centered = tl.where(mask, value - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / width + eps)
        y = _normalized(value, mean, rstd, w_ptr, b_ptr, offsets, mask, out_dtype,
                        RMS, HAS_WEIGHT, HAS_BIAS)  # fmt: skip
        tl.store(out_ptr + offsets, y, mask=mask)
    else:
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + offsets
            mask = cols < width
            total += _residual(x_ptr, skip_ptr, total_ptr, cols, mask, HAS_SKIP, True)
        mean = 0.0
        if not RMS:
            mean = tl.sum(total, axis=0) / width
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + offsets
            mask = cols < width
            value = _residual(x_ptr, skip_ptr, total_ptr, cols, mask, HAS_SKIP, False)
            centered = tl.where(mask, value - mean, 0.0)
            squares += centered * centered
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / width + eps)
        for start in range(0, width, BLOCK):
            cols = start + offsets
            mask = cols < width
            value = _residual(x_ptr, skip_ptr, total_ptr, cols, mask, HAS_SKIP, False)
            y = _normalized(value, mean, rstd, w_ptr, b_ptr, cols, mask, out_dtype,
                            RMS, HAS_WEIGHT, HAS_BIAS)  # fmt: skip
            tl.store(out_ptr + cols, y, mask=mask)


def _launch_norm(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    rms: bool,
    config: dict | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the row kernel over x's rows: (normalized, residual sum or None), laid out like x."""
    config = config or NORM_CONFIGS[0]
    width = x.shape[-1]
    x_rows = as_rows(x)
    skip_rows = as_rows(skip) if skip is not None else x_rows
    out, out_rows = rows_output(x, out_dtype)
    total, total_rows = rows_output(x, x.dtype) if skip is not None else (None, out_rows)
    block = min(triton.next_power_of_2(width), config["max_block"])
    norm_row_kernel[(x_rows.shape[0],)](
        x_rows, skip_rows, weight if weight is not None else x_rows,
        bias if bias is not None else x_rows, out_rows, total_rows,
        x_rows.stride(0), skip_rows.stride(0), out_rows.stride(0), total_rows.stride(0),
        width, eps,
        RMS=rms, HAS_SKIP=skip is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BLOCK=block, SINGLE=block >= width,
        num_warps=config["num_warps"],
    )  # fmt: skip
    finish_rows(out, out_rows)
    return out, (finish_rows(total, total_rows) if total is not None else None)


def _row_operands_reason(x, skip, weight, bias, eps) -> str | None:
    """Why a norm node is not one the row kernel covers (dtypes, [D] weights, a number eps)."""
    reason = dtype_reason("x", x)
    if reason is None and skip is not None and (skip.shape != x.shape or skip.dtype != x.dtype):
        reason = "skip differs from x in shape or dtype"
    for name, param in (("weight", weight), ("bias", bias)):
        if reason is None and param is not None:
            reason = dtype_reason(name, param)
            if reason is None and tuple(param.shape) != (x.shape[-1],):
                reason = f"{name} is not [{x.shape[-1]}]"
    if reason is None and not isinstance(eps, (int, float)):
        reason = "eps is not a constant"
    return reason


def why_not_rms_norm(node: fx.Node, graph: object, context: object) -> str | None:
    x, weight, eps = node_arguments(node)
    return _row_operands_reason(x, None, weight, None, eps)


def why_not_skip_rms_norm(node: fx.Node, graph: object, context: object) -> str | None:
    x, skip, weight, eps = node_arguments(node)
    return _row_operands_reason(x, skip, weight, None, eps)


def why_not_layer_norm(node: fx.Node, graph: object, context: object) -> str | None:
    x, weight, bias, eps = node_arguments(node)
    reason = _row_operands_reason(x, None, weight, bias, eps)
    return reason or same_dtype_reason("x, weight and bias", x, weight, bias)


def why_not_skip_layer_norm(node: fx.Node, graph: object, context: object) -> str | None:
    x, skip, weight, bias, eps = node_arguments(node)
    reason = _row_operands_reason(x, skip, weight, bias, eps)
    return reason or same_dtype_reason("x, weight and bias", x, weight, bias)


@register_lowering(
    "rms_norm", "triton", label="triton/rms_norm", why_not=why_not_rms_norm
)  # fmt: skip
def rms_norm(x, weight, eps, *, config=None):
    """peakc::rms_norm: output in the wider of x's and weight's dtypes."""
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return _launch_norm(x, None, weight, None, eps, out_dtype, True, config)[0]


@register_lowering(
    "skip_rms_norm", "triton", label="triton/skip_rms_norm", why_not=why_not_skip_rms_norm
)
def skip_rms_norm(x, skip, weight, eps, *, config=None):
    """peakc::skip_rms_norm: (rms_norm(x + skip), x + skip) from one read of x and skip."""
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return _launch_norm(x, skip, weight, None, eps, out_dtype, True, config)


@register_lowering(
    "layer_norm", "triton", label="triton/layer_norm", why_not=why_not_layer_norm
)  # fmt: skip
def layer_norm(x, weight, bias, eps, *, config=None):
    """peakc::layer_norm with optional weight and bias, in x's dtype."""
    return _launch_norm(x, None, weight, bias, eps, x.dtype, False, config)[0]


@register_lowering(
    "skip_layer_norm", "triton", label="triton/skip_layer_norm", why_not=why_not_skip_layer_norm
)
def skip_layer_norm(x, skip, weight, bias, eps, *, config=None):
    """peakc::skip_layer_norm: (layer_norm(x + skip), x + skip) from one read of x and skip."""
    return _launch_norm(x, skip, weight, bias, eps, x.dtype, False, config)


for _launcher in (rms_norm, skip_rms_norm, layer_norm, skip_layer_norm):
    _launcher.kernels = (norm_row_kernel, _residual, _normalized)
    _launcher.configs = NORM_CONFIGS
