"""How the templated kernels see an op's operands: a node's argument values for `why_not`, the
dtypes the kernels cover, and 2-D row views of tensors for the row-wise launchers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import fx

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def node_arguments(node: fx.Node) -> list[Any]:
    """The node's arguments in schema order, defaults filled in, each FX node replaced by its
    recorded value (a fake tensor for tensors), as the op's reference would receive them."""
    schema = node.target._schema
    values = list(node.args)
    for argument in schema.arguments[len(values) :]:
        values.append(node.kwargs.get(argument.name, argument.default_value))
    return [value.meta.get("val") if hasattr(value, "meta") else value for value in values]


def dtype_reason(name: str, tensor: Any) -> str | None:
    """Why a tensor operand cannot go to a kernel (not a float16/bfloat16/float32 tensor)."""
    if not isinstance(tensor, torch.Tensor):
        return f"{name} has no recorded tensor value"
    if tensor.dtype not in FLOAT_DTYPES:
        return f"{name} is {str(tensor.dtype).removeprefix('torch.')}, not fp16/bf16/fp32"
    return None


def same_dtype_reason(names: str, *tensors: torch.Tensor | None) -> str | None:
    """Why operands that the reference combines without promotion cannot go to a kernel."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return None if len(dtypes) <= 1 else f"{names} differ in dtype"


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim] with unit column stride: a view when its layout allows (row-major
    leading dims with any row pitch, e.g. a slice of a fused projection), else a copy."""
    width = t.shape[-1]
    if t.stride(-1) == 1 or width == 1:
        try:
            return t.view(-1, width)
        except RuntimeError:
            pass  # leading dims not collapsible into one row stride: copy below
    return t.contiguous().view(-1, width)


def rows_output(like: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An output laid out like `like` (as the references' `laid_out_like` leaves it) and a
    row view of it that a kernel can write: the output itself when its layout allows, else a
    contiguous buffer that `finish_rows` copies back."""
    out = torch.empty_like(like, dtype=dtype)
    return out, as_rows(out)


def finish_rows(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`out` holding what the kernel wrote into `rows` (a copy only when rows was a buffer)."""
    if rows.data_ptr() != out.data_ptr():
        out.copy_(rows.view(out.shape))
    return out
