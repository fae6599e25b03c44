"""The peakc op set: the contract between passes and backends.

Each op is a torch.library custom op with a reference implementation in plain torch (it
defines correctness and runs anywhere) and a fake implementation (so export and shape
propagation work). Backends register lowerings per op; an op without a lowering for a
backend runs its reference implementation, and the backend's report says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

NAMESPACE = "peakc"


@dataclass
class OpDef:
    """One peakc op: its name, the torch op, and the lowerings backends registered for it."""

    name: str
    doc: str
    lowerings: dict[str, Callable] = field(default_factory=dict)

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default


OPS: dict[str, OpDef] = {}


def define_op(name: str, reference: Callable, fake: Callable, doc: str = "") -> OpDef:
    """Register `peakc::<name>` with torch.library from a typed reference and fake function."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(reference)
    op.register_fake(fake)
    opdef = OpDef(name=name, doc=doc or (reference.__doc__ or "").strip().splitlines()[0])
    OPS[name] = opdef
    return opdef


def register_lowering(op_name: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` lowers peakc op `op_name` for `backend`."""

    def wrap(fn: Callable) -> Callable:
        OPS[op_name].lowerings[backend] = fn
        return fn

    return wrap


def get_lowering(op_name: str, backend: str) -> Callable | None:
    """The backend's lowering of `op_name`, or None when the reference implementation is used."""
    return OPS[op_name].lowerings.get(backend)


def peakc_op_name(target: object) -> str | None:
    """The peakc op name of an FX node target, or None when it is not a peakc op."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE:
        return target._schema.name.split("::", 1)[1]
    return None


# --- rms_norm -------------------------------------------------------------------------------


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalized in fp32, cast back to x's dtype, then scaled."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


RMS_NORM = define_op("rms_norm", _rms_norm_reference, _rms_norm_fake)


# --- attention_cache: attention over a preallocated KV cache -----------------------------------


def _attention_cache_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of new tokens over a KV cache, the cache form of peakc attention.

    q: [B, Hq, S, D]; k, v: [B, Hkv, S, D] (the new tokens' keys and values, after RoPE);
    k_cache, v_cache: [B, Hkv, T, D]; positions: [B, S] int64, each new token's slot.
    The new keys and values are placed at their positions (functionally: the caches are not
    written; the runtime writes them after the step) and query i of sequence b attends to
    slots 0..positions[b, i]. Grouped-query heads: query head h reads kv head h // (Hq/Hkv).
    Returns [B, Hq, S, D].
    """
    batch, kv_heads, seq, dim = k.shape
    slots = positions[:, None, :, None].expand(batch, kv_heads, seq, dim)
    keys = k_cache.scatter(2, slots, k.to(k_cache.dtype))
    values = v_cache.scatter(2, slots, v.to(v_cache.dtype))
    groups = q.shape[1] // kv_heads
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    cache_len = k_cache.shape[2]
    visible = torch.arange(cache_len, device=q.device)[None, None, :] <= positions[:, :, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible[:, None], scale=scale
    )


def _attention_cache_fake(q, k, v, k_cache, v_cache, positions, scale):
    return torch.empty_like(q)


ATTENTION_CACHE = define_op("attention_cache", _attention_cache_reference, _attention_cache_fake)
