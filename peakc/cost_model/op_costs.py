"""Per-op FLOP and byte rules: what one node must compute and move, from its shapes and dtypes.

A rule maps an FX node to an OpCost. Rules are keyed by op name (`aten.linear`,
`peakc.rms_norm`); a pass that adds a peakc op declares its cost with
`@register_cost_rule("peakc.<name>")`. Ops with no rule are costed as memory-bound
elementwise kernels and the estimate lists them, so nothing is guessed silently.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from peakc.errors import PeakcError


@dataclass
class OpCost:
    """What one node costs: FLOPs, bytes moved, which kernel family, and in which dtype."""

    flops: float
    bytes: float
    kind: str  # "gemm" | "attention" | "memory" | "free" (views: no kernel)
    dtype: str = "fp32"
    rule: str = ""
    op_class: str = "elementwise"  # which bandwidth curve (hardware.OP_CLASSES) applies
    kernels: int = 1  # kernels eager PyTorch launches for this node
    # Bytes the kernel's lanes cover per byte it needs (>= 1): a row-wise kernel that maps a
    # row onto power-of-two lanes leaves the rest idle (`lane_padding`).
    padding: float = 1.0

    @property
    def lane_bytes(self) -> float:
        """Bytes as the kernel's lanes see them: the bandwidth curve's size axis."""
        return self.bytes * self.padding


# Kernels eager PyTorch launches for one node of these ops (others: one; views: none). The
# calibration counts them on its device (profile.eager_kernels), which takes precedence.
EAGER_KERNELS = {
    "aten.rms_norm": 1,
    "aten.layer_norm": 1,
    "aten.var_mean": 1,
    "aten.scaled_dot_product_attention": 1,
    "aten.native_layer_norm": 1,
}


@dataclass
class CostContext:
    """Phase settings rules may read: attention over a KV cache of `kv_len` tokens (decode)."""

    kv_len: int | None = None


Rule = Callable[[fx.Node, CostContext], OpCost]
COST_RULES: dict[str, Rule] = {}

DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int8: "int8",
    torch.uint8: "int8",
    torch.float8_e4m3fn: "fp8",
    torch.float8_e5m2: "fp8",
}


def register_cost_rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: `rule(node, ctx) -> OpCost` costs nodes whose op name is one of `names`."""

    def wrap(rule: Rule) -> Rule:
        for name in names:
            COST_RULES[name] = rule
        return rule

    return wrap


def op_name(target: object) -> str:
    """`aten.linear`, `peakc.rms_norm`, `getitem`: the key cost rules are registered under."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.replace("::", ".")
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def node_cost(node: fx.Node, ctx: CostContext) -> OpCost:
    """The OpCost of a call node; a PeakcError naming the node when its shapes are unknown."""
    name = op_name(node.target)
    if name in FREE_OPS:
        return OpCost(0.0, 0.0, "free", rule="view")
    _require_shapes(node, name)
    rule = COST_RULES.get(name)
    if rule is None:
        cost = elementwise(node, ctx)
        cost.rule = "generic"
    else:
        cost = rule(node, ctx)
        cost.rule = cost.rule or name
    if cost.kind == "free":
        cost.kernels = 0
    elif name in EAGER_KERNELS:
        cost.kernels = EAGER_KERNELS[name]
    return cost


# --- shapes ---------------------------------------------------------------------------------


def val(node: object) -> torch.Tensor | None:
    """The fake tensor recorded for a node (or None for non-tensor args)."""
    if isinstance(node, fx.Node):
        v = node.meta.get("val")
        return v if isinstance(v, torch.Tensor) else None
    return None


def nbytes(t: torch.Tensor | None) -> float:
    return float(t.numel() * t.element_size()) if t is not None else 0.0


def dtype_name(t: torch.Tensor) -> str:
    return DTYPE_NAMES.get(t.dtype, "fp32")


def _tensor_inputs(node: fx.Node) -> list[torch.Tensor]:
    return [v for v in (val(a) for a in node.all_input_nodes) if v is not None]


def _require_shapes(node: fx.Node, name: str) -> None:
    out = node.meta.get("val")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if out is None or not all(isinstance(o, torch.Tensor) or o is None for o in outs):
        raise PeakcError(
            f"node '{node.name}' ({name}): output shape unknown (no meta['val']); "
            "run graph.propagate_meta() before estimating"
        )
    for o in outs:
        if isinstance(o, torch.Tensor) and not all(isinstance(d, int) for d in o.shape):
            raise PeakcError(
                f"node '{node.name}' ({name}): shape {list(o.shape)} is symbolic; "
                "estimate a graph captured at a fixed shape"
            )
    for arg in node.all_input_nodes:
        if arg.op != "get_attr" and arg.meta.get("val") is None:
            raise PeakcError(f"node '{node.name}' ({name}): shape of input '{arg.name}' unknown")


def _out_bytes(node: fx.Node) -> float:
    out = node.meta.get("val")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(nbytes(o) for o in outs if isinstance(o, torch.Tensor))


def _out_numel(node: fx.Node) -> float:
    out = node.meta.get("val")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return float(sum(o.numel() for o in outs if isinstance(o, torch.Tensor)))


# --- rules ----------------------------------------------------------------------------------

FREE_OPS = {
    "aten.view",
    "aten._unsafe_view",
    "aten.reshape",
    "aten.permute",
    "aten.transpose",
    "aten.t",
    "aten.expand",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.slice",
    "aten.select",
    "aten.split",
    "aten.split_with_sizes",
    "aten.unbind",
    "aten.alias",
    "aten.detach",
    "aten.as_strided",
    "aten.chunk",
    "aten.narrow",
    "aten._reshape_alias",
    "aten.lift_fresh",
    "getitem",
    "aten.sym_size",
    "aten._assert_tensor_metadata",
}

REDUCTIONS = {
    "aten.mean",
    "aten.sum",
    "aten.amax",
    "aten.amin",
    "aten.max",
    "aten.min",
    "aten.var",
    "aten.var_mean",
    "aten.argmax",
    "aten.prod",
    "aten.cumsum",
}

ELEMENTWISE_FLOPS = {
    "aten.silu": 4.0,
    "aten.gelu": 8.0,
    "aten.rsqrt": 2.0,
    "aten.pow": 1.0,
    "aten.exp": 2.0,
    "aten.tanh": 4.0,
    "aten.sigmoid": 4.0,
}


def elementwise(node: fx.Node, ctx: CostContext) -> OpCost:
    """Read every tensor input once, write the output once; FLOPs per output element."""
    ins = _tensor_inputs(node)
    moved = sum(nbytes(t) for t in ins) + _out_bytes(node)
    name = op_name(node.target)
    per = ELEMENTWISE_FLOPS.get(name, 1.0)
    out = val(node)
    if name in REDUCTIONS:
        op_class = "reduction"
    else:
        op_class = "strided" if reads_strided(node) else "elementwise"
    return OpCost(
        per * _out_numel(node),
        moved,
        "memory",
        dtype_name(out) if out is not None else "fp32",
        op_class=op_class,
    )


def reads_strided(node: fx.Node) -> bool:
    """True when an input is a non-contiguous view or is broadcast to the output's size.

    Such an elementwise kernel cannot use contiguous vectorised loads and runs at a lower
    bandwidth; so does a cat along an inner dim. The recorded fake tensors carry the
    strides, so the graph decides.
    """
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return False
    ins = _tensor_inputs(node)
    if any(not t.is_contiguous() for t in ins):
        return True
    if op_name(node.target) == "aten.cat":
        return _cat_writes_strided(node, out)
    return any(t.numel() < out.numel() for t in ins)


def _cat_writes_strided(node: fx.Node, out: torch.Tensor) -> bool:
    """A cat along an inner dim writes each input into a strided slice of the output."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = dim % out.dim() if out.dim() else 0
    outer = 1
    for size in out.shape[:dim]:
        outer *= size
    return outer > 1


for _name in (
    "aten.add",
    "aten.sub",
    "aten.mul",
    "aten.div",
    "aten.neg",
    "aten.pow",
    "aten.rsqrt",
    "aten.sqrt",
    "aten.exp",
    "aten.silu",
    "aten.gelu",
    "aten.relu",
    "aten.tanh",
    "aten.sigmoid",
    "aten.where",
    "aten._to_copy",
    "aten.clone",
    "aten.copy",
    "aten.cat",
    "aten.contiguous",
    "aten.masked_fill",
    "aten.minimum",
    "aten.maximum",
    "aten.eq",
    "aten.ne",
    "aten.lt",
    "aten.gt",
    "aten.le",
    "aten.ge",
    "aten.abs",
    "aten.clamp",
    "aten.fill",
    "aten.zeros_like",
    "aten.ones_like",
    "aten.full",
    "aten.arange",
    "aten.triu",
    "aten.tril",
    "aten.index",
    "aten.cos",
    "aten.sin",
    "aten.floor",
    "aten.round",
    "aten.sign",
    "aten.reciprocal",
    "aten.bitwise_and",
    "aten.bitwise_or",
    "aten.logical_not",
    "aten.empty",
    *sorted(REDUCTIONS),
):
    COST_RULES[_name] = elementwise


@register_cost_rule("aten.linear")
def linear(node: fx.Node, ctx: CostContext) -> OpCost:
    """y = x W^T (+ b): 2*M*N*K FLOPs; reads x, W, b once and writes y."""
    x, w = val(node.args[0]), val(node.args[1])
    b = val(node.args[2]) if len(node.args) > 2 else None
    k, n = w.shape[-1], w.shape[0]
    m = x.numel() // k
    flops = 2.0 * m * n * k + (m * n if b is not None else 0)
    return OpCost(
        flops,
        nbytes(x) + nbytes(w) + nbytes(b) + _out_bytes(node),
        "gemm",
        dtype_name(x),
        op_class="gemm",
    )


@register_cost_rule("aten.mm", "aten.bmm", "aten.matmul", "aten.addmm", "aten.baddbmm")
def matmul(node: fx.Node, ctx: CostContext) -> OpCost:
    """Batched matrix products: 2 * (output elements) * K FLOPs; reads operands, writes out."""
    name = op_name(node.target)
    a_idx = 1 if name in ("aten.addmm", "aten.baddbmm") else 0
    a = val(node.args[a_idx])
    k = a.shape[-1]
    flops = 2.0 * _out_numel(node) * k
    return OpCost(
        flops,
        sum(nbytes(t) for t in _tensor_inputs(node)) + _out_bytes(node),
        "gemm",
        dtype_name(a),
        op_class="gemm",
    )


ATTENTION_OPS = ("aten.scaled_dot_product_attention", "peakc.attention")


@register_cost_rule(*ATTENTION_OPS)
def attention(node: fx.Node, ctx: CostContext) -> OpCost:
    """Fused attention: 2*B*H*Sq*Skv*(D+Dv) FLOPs (halved under a causal mask for prefill).

    Bytes: q, k, v and the output once (a flash kernel keeps scores on chip). In a decode
    estimate (`ctx.kv_len`), k and v are a cache of kv_len tokens of the model's kv heads.
    """
    q, k, v = (val(a) for a in node.args[:3])
    mask = val(node.args[3]) if len(node.args) > 3 else val(node.kwargs.get("attn_mask"))
    at = 4 if op_name(node.target) == "peakc.attention" else 5  # is_causal's position
    causal = bool(node.args[at]) if len(node.args) > at else bool(node.kwargs.get("is_causal"))
    sq, d, dv, skv = q.shape[-2], q.shape[-1], v.shape[-1], k.shape[-2]
    b = q.shape[0] if q.dim() == 4 else 1
    h = q.numel() // (b * sq * d)
    kv_bytes = nbytes(k) + nbytes(v)
    if ctx.kv_len is not None:
        skv = ctx.kv_len
        kv_heads = kv_heads_of(node)
        kv_bytes = b * kv_heads * skv * (d + dv) * k.element_size()
        causal = False
    pairs = float(sq * skv)
    if causal and sq > 1:
        pairs = sq * (skv + 1) / 2.0 if sq == skv else sq * skv - sq * (sq - 1) / 2.0
    flops = 2.0 * b * h * pairs * (d + dv)
    moved = nbytes(q) + kv_bytes + nbytes(mask) + _out_bytes(node)
    return OpCost(flops, moved, "attention", dtype_name(q), op_class="attention")


SHAPE_OPS = {
    "aten.view",
    "aten._unsafe_view",
    "aten.reshape",
    "aten.clone",
    "aten.expand",
    "aten.unsqueeze",
    "aten.permute",
    "aten.transpose",
    "aten.contiguous",
    "aten.repeat_interleave",
    "aten.repeat",
}


def kv_heads_of(node: fx.Node) -> int:
    """Key heads an attention node reads before grouped-query expansion (GQA), from the graph."""
    k = node.args[1]
    heads = [val(k).shape[1]]
    enable_gqa = node.kwargs.get("enable_gqa", False)
    while isinstance(k, fx.Node) and not enable_gqa:
        v = val(k)
        if v is not None and v.dim() == 4:
            heads.append(v.shape[1])
        if k.op != "call_function" or op_name(k.target) not in SHAPE_OPS:
            break
        k = k.args[0]
    return min(heads)


@register_cost_rule("aten.embedding")
def embedding(node: fx.Node, ctx: CostContext) -> OpCost:
    """A gather: read one table row per index, write it; read the indices."""
    out = _out_bytes(node)
    return OpCost(
        0.0, 2 * out + nbytes(val(node.args[1])), "memory", dtype_name(val(node)), op_class="gather"
    )


MAX_LANES = 4096  # elements one row-wise block covers per pass; wider rows loop over it


def lane_padding(width: int) -> float:
    """Lanes a row of `width` occupies over `width`: rows map onto power-of-two lanes.

    GPU softmax kernels give a row a power-of-two number of lanes (a warp's or a block's
    threads times a vector width), so a 1536-wide row keeps 2048 lanes busy-or-idle.
    Rows wider than MAX_LANES loop over full passes.
    """
    if width <= 0:
        return 1.0
    if width <= MAX_LANES:
        lanes = 1 << (width - 1).bit_length()
    else:
        lanes = -(-width // MAX_LANES) * MAX_LANES
    return lanes / width


@register_cost_rule("aten._softmax", "aten.softmax", "aten._log_softmax", "aten.log_softmax")
def softmax(node: fx.Node, ctx: CostContext) -> OpCost:
    """One read, one write; about five FLOPs per element (max, sub, exp, sum, div).

    Its bandwidth depends on the row width (the softmax dim), not only on bytes: the cost
    carries the row's `lane_padding`, and the softmax curve is keyed by lane bytes.
    """
    x = val(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    width = x.shape[dim] if x.dim() else 1
    return OpCost(
        5.0 * x.numel(),
        nbytes(x) + _out_bytes(node),
        "memory",
        dtype_name(x),
        op_class="softmax",
        padding=lane_padding(width),
    )


@register_cost_rule(
    "aten.layer_norm",
    "aten.native_layer_norm",
    "aten.rms_norm",
    "peakc.rms_norm",
    "peakc.layer_norm",
    "peakc.skip_rms_norm",
    "peakc.skip_layer_norm",
)
def norm(node: fx.Node, ctx: CostContext) -> OpCost:
    """A fused norm (with its residual add): read inputs once, write outputs; ~5 FLOPs each."""
    x = val(node.args[0])
    moved = sum(nbytes(t) for t in _tensor_inputs(node)) + _out_bytes(node)
    return OpCost(5.0 * x.numel(), moved, "memory", dtype_name(x), op_class="norm")


@register_cost_rule("peakc.linear_act")
def linear_act(node: fx.Node, ctx: CostContext) -> OpCost:
    """A linear with its activation: the GEMM (its bias in the epilogue), then one elementwise
    kernel that reads and writes its output (the eager reference and the triton lowering both
    run two kernels; "none" is the GEMM alone)."""
    cost = linear(node, ctx)
    activation = node.args[3] if len(node.args) > 3 else node.kwargs.get("activation")
    if activation != "none":
        cost.flops += 4.0 * _out_numel(node)
        cost.bytes += 2 * _out_bytes(node)
        cost.kernels = 2
    return cost


@register_cost_rule("peakc.attention_cache")
def attention_cache(node: fx.Node, ctx: CostContext) -> OpCost:
    """New tokens attend over a KV cache of T slots: reads q, the new k/v and the whole cache,
    or in a decode estimate (`ctx.kv_len`) its first kv_len slots, the ones kernels read."""
    q, k_cache, v_cache = val(node.args[0]), val(node.args[3]), val(node.args[4])
    b, h, s, d = q.shape
    slots, dv = k_cache.shape[-2], v_cache.shape[-1]
    moved = sum(nbytes(t) for t in _tensor_inputs(node)) + _out_bytes(node)
    if ctx.kv_len is not None and ctx.kv_len < slots:
        moved -= (nbytes(k_cache) + nbytes(v_cache)) * (1 - ctx.kv_len / slots)
        slots = ctx.kv_len
    flops = 2.0 * b * h * s * slots * (d + dv)
    return OpCost(flops, moved, "attention", dtype_name(q), op_class="attention")


for _name in ("peakc.rotary_embedding", "peakc.gelu", "peakc.glu"):
    COST_RULES[_name] = elementwise


def shape_of(node: fx.Node) -> str:
    """`bf16[1,16,64]` for reports."""
    v = val(node)
    if v is None:
        return "?"
    return f"{dtype_name(v)}[{','.join(str(s) for s in v.shape)}]"


def is_view(node: fx.Node) -> bool:
    """True when the node aliases its input and launches no kernel."""
    return node.op == "call_function" and op_name(node.target) in FREE_OPS


@register_cost_rule("peakc.linear_wq")
def linear_wq(node: fx.Node, ctx: CostContext) -> OpCost:
    """A linear on packed low-bit weights, costed as one kernel that reads them packed:
    2*M*N*K FLOPs; moves x, the packed weight, scales, zero points and y, at the Triton
    kernels' measured bandwidth (class "lowbit")."""
    return _compressed_linear(node, "lowbit")


@register_cost_rule("peakc.linear_sparse24")
def linear_sparse24(node: fx.Node, ctx: CostContext) -> OpCost:
    """A linear on a 2:4-compressed weight: the dense FLOPs (large batches run it dense or on
    sparse tensor cores at about that rate); moves x, values, metadata and y."""
    return _compressed_linear(node, "sparse24")


@register_cost_rule("peakc.linear_sparse24_wq")
def linear_sparse24_wq(node: fx.Node, ctx: CostContext) -> OpCost:
    """A linear on 2:4-compressed, quantized weights: as linear_sparse24, reading codes."""
    return _compressed_linear(node, "sparse24_lowbit")


def _compressed_linear(node: fx.Node, op_class: str) -> OpCost:
    """2*M*N*K FLOPs in x's dtype and every operand's bytes, in bandwidth class `op_class`."""
    x = val(node.args[0])
    out = val(node)
    k, n = x.shape[-1], out.shape[-1]
    m = x.numel() // k
    moved = sum(nbytes(t) for t in _tensor_inputs(node)) + _out_bytes(node)
    return OpCost(2.0 * m * n * k, moved, "gemm", dtype_name(x), op_class=op_class)


@register_cost_rule("peakc.linear_compressed", "peakc_triton.linear_compressed_ell")
def linear_compressed(node: fx.Node, ctx: CostContext) -> OpCost:
    """A linear on a dictionary-coded (QMoE) weight, one kernel reading it compressed (the code
    stream, or the Triton backend's sliced-ELL transcode): as linear_wq (class "lowbit")."""
    return _compressed_linear(node, "lowbit")


@register_cost_rule("peakc.grouped_mm")
def grouped_mm(node: fx.Node, ctx: CostContext) -> OpCost:
    """A MoE layer's routed experts on one stacked weight [E, K, N], one grouped GEMM: 2*T*N*K
    FLOPs for T routed token rows; moves x, y, the offsets and the share of the experts that
    can receive tokens, min(T, E) / E of the weight."""
    x, weight, offsets = (val(a) for a in node.args[:3])
    t, k = x.shape
    experts, n = weight.shape[0], weight.shape[2]
    share = min(t, experts) / experts if experts else 0.0
    moved = nbytes(x) + nbytes(offsets) + nbytes(weight) * share + _out_bytes(node)
    return OpCost(2.0 * t * n * k, moved, "gemm", dtype_name(x), op_class="gemm")


# where each grouped op keeps its group offsets (the experts' cumulative token counts)
_GROUP_OFFSETS_ARG = {"peakc.grouped_mm_compressed": 6, "peakc_triton.grouped_mm_compressed_ell": 4}


@register_cost_rule(*_GROUP_OFFSETS_ARG)
def grouped_mm_compressed(node: fx.Node, ctx: CostContext) -> OpCost:
    """A MoE layer's routed experts on one compressed stacked weight, one kernel: 2*T*N*K FLOPs
    for T routed token rows; moves x, y, the offsets and, of the compressed weight, the share
    of the E experts that can receive tokens, min(T, E) / E: an expert without tokens is never
    read (class "lowbit")."""
    x, out = val(node.args[0]), val(node)
    offsets_node = node.args[_GROUP_OFFSETS_ARG[op_name(node.target)]]
    offsets = val(offsets_node)
    t, k = x.shape
    n, experts = out.shape[-1], offsets.shape[0]
    coded = [a for a in node.all_input_nodes if a is not node.args[0] and a is not offsets_node]
    weight = sum(nbytes(val(a)) for a in coded)
    share = min(t, experts) / experts if experts else 0.0
    moved = nbytes(x) + nbytes(offsets) + weight * share + _out_bytes(node)
    return OpCost(2.0 * t * n * k, moved, "gemm", dtype_name(x), op_class="lowbit")
