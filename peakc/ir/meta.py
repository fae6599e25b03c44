"""Shapes and dtypes of FX nodes: read from node.meta["val"] and re-derived with fake tensors."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b1",
}


def describe(val: object) -> str:
    """`f32[1,16,64]` for a tensor value, a tuple of those for tuples, `?` when unknown."""
    if isinstance(val, torch.Tensor):
        dims = ",".join(str(d) for d in val.shape)
        return f"{DTYPE_SHORT.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in val) + ")"
    if val is None:
        return "?"
    return type(val).__name__


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    """The fake tensor recorded for a node's value, if it is a single tensor."""
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def propagate(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, object]:
    """Run shape propagation with fake tensors; returns each node's fake value.

    Does not touch node.meta: callers decide whether to compare or to store.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
    return _propagate(gm, mode, fake_inputs)


def propagate_at(
    gm: fx.GraphModule, inputs: list[tuple[tuple[int, ...], torch.dtype, torch.device]]
) -> dict[fx.Node, object]:
    """Shape propagation at other input shapes (shape, dtype, device each), with no memory
    allocated for the inputs: they are fake tensors on their own device."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake_inputs = [
            torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in inputs
        ]
    return _propagate(gm, mode, fake_inputs)


def _propagate(
    gm: fx.GraphModule, mode: FakeTensorMode, fake_inputs: list
) -> dict[fx.Node, object]:
    saved = {n: n.meta.get("val") for n in gm.graph.nodes}
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
        return {n: n.meta.get("val") for n in gm.graph.nodes}
    finally:
        for n, v in saved.items():
            if v is None:
                n.meta.pop("val", None)
            else:
                n.meta["val"] = v


def same_signature(a: object, b: object) -> bool:
    """True when two values have the same tensor shapes and dtypes (nested tuples allowed)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.dim() != b.dim():
            return False
        # A symbolic (dynamic) dimension matches any size; static ones must be equal.
        return all(
            not isinstance(x, int) or not isinstance(y, int) or x == y
            for x, y in zip(a.shape, b.shape)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_signature(x, y) for x, y in zip(a, b))
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)


def fake_of(value: torch.Tensor) -> torch.Tensor:
    """A meta-device stand-in carrying a tensor's shape and dtype (for node.meta["val"])."""
    return torch.empty(value.shape, dtype=value.dtype, device="meta")
