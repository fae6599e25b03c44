"""peakc ops as ONNX: onnxscript functions emitting ONNX Runtime contrib ops (com.microsoft).

Each function is a torch.onnx custom translation: it receives the op's inputs as ONNX values
(None for an absent optional tensor) and its scalar arguments as Python values. Each is
registered in the op set's lowering registry (`register_lowering(op, "ort")`); an op without
one is exported through its reference implementation (see export.py). A new op is one
registered function here; `linear_wq` reaches MatMulNBits through matmul_nbits.py's rewrite
into the backend's own op `peakc_ort::matmul_nbits`.
"""

from __future__ import annotations

import onnx.defs
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

import peakc.backends.ort.matmul_nbits  # noqa: F401  (defines the backend's own matmul_nbits op)
from peakc.ir.ops import register_lowering

MS_DOMAIN = "com.microsoft"
LABEL = "contrib/onnx"  # what the artifact report says of an op these functions lower
_ANY = [
    "tensor(float)",
    "tensor(float16)",
    "tensor(bfloat16)",
    "tensor(int64)",
    "tensor(int32)",
    "tensor(uint8)",
]
_ATTR = onnx.defs.OpSchema.AttrType


def contrib_op(
    name: str, inputs: str, outputs: str, domain: str = MS_DOMAIN, **attributes: _ATTR
) -> Op:
    """An ONNX Runtime contrib op callable from onnxscript.

    onnx does not ship com.microsoft schemas, so each op gets a minimal local one (not
    registered globally): `inputs`/`outputs` are names, a trailing '?' marks optional ones;
    output 0 has input 0's type, the others are left to onnxruntime. A few contrib ops live
    in the default domain (SimplifiedLayerNormalization): their schema is registered with
    onnx, or the checker would reject the model.
    """
    formal = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    single = onnx.defs.OpSchema.FormalParameterOption.Single

    def params(names: str, prefix: str) -> list:
        out = []
        for i, raw in enumerate(names.split()):
            type_str = "T0" if (prefix, i) == ("O", 0) else f"{prefix}{i}"
            option = optional if raw.endswith("?") else single
            out.append(formal(raw.rstrip("?"), type_str, param_option=option))
        return out

    ins, outs = params(inputs, "T"), params(outputs, "O")
    constraints = [(p.type_str, _ANY, "") for p in ins]
    constraints += [(p.type_str, _ANY, "") for p in outs if p.type_str != "T0"]
    schema = onnx.defs.OpSchema(
        name,
        domain,
        1,
        inputs=ins,
        outputs=outs,
        type_constraints=constraints,
        attributes=[
            onnx.defs.OpSchema.Attribute(key, kind, required=False)
            for key, kind in attributes.items()
        ],
    )
    if domain == "" and not onnx.defs.has(name, domain):
        onnx.defs.register_schema(schema)  # so onnx.checker accepts it in the default domain
    return Op(Opset(domain, 1), name, schema)


_F, _I, _S = _ATTR.FLOAT, _ATTR.INT, _ATTR.STRING
SIMPLIFIED_LAYER_NORM = contrib_op(
    "SimplifiedLayerNormalization",
    "X scale",
    "Y",
    domain="",
    axis=_I,
    epsilon=_F,
    stash_type=_I,
)
SKIP_SIMPLIFIED_LAYER_NORM = contrib_op(
    "SkipSimplifiedLayerNormalization",
    "input skip gamma bias?",
    "output mean inv_std_var input_skip_bias_sum",
    epsilon=_F,
)
SKIP_LAYER_NORM = contrib_op(
    "SkipLayerNormalization",
    "input skip gamma beta? bias?",
    "output mean inv_std_var input_skip_bias_sum",
    epsilon=_F,
)
ROTARY_EMBEDDING = contrib_op(
    "RotaryEmbedding",
    "input position_ids cos_cache sin_cache",
    "output",
    interleaved=_I,
    rotary_embedding_dim=_I,
    num_heads=_I,
    scale=_F,
)
MULTI_HEAD_ATTENTION = contrib_op(
    "MultiHeadAttention",
    "query key? value? bias? key_padding_mask? attention_bias?",
    "output",
    num_heads=_I,
    scale=_F,
    unidirectional=_I,
)
GROUP_QUERY_ATTENTION = contrib_op(
    "GroupQueryAttention",
    "query key value past_key past_value seqlens_k total_sequence_length",
    "output present_key present_value",
    num_heads=_I,
    kv_num_heads=_I,
    scale=_F,
)
FAST_GELU = contrib_op("FastGelu", "X bias?", "Y")
BIAS_GELU = contrib_op("BiasGelu", "A B", "C")
GELU = contrib_op("Gelu", "X", "Y")
MATMUL_NBITS = contrib_op(
    "MatMulNBits",
    "A B scales zero_points?",
    "Y",
    K=_I,
    N=_I,
    bits=_I,
    block_size=_I,
    accuracy_level=_I,
)

# Contrib ops each translation emits (the report counts them in the exported model).
CONTRIB_OPS = (
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "RotaryEmbedding",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "FastGelu",
    "BiasGelu",
    "Gelu",
    "MatMulNBits",
)


@register_lowering("rms_norm", "ort", label=LABEL)
def rms_norm(x, weight, eps: float):
    """peakc::rms_norm -> SimplifiedLayerNormalization (normalized in fp32, stash_type=1)."""
    return SIMPLIFIED_LAYER_NORM(x, weight, axis=-1, epsilon=eps, stash_type=1)


@register_lowering("skip_rms_norm", "ort", label=LABEL)
def skip_rms_norm(x, skip, weight, eps: float):
    """peakc::skip_rms_norm -> SkipSimplifiedLayerNormalization (outputs 0 and 3)."""
    out, _, _, total = SKIP_SIMPLIFIED_LAYER_NORM(x, skip, weight, epsilon=eps)
    return out, total


@register_lowering("layer_norm", "ort", label=LABEL)
def layer_norm(x, weight, bias, eps: float):
    """peakc::layer_norm -> ONNX LayerNormalization over the last axis."""
    weight = weight if weight is not None else _ones_like_last(x)
    if bias is None:
        outputs = op.LayerNormalization(x, weight, axis=-1, epsilon=eps)
    else:
        outputs = op.LayerNormalization(x, weight, bias, axis=-1, epsilon=eps)
    return outputs[0]  # Y; the exporter also creates the optional Mean and InvStdDev outputs


@register_lowering("skip_layer_norm", "ort", label=LABEL)
def skip_layer_norm(x, skip, weight, bias, eps: float):
    """peakc::skip_layer_norm -> SkipLayerNormalization (outputs 0 and 3)."""
    weight = weight if weight is not None else _ones_like_last(x)
    beta = (
        bias
        if bias is not None
        else op.Mul(weight, op.CastLike(op.Constant(value_float=0.0), weight))
    )
    out, _, _, total = SKIP_LAYER_NORM(x, skip, weight, beta, epsilon=eps)
    return out, total


@register_lowering("rotary_embedding", "ort", label=LABEL)
def rotary_embedding(x, cos, sin, interleaved: bool):
    """peakc::rotary_embedding -> RotaryEmbedding on x [B, H, S, D].

    peakc's tables are already indexed by position ([B'|1, S, R/2]); they become ORT's
    cos_cache/sin_cache flattened to [B'*S, R/2] with position_ids[b, s] = b'*S + s. With
    partial rotary (R < D) the pass-through channels are sliced off and re-attached.
    """
    batch, seq = op.Shape(x, start=0, end=1), op.Shape(x, start=2, end=3)
    minus = op.Constant(value_ints=[-1])
    half = op.Shape(cos, start=2, end=3)
    cos_cache = op.Reshape(cos, op.Concat(minus, half, axis=0))
    sin_cache = op.Reshape(sin, op.Concat(minus, half, axis=0))
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    steps = op.Range(zero, op.Squeeze(seq), one)  # [S]
    table_batch = op.Shape(cos, start=0, end=1)
    offsets = op.Mul(op.Range(zero, op.Squeeze(table_batch), one), op.Squeeze(seq))  # [B']
    ids = op.Add(op.Unsqueeze(offsets, op.Constant(value_ints=[1])), steps)  # [B', S]
    ids = op.Expand(ids, op.Concat(batch, seq, axis=0))
    rotary_dim, head_dim = (
        2 * static_dim(cos, -1, "rotary_embedding"),
        static_dim(x, -1, "rotary_embedding"),
    )
    if rotary_dim == head_dim:
        return ROTARY_EMBEDDING(x, ids, cos_cache, sin_cache, interleaved=int(interleaved))
    axis = op.Constant(value_ints=[3])
    rot = op.Slice(x, op.Constant(value_ints=[0]), op.Constant(value_ints=[rotary_dim]), axis)
    rest = op.Slice(
        x, op.Constant(value_ints=[rotary_dim]), op.Constant(value_ints=[head_dim]), axis
    )
    rot = ROTARY_EMBEDDING(rot, ids, cos_cache, sin_cache, interleaved=int(interleaved))
    return op.Concat(rot, rest, axis=3)


def static_dim(value, axis: int, op_name: str) -> int:
    """A dimension that must be static for the contrib op's attributes (head counts, sizes)."""
    dim = value.shape[axis] if value.shape is not None else None
    size = getattr(dim, "value", dim)
    if not isinstance(size, int):
        raise ValueError(f"{op_name}: dimension {axis} must be static, got {dim}")
    return size


@register_lowering("attention", "ort", label=LABEL)
def attention(q, k, v, mask, is_causal: bool, scale: float):
    """peakc::attention -> MultiHeadAttention (KV heads repeated for GQA, causal as a bias)."""
    bias = _mask_bias(q, k, mask, is_causal)
    return _multi_head_attention(q, k, v, bias, scale)


@register_lowering("attention_cache", "ort", label=LABEL)
def attention_cache(q, k, v, k_cache, v_cache, positions, scale: float):
    """peakc::attention_cache -> GroupQueryAttention reading the cache in place.

    GroupQueryAttention takes the cache as past_key/past_value [B, Hkv, T, D] and the new
    tokens as the last S of each sequence's seqlens_k + 1 tokens: this holds for peakc's
    Generator, whose new tokens sit at contiguous positions ending at positions[b, -1]
    (prefill from slot 0, then one token per step). Its present outputs are not used: the
    runtime writes new_k/new_v into the cache after the step, as with every backend. KV
    heads are shared by query-head groups inside the kernel (no repeat, no cache copy).
    """
    seqlens = op.Cast(op.ReduceMax(positions, op.Constant(value_ints=[1]), keepdims=0), to=6)
    total = op.Cast(op.Add(op.ReduceMax(positions, keepdims=0), op.Constant(value_int=1)), to=6)
    out, _, _ = GROUP_QUERY_ATTENTION(
        _to_bsd(q),
        _to_bsd(op.CastLike(k, q)),
        _to_bsd(op.CastLike(v, q)),
        op.CastLike(k_cache, q),
        op.CastLike(v_cache, q),
        seqlens,
        total,
        num_heads=static_dim(q, 1, "attention_cache"),
        kv_num_heads=static_dim(k, 1, "attention_cache"),
        scale=scale,
    )
    heads, dv = op.Shape(q, start=1, end=2), op.Shape(v, start=3, end=4)
    zero = op.Constant(value_ints=[0])
    out = op.Reshape(out, op.Concat(zero, zero, heads, dv, axis=0))
    return op.Transpose(out, perm=[0, 2, 1, 3])


def attention_cache_mha(q, k, v, k_cache, v_cache, positions, scale: float):
    """peakc::attention_cache for any positions (not only contiguous ones): ScatterElements
    into a copy of the cache, then MultiHeadAttention with a position bias and KV heads
    repeated. Not registered: the GroupQueryAttention form above is; a variant benchmark can
    register this one in its place (`register_lowering("attention_cache", "ort")`)."""
    kv_shape = op.Shape(k)
    slots = op.Expand(op.Unsqueeze(positions, op.Constant(value_ints=[1, 3])), kv_shape)
    keys = op.ScatterElements(k_cache, slots, op.CastLike(k, k_cache), axis=2)
    values = op.ScatterElements(v_cache, slots, op.CastLike(v, v_cache), axis=2)
    cache_len = op.Shape(k_cache, start=2, end=3)
    slot_ids = op.Range(op.Constant(value_int=0), op.Squeeze(cache_len), op.Constant(value_int=1))
    visible = op.LessOrEqual(slot_ids, op.Unsqueeze(positions, op.Constant(value_ints=[2])))
    bias = _bool_to_bias(op.Unsqueeze(visible, op.Constant(value_ints=[1])), q)  # [B,1,S,T]
    return _multi_head_attention(q, op.CastLike(keys, q), op.CastLike(values, q), bias, scale)


def _multi_head_attention(q, k, v, bias, scale: float):
    """q [B,H,S,D], k/v [B,Hkv,T,D] -> MultiHeadAttention on [B,S,H*D]; returns [B,H,S,Dv]."""
    heads = op.Shape(q, start=1, end=2)
    kv_heads = op.Shape(k, start=1, end=2)
    groups = op.Div(heads, kv_heads)
    k = _repeat_heads(k, groups)
    v = _repeat_heads(v, groups)
    out = MULTI_HEAD_ATTENTION(
        _to_bsd(q),
        _to_bsd(k),
        _to_bsd(v),
        None,
        None,
        bias,
        num_heads=static_dim(q, 1, "attention"),
        scale=scale,
    )
    dv = op.Shape(v, start=3, end=4)
    zero = op.Constant(value_ints=[0])
    out = op.Reshape(out, op.Concat(zero, zero, heads, dv, axis=0))
    return op.Transpose(out, perm=[0, 2, 1, 3])


def _repeat_heads(x, groups):
    """[B, Hkv, T, D] -> [B, Hkv*groups, T, D], head h reading kv head h // groups."""
    expanded = op.Expand(
        op.Unsqueeze(x, op.Constant(value_ints=[2])),
        op.Concat(op.Shape(x, start=0, end=2), groups, op.Shape(x, start=2, end=4), axis=0),
    )
    zero = op.Constant(value_ints=[0])
    minus = op.Constant(value_ints=[-1])
    return op.Reshape(expanded, op.Concat(zero, minus, op.Shape(x, start=2, end=4), axis=0))


def _to_bsd(x):
    """[B, H, S, D] -> [B, S, H*D]."""
    zero = op.Constant(value_ints=[0])
    minus = op.Constant(value_ints=[-1])
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Concat(zero, zero, minus, axis=0))


def _mask_bias(q, k, mask, is_causal: bool):
    """The additive attention bias [B|1, H|1, S, T] for a mask and/or causality, or None."""
    bias = None
    if mask is not None:
        bias = _bool_to_bias(mask, q) if mask.dtype == 9 or str(mask.dtype) == "BOOL" else mask
    if is_causal:
        seq = op.Shape(q, start=2, end=3)
        total = op.Shape(k, start=2, end=3)
        one = op.Constant(value_int=1)
        rows = op.Range(op.Constant(value_int=0), op.Squeeze(seq), one)
        cols = op.Range(op.Constant(value_int=0), op.Squeeze(total), one)
        causal = op.LessOrEqual(cols, op.Unsqueeze(rows, op.Constant(value_ints=[1])))
        causal_bias = _bool_to_bias(op.Unsqueeze(causal, op.Constant(value_ints=[0, 1])), q)
        bias = causal_bias if bias is None else op.Add(bias, causal_bias)
    return bias


def _bool_to_bias(visible, like):
    """True (attend) -> 0, False -> a large negative number, in like's dtype."""
    zero = op.CastLike(op.Constant(value_float=0.0), like)
    low = op.CastLike(op.Constant(value_float=-1e30), like)
    return op.Where(visible, zero, low)


@register_lowering("gelu", "ort", label=LABEL)
def gelu(x, bias, approximate: str):
    """peakc::gelu -> FastGelu (tanh, optional bias), BiasGelu (erf with bias), Gelu (erf)."""
    if approximate == "tanh":
        return FAST_GELU(x, bias) if bias is not None else FAST_GELU(x)
    if bias is not None:
        return BIAS_GELU(x, bias)
    return GELU(x)


@register_lowering("glu", "ort", label=LABEL)
def glu(gate, up, activation: str):
    """peakc::glu -> act(gate) * up with standard ops."""
    return op.Mul(_activation(gate, activation), up)


@register_lowering("linear_act", "ort", label=LABEL)
def linear_act(x, weight, bias, activation: str):
    """peakc::linear_act -> MatMul(x, W^T) (+ bias) then the activation."""
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, bias)
    return _activation(y, activation)


@register_lowering("matmul_nbits", "ort", label=LABEL)
def matmul_nbits(
    x, b, scales, zero_points, perm, bias, bits: int, block_size: int, in_features: int
):
    """peakc_ort::matmul_nbits (a linear_wq re-expressed by matmul_nbits.py) -> MatMulNBits,
    after a Gather of the input columns for act-order weights, then + bias."""
    if perm is not None:
        x = op.Gather(x, perm, axis=-1)
    y = MATMUL_NBITS(
        x,
        b,
        scales,
        zero_points,
        K=in_features,
        N=static_dim(b, 0, "matmul_nbits"),
        bits=bits,
        block_size=block_size,
    )
    return op.Add(y, bias) if bias is not None else y


def _activation(x, activation: str):
    if activation == "none":
        return x
    if activation == "relu":
        return op.Relu(x)
    if activation == "silu":
        return op.Mul(x, op.Sigmoid(x))
    if activation == "gelu":
        return GELU(x)
    if activation == "gelu_tanh":
        return FAST_GELU(x)
    raise ValueError(f"unknown activation '{activation}'")


def _ones_like_last(x):
    return op.Expand(op.CastLike(op.Constant(value_float=1.0), x), op.Shape(x, start=-1))


@register_lowering("grouped_mm", "ort", label=LABEL)
def grouped_mm(x, weight, offsets):
    """peakc::grouped_mm (routed experts: x [T, K] sorted by expert, weight [E, K, N], offsets
    [E] cumulative token counts) with standard ops: every expert's product of every token
    ([E, T, N], one batched MatMul), then each token's row of its own expert (GatherElements);
    rows past the last offset are zeros, as in the reference. E/top_k times the FLOPs of a
    grouped GEMM, with no data-dependent shapes."""
    experts = static_dim(weight, 0, "grouped_mm")
    tokens = op.Range(
        op.Constant(value_int=0), op.Squeeze(op.Shape(x, start=0, end=1)), op.Constant(value_int=1)
    )
    starts = op.Unsqueeze(op.Cast(offsets, to=onnx.TensorProto.INT64), op.Constant(value_ints=[0]))
    after = op.GreaterOrEqual(op.Unsqueeze(tokens, op.Constant(value_ints=[1])), starts)  # [T, E]
    expert = op.ReduceSum(
        op.Cast(after, to=onnx.TensorProto.INT64), op.Constant(value_ints=[1]), keepdims=0
    )
    routed = op.Less(expert, op.Constant(value_int=experts))
    expert = op.Min(expert, op.Constant(value_int=experts - 1))
    every = op.MatMul(op.Unsqueeze(x, op.Constant(value_ints=[0])), weight)  # [E, T, N]
    index = op.Expand(
        op.Unsqueeze(expert, op.Constant(value_ints=[0, 2])),
        op.Concat(op.Constant(value_ints=[1]), op.Shape(every, start=1), axis=0),
    )
    chosen = op.Squeeze(op.GatherElements(every, index, axis=0), op.Constant(value_ints=[0]))
    zero = op.CastLike(op.Constant(value_float=0.0), chosen)
    return op.Where(op.Unsqueeze(routed, op.Constant(value_ints=[1])), chosen, zero)
