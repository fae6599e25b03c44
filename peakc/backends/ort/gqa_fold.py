"""GroupQueryAttention takes its rotary and its packed QKV itself: an ONNX rewrite after the
shared-cache rewrite (export.py), so the dynamic decoder and the static decode programs built
from it both get it.

The export feeds each GroupQueryAttention node q/k/v through
`Split -> Reshape/Transpose to BNSH -> RotaryEmbedding (q, k) -> Transpose/Reshape to BSD`.
The rewrite, per node (pattern, check, rewrite):

- rotary: q and k are RotaryEmbedding outputs over the whole head (R == D) with the same
  cos/sin caches and layout -> GroupQueryAttention gets the un-rotated q/k, `do_rotary=1`,
  `rotary_interleaved`, and cos_cache/sin_cache [max_len, D/2] as initializers. The tables are
  the export's cos/sin subgraph (a function of the `positions` input alone, checked: a gathered
  table for demo:llama, Cos/Sin of positions * inv_freq for transformers' Llama) evaluated at
  positions 0..max_len-1: contrib.rotary_embedding feeds RotaryEmbedding one cache row per
  token, so row p is position p's. GroupQueryAttention derives the rotary positions itself (first
  prompt: 0..S-1; later: seqlens_k[b] + 1 - S onwards), which equals peakc's positions under
  the Generator's layout that contrib.attention_cache already assumes (each sequence's tokens
  at contiguous slots from 0).
- packed QKV: q, k, v are outputs 0, 1, 2 of one Split of one value with sizes H*D, Hkv*D,
  Hkv*D (the horizontal fusion's output) -> that value is the query; key and value are absent.
  Otherwise q/k/v are passed in their [B, S, heads*D] form, without the transposes.

A node whose rotary cannot move (partial rotary, head dim not a multiple of 16, caches not
computable) is left as exported; the report says why. Without any rotary, q/k/v are still
rewired. Transpose pairs that cancel go, then nodes nobody reads. The rotated k stays
computed where a program output (new_k) reads it; static_decode.py drops those outputs from
the decode programs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from peakc.backends.ort.contrib import MS_DOMAIN
from peakc.backends.ort.shared_cache import PAST_KEY, remove_dead

QUERY, KEY, VALUE, COS_CACHE, SIN_CACHE = 0, 1, 2, 7, 8  # GroupQueryAttention input slots
TO_BNSH = (0, 2, 1, 3)
# ops the cos/sin subgraph may use (rotary_caches also checks that each row depends only on
# its own token's position: MatMul and Transpose could mix positions in general)
TABLE_OPS = {
    "MatMul",
    "Transpose",
    "Expand",
    "Slice",
    "Neg",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "CastLike",
    "Mul",
    "Div",
    "Add",
    "Sub",
    "Cos",
    "Sin",
    "Gather",
    "GatherND",
    "Reshape",
    "Identity",
    "Constant",
    "Shape",
    "Concat",
}


@dataclass
class GqaFoldReport:
    """What the rewrite did to the GroupQueryAttention nodes."""

    rotary_folded: int = 0  # nodes computing their rotary themselves (do_rotary=1)
    packed_qkv: int = 0  # nodes reading one packed QKV input
    not_folded: dict[str, str] = field(default_factory=dict)  # node -> why rotary stayed apart
    transposes_cancelled: int = 0


@dataclass
class QkvSources:
    """A GroupQueryAttention node's q/k/v in [B, S, heads*D] form before any rotary."""

    query: ir.Value
    key: ir.Value
    value: ir.Value
    rotary_q: ir.Node | None
    rotary_k: ir.Node | None


def fold_gqa(model: ir.Model, positions: str) -> GqaFoldReport:
    """Rewrite every GroupQueryAttention node (see the module docstring); `positions` is the
    graph input the rotary tables are indexed by."""
    report = GqaFoldReport()
    tables: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
    nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]
    for node in nodes:
        sources = match_qkv(node)
        if isinstance(sources, str):
            report.not_folded[node.name] = sources
            continue
        reason = check_rotary(node, sources)
        caches = None
        if reason is None:
            caches, reason = rotary_caches(model, node, sources, positions, tables)
        if reason is not None:
            report.not_folded[node.name] = reason
            if sources.rotary_q is not None or sources.rotary_k is not None:
                continue  # the node keeps its rotated inputs
        packed = packed_source(node, sources)
        if packed is not None:
            qkv = (packed, None, None)
        else:
            qkv = (sources.query, sources.key, sources.value)
        for slot, value in zip((QUERY, KEY, VALUE), qkv):
            node.replace_input_with(slot, value)
        report.packed_qkv += packed is not None
        if caches is not None:
            node.resize_inputs(max(len(node.inputs), SIN_CACHE + 1))
            node.replace_input_with(COS_CACHE, caches[0])
            node.replace_input_with(SIN_CACHE, caches[1])
            interleaved = sources.rotary_q.attributes.get_int("interleaved", 0)
            node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)
            node.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", interleaved)
            report.rotary_folded += 1
    remove_dead(model)  # first, so that only pairs something still reads are counted
    report.transposes_cancelled = cancel_transpose_pairs(model)
    remove_dead(model)
    return report


def match_qkv(node: ir.Node) -> QkvSources | str:
    """Pattern: each of q/k/v is Reshape(Transpose_0213(x)) with x = [RotaryEmbedding(]
    Transpose_0213(Reshape(bsd))[)]; the reason when a chain differs."""
    found = []
    for slot, name in ((QUERY, "q"), (KEY, "k"), (VALUE, "v")):
        bnsh = from_bsd(node.inputs[slot])
        if bnsh is None:
            return f"{name} is not Reshape(Transpose(x, 0,2,1,3))"
        rotary = None
        producer = bnsh.producer()
        if producer is not None and producer.op_type == "RotaryEmbedding":
            rotary = producer
            bnsh = rotary.inputs[0]
        elif producer is not None and producer.op_type == "Concat":
            partial = [i.producer() for i in producer.inputs if i is not None and i.producer()]
            if any(p.op_type == "RotaryEmbedding" for p in partial):
                return f"{name}: partial rotary ({rotary_width(producer)} of head dim " + (
                    f"{head_dim_of(bnsh) or '?'}; RotaryEmbedding on a slice, then Concat)"
                )
        bsd = to_bnsh_source(bnsh)
        if bsd is None or not same_last_dim(bsd, node.inputs[slot]):
            return f"{name} before rotary is not Transpose(Reshape([B,S,H*D]), 0,2,1,3)"
        found.append((bsd, rotary))
    (q, rq), (k, rk), (v, rv) = found
    if rv is not None:
        return "v goes through RotaryEmbedding"
    return QkvSources(q, k, v, rq, rk)


def rotary_width(concat: ir.Node) -> str:
    """The channels a partial rotary's RotaryEmbedding covers (its input's last dim)."""
    for value in concat.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "RotaryEmbedding":
            return str(head_dim_of(producer.inputs[0]) or "?")
    return "?"


def head_dim_of(value: ir.Value) -> int | None:
    """The static last dim of a [B, H, S, D] value, or None."""
    shape = value.shape
    dim = shape[-1] if shape is not None and len(shape) == 4 else None
    return dim if isinstance(dim, int) else None


def from_bsd(value: ir.Value | None) -> ir.Value | None:
    """x for value = Reshape(Transpose(x, perm 0,2,1,3)) (BNSH -> [B, S, H*D])."""
    reshape = value.producer() if value is not None else None
    if reshape is None or reshape.op_type != "Reshape":
        return None
    transpose = reshape.inputs[0].producer()
    if transpose is None or not is_transpose(transpose, TO_BNSH):
        return None
    return transpose.inputs[0]


def to_bnsh_source(value: ir.Value) -> ir.Value | None:
    """x for value = Transpose(Reshape(x, [B, S, H, D]), perm 0,2,1,3)."""
    transpose = value.producer()
    if transpose is None or not is_transpose(transpose, TO_BNSH):
        return None
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    return reshape.inputs[0]


def is_transpose(node: ir.Node, perm: tuple[int, ...]) -> bool:
    attr = node.attributes.get("perm")
    return node.op_type == "Transpose" and attr is not None and tuple(attr.value) == perm


def same_last_dim(a: ir.Value, b: ir.Value) -> bool:
    """Both rank 3 with the same static last dim (the H*D that GroupQueryAttention reads)."""
    if a.shape is None or b.shape is None or len(a.shape) != 3 or len(b.shape) != 3:
        return False
    return isinstance(a.shape[2], int) and a.shape[2] == b.shape[2]


def check_rotary(node: ir.Node, sources: QkvSources) -> str | None:
    """Why the rotary cannot move into the node, or None."""
    rq, rk = sources.rotary_q, sources.rotary_k
    if rq is None and rk is None:
        return "no RotaryEmbedding on q/k"
    if rq is None or rk is None:
        return "only one of q/k goes through RotaryEmbedding"
    if rq.inputs[2] is not rk.inputs[2] or rq.inputs[3] is not rk.inputs[3]:
        return "q and k rotate with different cos/sin caches"
    interleaved = [r.attributes.get_int("interleaved", 0) for r in (rq, rk)]
    if interleaved[0] != interleaved[1]:
        return "q and k use different rotary layouts"
    for rotary in (rq, rk):
        dim = head_dim_of(rotary.inputs[0])
        if rotary.attributes.get_int("rotary_embedding_dim", 0) not in (0, dim):
            return "rotary_embedding_dim is not the head dim"
        if rotary.attributes.get_float("scale", 1.0) != 1.0:
            return "RotaryEmbedding has a scale"
    dim = head_dim_of(rq.inputs[0])
    if not isinstance(dim, int) or dim % 16:
        return f"head dim {dim} is not a multiple of 16 (GroupQueryAttention's rotary)"
    cos = rq.inputs[2]
    half = cos.shape[-1] if cos.shape is not None and len(cos.shape) == 2 else None
    if not isinstance(half, int) or 2 * half != dim:
        return f"rotary covers {2 * half if isinstance(half, int) else '?'} of head dim {dim}"
    return None


def rotary_caches(
    model: ir.Model,
    node: ir.Node,
    sources: QkvSources,
    positions: str,
    tables: dict[tuple[int, int], tuple[ir.Value, ir.Value]],
) -> tuple[tuple[ir.Value, ir.Value] | None, str | None]:
    """The cos/sin initializers [max_len, D/2] in q's dtype (shared by nodes with the same
    caches), or the reason they cannot be built."""
    cos, sin = sources.rotary_q.inputs[2], sources.rotary_q.inputs[3]
    key = (id(cos), id(sin))
    if key in tables:
        return tables[key], None
    past = node.inputs[PAST_KEY]
    length = past.shape[2] if past is not None and past.shape is not None else None
    if not isinstance(length, int):
        return None, "the cache's max length is not static"
    for value in (cos, sin):
        reason = check_table_subgraph(value, positions)
        if reason is not None:
            return None, reason
    cos_table, sin_table = evaluate_tables(model, [cos, sin], positions, length)
    backwards = evaluate_tables(model, [cos, sin], positions, length, reverse=True)
    if not all(np.allclose(b[::-1], t) for b, t in zip(backwards, (cos_table, sin_table))):
        return None, "the rotary cache rows depend on other tokens' positions"
    dtype = sources.query.dtype
    if dtype is None:
        return None, "q has no known dtype for the cos/sin caches"
    values = []
    for name, table in (("cos_cache", cos_table), ("sin_cache", sin_table)):
        tensor = ir.tensor(table.astype(dtype.numpy()), name=f"gqa_{name}.{len(tables)}")
        value = ir.Value(name=tensor.name, shape=ir.Shape(table.shape), type=ir.TensorType(dtype))
        value.const_value = tensor
        model.graph.register_initializer(value)
        values.append(value)
    tables[key] = (values[0], values[1])
    return tables[key], None


def check_table_subgraph(value: ir.Value, positions: str) -> str | None:
    """The cos/sin cache must be computed from `positions` and constants by TABLE_OPS only."""
    todo, seen = [value], set()
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.is_graph_input():
            if current.name != positions:
                return f"the rotary cache reads graph input {current.name}"
            continue
        producer = current.producer()
        if producer is None:
            if current.const_value is None:
                return f"the rotary cache reads {current.name}, neither input nor constant"
            continue
        if producer.op_type not in TABLE_OPS:
            return f"the rotary cache is computed by {producer.op_type} {producer.name}"
        if producer.op_type == "Shape" and producer.inputs[0].is_graph_input():
            continue  # reads a graph input's shape only (an exporter takes `batch` from any)
        todo.extend(producer.inputs)
    return None


def evaluate_tables(
    model: ir.Model, values: list[ir.Value], positions: str, length: int, reverse: bool = False
) -> list[np.ndarray]:
    """The values' subgraph run by onnxruntime (CPU) on positions = [[0..length-1]] (or that
    reversed): one row per position."""
    import onnxruntime

    nodes, constants, todo, seen = [], {}, list(values), set()
    shaped: dict[str, ir.Value] = {}  # graph inputs the subgraph reads the shape of
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        if current.is_graph_input():
            if current.name != positions:
                shaped[current.name] = current
            continue
        seen.add(id(current))
        producer = current.producer()
        if producer is None:
            constants[current.name] = current.const_value
            continue
        nodes.append(producer)
        todo.extend(producer.inputs)
    order = {id(n): i for i, n in enumerate(model.graph)}
    position_dims = dict(
        zip([str(d) for d in positions_value(model, positions).shape], (1, length))
    )
    protos = []
    for node in sorted(set(nodes), key=lambda n: order[id(n)]):
        source = node.inputs[0] if node.op_type == "Shape" else None
        if source is not None and source.name in shaped:  # the shape, as a constant
            dims = [d if isinstance(d, int) else position_dims.get(str(d), 1) for d in source.shape]
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(dims))
            value = onnx.numpy_helper.from_array(np.array(dims[start:end], dtype=np.int64))
            protos.append(
                onnx.helper.make_node("Constant", [], [node.outputs[0].name], value=value)
            )
        else:
            protos.append(ir.serde.serialize_node(node))
    # read back as float32 (numpy has no bfloat16); the caller casts to q's dtype
    protos += [
        onnx.helper.make_node("Cast", [v.name], [f"{v.name}.f32"], to=onnx.TensorProto.FLOAT)
        for v in values
    ]
    graph = onnx.helper.make_graph(
        protos,
        "rotary_tables",
        [onnx.helper.make_tensor_value_info(positions, onnx.TensorProto.INT64, [1, length])],
        [onnx.helper.make_empty_tensor_value_info(f"{v.name}.f32") for v in values],
        initializer=[named_tensor(name, t) for name, t in constants.items()],
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = model.ir_version
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    steps = np.arange(length, dtype=np.int64)
    feed = {positions: (steps[::-1] if reverse else steps).reshape(1, length).copy()}
    return [np.asarray(t).reshape(length, -1) for t in session.run(None, feed)]


def positions_value(model: ir.Model, positions: str) -> ir.Value:
    """The graph input named `positions`."""
    return next(v for v in model.graph.inputs if v.name == positions)


def named_tensor(name: str, tensor: ir.TensorProtocol) -> onnx.TensorProto:
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = name  # the value's name (an initializer's tensor may carry another)
    return proto


def packed_source(node: ir.Node, sources: QkvSources) -> ir.Value | None:
    """The Split input when q, k, v are its outputs 0, 1, 2 along the last axis with sizes
    H*D, Hkv*D, Hkv*D; None otherwise."""
    split = sources.query.producer()
    if split is None or split.op_type != "Split" or len(split.outputs) != 3:
        return None
    if [sources.query, sources.key, sources.value] != list(split.outputs):
        return None
    packed = split.inputs[0]
    if packed.shape is None or len(packed.shape) != 3:
        return None
    if split.attributes.get_int("axis", 0) not in (2, -1):
        return None
    sizes = [v.shape[2] if v.shape is not None else None for v in split.outputs]
    heads = node.attributes.get_int("num_heads", 0)
    kv_heads = node.attributes.get_int("kv_num_heads", 0)
    dim = sizes[0] // heads if isinstance(sizes[0], int) and heads else None
    if dim is None or sizes != [heads * dim, kv_heads * dim, kv_heads * dim]:
        return None
    return packed


def cancel_transpose_pairs(model: ir.Model) -> int:
    """Transpose(Transpose(x, p), q) with q after p the identity -> x; returns how many."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        inner = node.inputs[0].producer()
        if inner is None or inner.op_type != "Transpose":
            continue
        p, q = inner.attributes.get("perm"), node.attributes.get("perm")
        if p is None or q is None or [p.value[i] for i in q.value] != list(range(len(p.value))):
            continue
        output = node.outputs[0]
        if output.is_graph_output() or not output.uses():
            continue
        output.replace_all_uses_with(inner.inputs[0])
        count += 1
    return count
