"""Gated MLP activations (`peakc::glu`: SwiGLU, GeGLU) and GELU with its optional bias
(`peakc::gelu`, erf and tanh forms) as Triton lowerings.

Both are one pass over [rows, columns] tiles: each operand read once with unit column stride
(gate and up may be slices of one fused projection, any row pitch), fp32 math, one store. The
intermediate roundings of the references are kept: act(gate) is rounded to the dtype before
the product, and x + bias before the GELU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from peakc.ir.ops import ACTIVATIONS, register_lowering

if TYPE_CHECKING:
    from torch import fx

# a program covers block_rows x block_cols elements
ELEMENTWISE_CONFIGS = [
    {"block_rows": 1, "block_cols": 1024, "num_warps": 4},
    {"block_rows": 1, "block_cols": 2048, "num_warps": 8},
    {"block_rows": 4, "block_cols": 512, "num_warps": 4},
    {"block_rows": 16, "block_cols": 256, "num_warps": 8},
]
GELU_FORMS = {"none": ACTIVATIONS.index("gelu"), "tanh": ACTIVATIONS.index("gelu_tanh")}


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """ACTIVATIONS[ACT] of an fp32 block: none, relu, silu, gelu (erf), gelu_tanh."""
    y = x
    if ACT == 1:
        y = tl.maximum(x, 0.0)
    elif ACT == 2:
        y = x * tl.sigmoid(x)
    elif ACT == 3:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 4:
        # 0.5 * x * (1 + tanh(z)) == x * sigmoid(2z), z = sqrt(2/pi) * (x + 0.044715 x^3)
        y = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    return y


@triton.jit
def _tile(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's row and column indices and the mask of those inside the tensor."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r.to(tl.int64)[:, None], c[None, :], (r[:, None] < rows) & (c[None, :] < cols)


@triton.jit
def glu_kernel(
    gate_ptr, up_ptr, out_ptr, rows, cols, gate_row, up_row, out_row,
    ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out = act(gate) * up, act(gate) rounded to the output dtype first as the reference does."""
    r, c, mask = _tile(rows, cols, BLOCK_R, BLOCK_C)
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + r * gate_row + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + r * up_row + c, mask=mask, other=0.0).to(tl.float32)
    activated = _activation(gate, ACT).to(dtype).to(tl.float32)
    tl.store(out_ptr + r * out_row + c, (activated * up).to(dtype), mask=mask)


@triton.jit
def gelu_kernel(
    x_ptr, bias_ptr, out_ptr, rows, cols, x_row, out_row,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out = gelu(x + bias), x + bias rounded to the dtype first as the reference does."""
    r, c, mask = _tile(rows, cols, BLOCK_R, BLOCK_C)
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + r * x_row + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=c < cols, other=0.0).to(tl.float32)
        x = (x + bias).to(dtype).to(tl.float32)
    tl.store(out_ptr + r * out_row + c, _activation(x, ACT).to(dtype), mask=mask)


def _grid(rows: int, cols: int, config: dict) -> tuple[int, int]:
    return triton.cdiv(rows, config["block_rows"]), triton.cdiv(cols, config["block_cols"])


def why_not_glu(node: fx.Node, graph: object, context: object) -> str | None:
    """Declines non-float or mixed dtypes, gate and up of different shapes, unknown activations."""
    gate, up, activation = node_arguments(node)
    reason = dtype_reason("gate", gate) or dtype_reason("up", up)
    reason = reason or same_dtype_reason("gate and up", gate, up)
    if reason is None and gate.shape != up.shape:
        reason = "gate and up differ in shape"
    if reason is None and activation not in ACTIVATIONS:
        reason = f"activation '{activation}' has no kernel form"
    return reason


def why_not_gelu(node: fx.Node, graph: object, context: object) -> str | None:
    """Declines non-float or mixed dtypes, a bias not over the last dim, unknown forms."""
    x, bias, approximate = node_arguments(node)
    reason = dtype_reason("x", x) or (bias is not None and dtype_reason("bias", bias)) or None
    reason = reason or same_dtype_reason("x and bias", x, bias)
    if reason is None and bias is not None and tuple(bias.shape) != (x.shape[-1],):
        reason = f"bias is not [{x.shape[-1]}]"
    if reason is None and approximate not in GELU_FORMS:
        reason = f"approximate '{approximate}' is neither 'none' nor 'tanh'"
    return reason


@register_lowering("glu", "triton", label="triton/glu", why_not=why_not_glu)
def glu(gate, up, activation, *, config=None):
    """peakc::glu: act(gate) * up, laid out like gate."""
    config = config or ELEMENTWISE_CONFIGS[0]
    gate_rows, up_rows = as_rows(gate), as_rows(up)
    out, out_rows = rows_output(gate, gate.dtype)
    rows, cols = gate_rows.shape
    glu_kernel[_grid(rows, cols, config)](
        gate_rows, up_rows, out_rows, rows, cols,
        gate_rows.stride(0), up_rows.stride(0), out_rows.stride(0),
        ACT=ACTIVATIONS.index(activation), BLOCK_R=config["block_rows"],
        BLOCK_C=config["block_cols"], num_warps=config["num_warps"],
    )  # fmt: skip
    return finish_rows(out, out_rows)


@register_lowering("gelu", "triton", label="triton/gelu", why_not=why_not_gelu)
def gelu(x, bias, approximate, *, config=None):
    """peakc::gelu: gelu(x + bias) in the erf ('none') or tanh form, laid out like x."""
    config = config or ELEMENTWISE_CONFIGS[0]
    x_rows = as_rows(x)
    out, out_rows = rows_output(x, x.dtype)
    rows, cols = x_rows.shape
    gelu_kernel[_grid(rows, cols, config)](
        x_rows, bias if bias is not None else x_rows, out_rows, rows, cols,
        x_rows.stride(0), out_rows.stride(0),
        ACT=GELU_FORMS[approximate], HAS_BIAS=bias is not None,
        BLOCK_R=config["block_rows"], BLOCK_C=config["block_cols"],
        num_warps=config["num_warps"],
    )  # fmt: skip
    return finish_rows(out, out_rows)


glu.kernels = (glu_kernel, _tile, _activation)
glu.configs = ELEMENTWISE_CONFIGS
gelu.kernels = (gelu_kernel, _tile, _activation)
gelu.configs = ELEMENTWISE_CONFIGS
