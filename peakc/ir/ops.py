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


# --- linear_wq: linear with packed low-bit weights ------------------------------------------
#
# Layout (bits b in {2, 3, 4, 8}, weight W [N, K] = out_features x in_features, groups of G
# consecutive input columns, n_groups = ceil(K / G); the last group may be partial):
#   qweight  uint8 [N, ceil(K*b/8)]  each row is a little-endian bit stream of K unsigned b-bit
#            values: value k occupies bits [k*b, (k+1)*b) of the row (LSB first), so for b=4 the
#            low nibble holds the even column and for b=8 it is one byte per value.
#   scales   float [N, n_groups]     the weight's dtype.
#   qzeros   uint8 [N, ceil(n_groups*b/8)]  zero points, packed the same way as qweight.
#   g_idx    int32 [K] or None       group of each input column; None means k // G.
# Dequantized W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)].
#
# ONNX Runtime's com.microsoft::MatMulNBits (bits=4) wants B uint8 [N, n_blocks, blob_size]
# with blob_size = G*b/8 and the 4-bit values low nibble first along K, scales [N*n_blocks],
# zero points uint8 [N*ceil(n_blocks*b/8)] packed low nibble first. With K a multiple of G
# that is our qweight reshaped; otherwise each row is padded with zeros to n_blocks*G
# columns first (`to_matmul_nbits`). Triton kernels unpack the same stream per row.


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned b-bit integers [N, K] into uint8 [N, ceil(K*b/8)], LSB-first per row."""
    rows, count = values.shape
    nbytes = (count * bits + 7) // 8
    v = values.to(torch.int64) & ((1 << bits) - 1)
    offset = torch.arange(count, device=values.device) * bits
    index = (offset // 8).expand(rows, count)
    shifted = v << (offset % 8)
    out = torch.zeros(rows, nbytes + 1, dtype=torch.int64, device=values.device)
    out.scatter_add_(1, index, shifted & 0xFF)
    out.scatter_add_(1, index + 1, shifted >> 8)
    return out[:, :nbytes].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` b-bit values of each row, as int32 [N, count]."""
    data = torch.nn.functional.pad(packed.to(torch.int32), (0, 1))
    offset = torch.arange(count, device=packed.device) * bits
    index = offset // 8
    window = data[:, index] | (data[:, index + 1] << 8)
    return (window >> (offset % 8)) & ((1 << bits) - 1)


def dequantize_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The float weight [N, K] that a linear_wq computes with (scales' dtype)."""
    q = unpack_bits(qweight, bits, in_features)
    z = unpack_bits(qzeros, bits, scales.shape[1])
    if g_idx is None:
        g = torch.arange(in_features, device=qweight.device) // group_size
    else:
        g = g_idx.long()
    return (q - z[:, g]).to(scales.dtype) * scales[:, g]


def _linear_wq_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Linear with packed b-bit weights: unpack, dequantize per group, then x @ Wᵀ + bias."""
    w = dequantize_weight(qweight, scales, qzeros, g_idx, bits, group_size, in_features)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _linear_wq_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


LINEAR_WQ = define_op("linear_wq", _linear_wq_reference, _linear_wq_fake)


def to_matmul_nbits(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Runtime MatMulNBits inputs (B [N, n_blocks, blob], scales [N*n_blocks], packed
    zero points) from contiguous-group linear_wq weights (no g_idx)."""
    rows = qweight.shape[0]
    n_blocks = scales.shape[1]
    q = unpack_bits(qweight, bits, in_features)
    q = torch.nn.functional.pad(q, (0, n_blocks * group_size - in_features))
    blob = pack_bits(q, bits).view(rows, n_blocks, group_size * bits // 8)
    return blob, scales.reshape(-1), qzeros.reshape(-1)
