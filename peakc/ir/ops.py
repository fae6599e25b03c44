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
class Lowering:
    """How one backend runs one op.

    stage "emit": `fn` is what the backend emits for the node (an ONNX translation for ort, a
    kernel launch for triton). stage "rewrite": `fn(graph, node, context)` rewrites the node
    in the backend's copy of the graph before emission, e.g. into one of the backend's own ops
    holding a repacked layout (linear_wq -> ort's matmul_nbits). `why_not(node, graph,
    context)` returns None when a node can be lowered, else why it is not; such a node runs
    `fallback` (the op's reference unless the backend says otherwise). `label` is what the
    artifact report says of lowered nodes.
    """

    op: str
    backend: str
    fn: Callable
    label: str = "lowered"
    stage: str = "emit"
    why_not: Callable[..., str | None] | None = None
    fallback: str = "reference"


@dataclass
class OpDef:
    """One op: its name, its reference, the backend owning it (None: a peakc op every pass
    and backend may see; else private to that backend's lowering), and the lowerings
    backends registered for it."""

    name: str
    doc: str
    reference: Callable | None = None  # the plain-torch implementation (backends may trace it)
    backend: str | None = None
    lowerings: dict[str, Lowering] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return NAMESPACE if self.backend is None else f"{NAMESPACE}_{self.backend}"

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops, self.namespace), self.name).default


OPS: dict[str, OpDef] = {}  # the peakc op set: the contract between passes and backends
BACKEND_OPS: dict[str, dict[str, OpDef]] = {}  # backend -> its private ops (peakc_<backend>::)


def define_op(
    name: str, reference: Callable, fake: Callable, doc: str = "", backend: str | None = None
) -> OpDef:
    """Register `peakc::<name>` with torch.library from a typed reference and fake function.

    With `backend`, the op is that backend's own (`peakc_<backend>::<name>`): a form its
    lowering rewrites peakc ops into before it emits them; passes never see it.
    """
    opdef = OpDef(name=name, doc="", reference=reference, backend=backend)
    op = torch.library.custom_op(f"{opdef.namespace}::{name}", mutates_args=())(reference)
    op.register_fake(fake)
    opdef.doc = doc or (reference.__doc__ or "").strip().splitlines()[0]
    table = OPS if backend is None else BACKEND_OPS.setdefault(backend, {})
    table[name] = opdef
    return opdef


def find_op(name: str, backend: str | None = None) -> OpDef:
    """A peakc op, or one private to `backend`; a KeyError names what was looked for."""
    if name in OPS:
        return OPS[name]
    private = BACKEND_OPS.get(backend or "", {})
    if name in private:
        return private[name]
    raise KeyError(f"no op '{name}'" + (f" in peakc or backend '{backend}'" if backend else ""))


def register_lowering(
    op_name: str,
    backend: str,
    *,
    label: str = "lowered",
    stage: str = "emit",
    why_not: Callable[..., str | None] | None = None,
    fallback: str = "reference",
) -> Callable[[Callable], Callable]:
    """Decorator: `fn` lowers op `op_name` (a peakc op or one of the backend's own) for
    `backend` (see Lowering for the stages, labels and per-node declines)."""
    if stage not in ("emit", "rewrite"):
        raise ValueError(f"register_lowering: stage must be emit or rewrite, got '{stage}'")

    def wrap(fn: Callable) -> Callable:
        opdef = find_op(op_name, backend)
        opdef.lowerings[backend] = Lowering(op_name, backend, fn, label, stage, why_not, fallback)
        return fn

    return wrap


def get_lowering(op_name: str, backend: str) -> Callable | None:
    """The backend's lowering function for `op_name`, or None when its reference is used."""
    lowering = lowering_for(op_name, backend)
    return lowering.fn if lowering else None


def lowering_for(op_name: str, backend: str) -> Lowering | None:
    """The backend's Lowering record for `op_name`, or None."""
    try:
        return find_op(op_name, backend).lowerings.get(backend)
    except KeyError:
        return None


def lowerings(backend: str) -> dict[str, Lowering]:
    """Every op the backend lowers (peakc ops and its own), by op name."""
    ops = [*OPS.values(), *BACKEND_OPS.get(backend, {}).values()]
    return {op.name: op.lowerings[backend] for op in ops if backend in op.lowerings}


def peakc_op_name(target: object) -> str | None:
    """The peakc op name of an FX node target, or None when it is not a peakc op."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE:
        return target._schema.name.split("::", 1)[1]
    return None


def backend_op_name(target: object, backend: str) -> str | None:
    """The name of one of `backend`'s own ops for an FX node target, or None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == f"{NAMESPACE}_{backend}":
        return target._schema.name.split("::", 1)[1]
    return None


def laid_out_like(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` with x's strides: shape-preserving ops keep their input's memory layout, as ATen's
    elementwise ops do, so views downstream of a fused op stay valid (fakes use empty_like)."""
    if out.stride() == x.stride():
        return out
    return torch.empty_like(x, dtype=out.dtype).copy_(out)


# --- rms_norm -------------------------------------------------------------------------------


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalized in fp32, cast to the wider of x's and weight's
    dtypes, then scaled (bf16 x, bf16 w: Llama's order; bf16 x, fp32 w: Gemma's fp32 scaling)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return laid_out_like(x, weight * y.to(torch.promote_types(x.dtype, weight.dtype)))


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


RMS_NORM = define_op("rms_norm", _rms_norm_reference, _rms_norm_fake)


# --- layer_norm -----------------------------------------------------------------------------


def _layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dim (ONNX LayerNormalization, axis=-1): (x-mean)/sqrt(var+eps)*w+b.

    weight and bias are [D] or None.
    """
    return laid_out_like(x, torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps))


def _layer_norm_fake(x, weight, bias, eps):
    return torch.empty_like(x)


LAYER_NORM = define_op("layer_norm", _layer_norm_reference, _layer_norm_fake)


# --- skip norms: residual add + norm, both values returned ----------------------------------


def _skip_rms_norm_reference(
    x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns (rms_norm(x + skip), x + skip) (ORT SkipSimplifiedLN)."""
    total = laid_out_like(x, x + skip)
    return _rms_norm_reference(total, weight, eps), total


def _skip_rms_norm_fake(x, skip, weight, eps):
    total = torch.empty_like(x)
    return _rms_norm_fake(total, weight, eps), total


SKIP_RMS_NORM = define_op("skip_rms_norm", _skip_rms_norm_reference, _skip_rms_norm_fake)


def _skip_layer_norm_reference(
    x: torch.Tensor,
    skip: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then LayerNorm: returns (layer_norm(x + skip), x + skip) (ORT SkipLayerNorm)."""
    total = laid_out_like(x, x + skip)
    return _layer_norm_reference(total, weight, bias, eps), total


def _skip_layer_norm_fake(x, skip, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


SKIP_LAYER_NORM = define_op("skip_layer_norm", _skip_layer_norm_reference, _skip_layer_norm_fake)


# --- rotary_embedding -----------------------------------------------------------------------


def _rotary_embedding_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotary position embedding on x [B, H, S, D] with half-width tables cos/sin [B|1, S, R/2].

    The first R = 2 * cos.shape[-1] channels rotate, the rest pass through (partial rotary,
    ORT rotary_embedding_dim). Non-interleaved (rotate-half, Llama/NeoX) pairs channel i with
    i + R/2; interleaved (GPT-J) pairs 2i with 2i + 1. Pair (a, b) becomes
    (a*cos - b*sin, b*cos + a*sin). Tables are indexed by position already (ORT's
    cos_cache[position_ids]).
    """
    half = cos.shape[-1]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat((a * c + (-b) * s, b * c + a * s), dim=-1)
    return laid_out_like(x, torch.cat((out, rest), dim=-1) if rest.shape[-1] else out)


def _rotary_embedding_fake(x, cos, sin, interleaved):
    return torch.empty_like(x)


ROTARY_EMBEDDING = define_op(
    "rotary_embedding", _rotary_embedding_reference, _rotary_embedding_fake
)


# --- attention ------------------------------------------------------------------------------


def _attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads: q [B,H,S,D], k/v [B,Hkv,Sk,D(v)].

    H must be a multiple of Hkv; query head h reads KV head h // (H/Hkv) (ORT
    GroupQueryAttention; Hkv == H is MultiHeadAttention). `mask` (optional) broadcasts to
    [B, H, S, Sk]: bool True = attend, or float added to the scores (padding masks).
    `is_causal` masks key j > query i (top-left aligned). Returns [B, H, S, Dv] stored
    sequence-major ([B, S, H, Dv] memory, like ATen's CPU/CUDA SDPA and ORT's output), so the
    usual transpose(1, 2).view(B, S, H*Dv) that follows stays a view.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale
    )
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _attention_fake(q, k, v, mask, is_causal, scale):
    b, h, s, _ = q.shape
    return q.new_empty((b, s, h, v.shape[-1])).transpose(1, 2)


ATTENTION = define_op("attention", _attention_reference, _attention_fake)


# --- activations ----------------------------------------------------------------------------

ACTIVATIONS = ("none", "relu", "silu", "gelu", "gelu_tanh")


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """One of ACTIVATIONS by name ('gelu' is the erf form, 'gelu_tanh' the tanh approximation)."""
    if activation == "none":
        return x
    if activation == "relu":
        return torch.relu(x)
    if activation == "silu":
        return torch.nn.functional.silu(x)
    if activation == "gelu":
        return torch.nn.functional.gelu(x)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation '{activation}' (known: {', '.join(ACTIVATIONS)})")


def _gelu_reference(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """GELU of x (+ bias over the last dim): approximate 'none' = erf (ORT BiasGelu/Gelu),
    'tanh' = tanh approximation (ORT FastGelu, which also takes the optional bias)."""
    if bias is not None:
        x = x + bias
    return laid_out_like(x, torch.nn.functional.gelu(x, approximate=approximate))


def _gelu_fake(x, bias, approximate):
    return torch.empty_like(x)


GELU = define_op("gelu", _gelu_reference, _gelu_fake)


def _glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Gated MLP activation: act(gate) * up (SwiGLU with 'silu', GeGLU with 'gelu'/'gelu_tanh')."""
    return laid_out_like(gate, apply_activation(gate, activation) * up)


def _glu_fake(gate, up, activation):
    return torch.empty_like(gate)


GLU = define_op("glu", _glu_reference, _glu_fake)


def _linear_act_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """Linear with a fused epilogue: act(x @ weight.T + bias), weight [N, K], bias [N] or None."""
    return apply_activation(torch.nn.functional.linear(x, weight, bias), activation)


def _linear_act_fake(x, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


LINEAR_ACT = define_op("linear_act", _linear_act_reference, _linear_act_fake)

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


@dataclass
class PackedWeight:
    """A linear_wq's weight: packed codes, scales, packed zero points, optional group index,
    and their layout; together with x and bias, the op's arguments (`args` orders them).

    The four tensor fields hold tensors, or the graph nodes that produce them when the weight
    is read off a linear_wq node (`PackedWeight.of(node.args)`) or written into one (`args`)."""

    qweight: torch.Tensor | torch.fx.Node
    scales: torch.Tensor | torch.fx.Node
    qzeros: torch.Tensor | torch.fx.Node
    g_idx: torch.Tensor | torch.fx.Node | None  # None: column k is in group k // group_size
    bits: int
    group_size: int
    in_features: int

    @classmethod
    def of(cls, args: tuple) -> tuple[object, PackedWeight, object]:
        """The input, packed weight and bias among a linear_wq call's arguments."""
        x, qweight, scales, qzeros, g_idx, bias, bits, group_size, in_features = args
        return x, cls(qweight, scales, qzeros, g_idx, bits, group_size, in_features), bias

    def args(self, x: object, bias: object) -> tuple:
        """The linear_wq arguments that apply this weight to `x` (then add `bias`)."""
        return (x, self.qweight, self.scales, self.qzeros, self.g_idx, bias, *self.layout())

    def layout(self) -> tuple[int, int, int]:
        return self.bits, self.group_size, self.in_features

    def tensors(self) -> dict[str, torch.Tensor | torch.fx.Node]:
        """The packed tensors by field name; g_idx only when there is one."""
        named = {"qweight": self.qweight, "scales": self.scales, "qzeros": self.qzeros}
        return named if self.g_idx is None else {**named, "g_idx": self.g_idx}

    def with_tensors(self, tensors: dict[str, torch.Tensor | torch.fx.Node]) -> PackedWeight:
        """The same layout holding other tensors (or nodes), keyed as `tensors()` keys them."""
        return PackedWeight(
            tensors["qweight"],
            tensors["scales"],
            tensors["qzeros"],
            tensors.get("g_idx"),
            *self.layout(),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] that linear_wq computes with (scales' dtype)."""
        q = unpack_bits(self.qweight, self.bits, self.in_features)
        z = unpack_bits(self.qzeros, self.bits, self.scales.shape[1])
        if self.g_idx is None:
            g = torch.arange(self.in_features, device=self.qweight.device) // self.group_size
        else:
            g = self.g_idx.long()
        return (q - z[:, g]).to(self.scales.dtype) * self.scales[:, g]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Run peakc::linear_wq with this (tensor-valued) weight."""
        return LINEAR_WQ.overload(*self.args(x, bias))


def dequantize_weight(*packed: object) -> torch.Tensor:
    """`PackedWeight(qweight, scales, qzeros, g_idx, bits, group_size, in_features)`'s float
    weight, for callers holding the operands apart."""
    return PackedWeight(*packed).dequantize()


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
    """Linear with packed b-bit weights: unpack, dequantize per group, then x @ Wᵀ + bias.
    (The typed signature is the op's schema; PackedWeight holds the same operands.)"""
    w = PackedWeight(qweight, scales, qzeros, g_idx, bits, group_size, in_features).dequantize()
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _linear_wq_fake(x, qweight, scales, *rest):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))  # [..., N]: the rest is layout


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


# --- linear_compressed: linear with dictionary-coded ternary / 2-bit weights (QMoE) ---------
#
# W [N, K] = levels * scales[:, None], levels in {-1, 0, 1} (or {-2, -1, 0, 1}) coded by
# peakc/ir/dictionary_code.py (layout there): words int16 [W], offsets int32 [N*n_seg + 1],
# table int16 [D, 8] (often one weight shared by every expert), checksum int64 [1]; scales
# [N] in the weight's dtype. `segment` columns per coded segment, `max_words` the most words
# in one segment (kernels size their tiles by it).


def _linear_compressed_reference(
    x: torch.Tensor,
    words: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    checksum: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    segment: int,
    max_words: int,
) -> torch.Tensor:
    """Linear with dictionary-coded weights: decode (checked: damaged streams are an error),
    scale per output row, then x @ Wᵀ + bias."""
    from peakc.ir.dictionary_code import decode

    rows = scales.shape[0]
    levels = decode(words, offsets, table, checksum, rows, in_features, segment, max_words)
    w = levels.to(scales.dtype) * scales[:, None]
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _linear_compressed_fake(x, words, offsets, table, checksum, scales, *rest):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


LINEAR_COMPRESSED = define_op(
    "linear_compressed", _linear_compressed_reference, _linear_compressed_fake
)


# --- grouped_mm: the routed experts of a mixture-of-experts layer ---------------------------


def _grouped_mm_reference(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Per-expert matmul of routed tokens: x [T, K] sorted by expert, weight [E, K, N] (all
    experts stacked), offsets [E] cumulative token counts; rows offsets[e-1]:offsets[e] of
    the output are x's rows times weight[e] (transformers' grouped_mm, which its MoE models
    export through)."""
    out = x.new_zeros((x.shape[0], weight.shape[2]))
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight[expert]
        start = end
    return out


def _grouped_mm_fake(x, weight, offsets):
    return x.new_empty((x.shape[0], weight.shape[2]))


GROUPED_MM = define_op("grouped_mm", _grouped_mm_reference, _grouped_mm_fake)


def _grouped_mm_compressed_reference(
    x: torch.Tensor,
    words: torch.Tensor,
    offsets: torch.Tensor,
    table: torch.Tensor,
    checksum: torch.Tensor,
    scales: torch.Tensor,
    group_offsets: torch.Tensor,
    in_features: int,
    segment: int,
    max_words: int,
) -> torch.Tensor:
    """grouped_mm over stacked experts whose weights are dictionary-coded (QMoE): the coded
    matrix [E*N, K] (layout: linear_compressed's) holds expert e's linear weight [N, K] in
    rows e*N..(e+1)*N, W = levels * scales[:, None]; x [T, K] sorted by expert and
    `group_offsets` [E] as grouped_mm's. Decodes (checked) every expert, then grouped_mm."""
    from peakc.ir.dictionary_code import decode

    rows, experts = scales.shape[0], group_offsets.shape[0]
    levels = decode(words, offsets, table, checksum, rows, in_features, segment, max_words)
    w = (levels.to(scales.dtype) * scales[:, None]).view(experts, rows // experts, in_features)
    return _grouped_mm_reference(x, w.transpose(1, 2).to(x.dtype), group_offsets)


def _grouped_mm_compressed_fake(x, words, offsets, table, checksum, scales, group_offsets, *rest):
    return x.new_empty((x.shape[0], scales.shape[0] // group_offsets.shape[0]))


GROUPED_MM_COMPRESSED = define_op(
    "grouped_mm_compressed", _grouped_mm_compressed_reference, _grouped_mm_compressed_fake
)


# --- linear_sparse24 / linear_sparse24_wq: linear with 2:4-compressed weights ----------------
#
# Layout (W [N, K], K a multiple of 4, at most two nonzeros in every 4 consecutive columns of a
# row, as prune{pattern=2:4} leaves it):
#   values  float [N, K/2]  the two kept weights of each group of 4 columns, in column order (a
#           group with fewer than two nonzeros keeps zeros, at its first zero positions).
#   meta    uint8 [N, K/8]  each kept value's column (0-3) within its group, 2 bits per value,
#           packed like linear_wq's codes (`pack_bits`, LSB first): 1 bit per dense weight.
# linear_sparse24_wq quantizes the kept values like linear_wq quantizes a row: qvalues, scales,
# qzeros are a linear_wq weight of in_features K/2 and group_size G/2 (a group of G dense
# columns, G a multiple of 4, holds exactly G/2 kept values; per channel: G = K), so 4-bit codes
# cost 2 + 1 (meta) bits per dense weight plus scales. Groups are contiguous (no g_idx): an
# act-order column order would put one kept value's group at a different place in every row.


def compress_sparse24(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, K/2], meta uint8 [N, K/8]) of a 2:4-sparse W [N, K]; a ValueError names
    `name` when K is not a multiple of 4 or a group of 4 holds more than two nonzeros."""
    rows, k = w.shape
    if k % 4:
        raise ValueError(f"{name}: 2:4 sparsity needs in_features divisible by 4, got {k}")
    groups = w.reshape(rows, k // 4, 4)
    nonzero = groups != 0
    if bool((nonzero.sum(-1) > 2).any()):
        raise ValueError(f"{name}: some group of 4 input columns holds more than two nonzeros")
    position = torch.arange(4, device=w.device)
    rank = (~nonzero).to(torch.int64) * 4 + position  # nonzeros first, then by column
    kept = rank.argsort(-1)[..., :2].sort(-1).values
    values = groups.gather(-1, kept).reshape(rows, k // 2)
    return values, pack_bits(kept.reshape(rows, k // 2), 2)


def decompress_sparse24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense W [N, K] of `compress_sparse24`'s (values, meta)."""
    rows = values.shape[0]
    kept = unpack_bits(meta, 2, in_features // 2).long().reshape(rows, in_features // 4, 2)
    dense = values.new_zeros(rows, in_features // 4, 4)
    dense.scatter_(-1, kept, values.reshape(rows, in_features // 4, 2))
    return dense.reshape(rows, in_features)


def sparse24_values_weight(
    qvalues: object, scales: object, qzeros: object, bits: int, group_size: int, in_features: int
) -> PackedWeight:
    """linear_sparse24_wq's kept values as the linear_wq weight they are quantized as."""
    return PackedWeight(qvalues, scales, qzeros, None, bits, group_size // 2, in_features // 2)


def _linear_sparse24_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """Linear with a 2:4-compressed weight: decompress (values, meta), then x @ Wᵀ + bias."""
    w = decompress_sparse24(values, meta, in_features)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _linear_sparse24_fake(x, values, *rest):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _linear_sparse24_wq_reference(
    x: torch.Tensor,
    qvalues: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Linear with 2:4-compressed, b-bit quantized weights: dequantize the kept values (a
    linear_wq weight of K/2 columns, groups of G/2), decompress, then x @ Wᵀ + bias."""
    kept = sparse24_values_weight(qvalues, scales, qzeros, bits, group_size, in_features)
    w = decompress_sparse24(kept.dequantize(), meta, in_features)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _linear_sparse24_wq_fake(x, qvalues, scales, *rest):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


LINEAR_SPARSE24 = define_op("linear_sparse24", _linear_sparse24_reference, _linear_sparse24_fake)
LINEAR_SPARSE24_WQ = define_op(
    "linear_sparse24_wq", _linear_sparse24_wq_reference, _linear_sparse24_wq_fake
)
