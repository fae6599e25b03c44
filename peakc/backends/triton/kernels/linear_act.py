"""`peakc::linear_act` (a linear with its activation fused: GPT-2, GPT-NeoX, GPT-J and OPT's
MLP input projection, act(x @ Wᵀ + b)) as a Triton lowering.

The GEMM is cuBLAS's (`F.linear`, the bias added in its epilogue, as the reference does); the
activation is one elementwise pass of glu.py's kernel over the GEMM's output, in place. The
roundings are the reference's: the GEMM's output rounded to the dtype, the activation computed
in fp32 from it and rounded once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peakc.backends.triton.kernels.glu import (
    ELEMENTWISE_CONFIGS,
    _activation,
    _grid,
    _tile,
    gelu_kernel,
)
from peakc.backends.triton.kernels.operands import (
    dtype_reason,
    node_arguments,
    same_dtype_reason,
)
from peakc.ir.ops import ACTIVATIONS, register_lowering

if TYPE_CHECKING:
    from torch import fx


def why_not_linear_act(node: fx.Node, graph: object, context: object) -> str | None:
    """Declines non-float or mixed dtypes, a weight that is not [N, K] over x's last dim, a
    bias that is not [N], unknown activations."""
    x, weight, bias, activation = node_arguments(node)
    reason = dtype_reason("x", x) or dtype_reason("weight", weight)
    reason = reason or (bias is not None and dtype_reason("bias", bias)) or None
    reason = reason or same_dtype_reason("x, weight and bias", x, weight, bias)
    if reason is None and (weight.dim() != 2 or weight.shape[1] != x.shape[-1]):
        reason = f"weight {list(weight.shape)} is not [N, {x.shape[-1]}]"
    if reason is None and bias is not None and tuple(bias.shape) != (weight.shape[0],):
        reason = f"bias is not [{weight.shape[0]}]"
    if reason is None and activation not in ACTIVATIONS:
        reason = f"activation '{activation}' has no kernel form"
    return reason


@register_lowering("linear_act", "triton", label="triton/linear_act", why_not=why_not_linear_act)
def linear_act(x, weight, bias, activation, *, config=None):
    """peakc::linear_act: cuBLAS GEMM with its bias, then the activation in place."""
    out = torch.nn.functional.linear(x, weight, bias)
    if activation == "none":
        return out
    config = config or ELEMENTWISE_CONFIGS[0]
    rows_view = out.view(-1, out.shape[-1])  # F.linear's output is contiguous
    rows, cols = rows_view.shape
    gelu_kernel[_grid(rows, cols, config)](
        rows_view, rows_view, rows_view, rows, cols, cols, cols,
        ACT=ACTIVATIONS.index(activation), HAS_BIAS=False,
        BLOCK_R=config["block_rows"], BLOCK_C=config["block_cols"],
        num_warps=config["num_warps"],
    )  # fmt: skip
    return out


linear_act.kernels = (gelu_kernel, _tile, _activation)
linear_act.configs = ELEMENTWISE_CONFIGS
