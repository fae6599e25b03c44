"""GroupQueryAttention's KV cache as shared past/present buffers: an ONNX rewrite after export.

ONNX Runtime's GroupQueryAttention spec: past_key/past_value are BNSH; when past and present
are the same buffer (past_present_share_buffer, detected by the kernels from equal pointers)
they have the cache's max length and the op writes the new tokens in place at slots
seqlens_k[b] + 1 - S .. seqlens_k[b]; otherwise past must hold exactly the past tokens
(total_sequence_length - S of them), which the CUDA kernel assumes when it concatenates
(the CPU kernel reads seqlens_k instead, so a max-length past without sharing only worked
there). total_sequence_length is an int32 scalar read on the host.

The export's GroupQueryAttention nodes read `Gather(k_cache, i)` (a copy of layer i) and a
total length computed on the device. The rewrite gives each node its own graph inputs
`past_key.i`/`past_value.i` [B, Hkv, T, D] and outputs `present_key.i`/`present_value.i`
(the runtime binds each pair to one buffer), and one host input `total_sequence_length`.
The original inputs k_cache/v_cache go away when nothing else reads them; the program's
original outputs stay. `SharedCacheLayout` (in the model's metadata) says how to call it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from peakc.errors import PeakcError

METADATA_KEY = "peakc.shared_kv_cache"
TOTAL_LENGTH = "total_sequence_length"
PAST_KEY, PAST_VALUE = 3, 4  # GroupQueryAttention input slots
TOTAL_INPUT = 6
PRESENT_KEY, PRESENT_VALUE = 1, 2  # output slots


@dataclass
class SharedBuffer:
    """One past/present pair: graph input `past` reads `source[index]` (or all of `source`
    when index is None) of the program's original inputs; `present` is bound to it too."""

    past: str
    present: str
    source: str
    index: int | None


@dataclass
class SharedCacheLayout:
    """How the rewritten program maps to the original call (inputs, outputs unchanged)."""

    original_inputs: list[str]
    positions: str  # the input the total length was computed from (max + 1)
    buffers: list[SharedBuffer] = field(default_factory=list)
    total_length: str = TOTAL_LENGTH

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SharedCacheLayout:
        data = json.loads(text)
        buffers = [SharedBuffer(**b) for b in data.pop("buffers")]
        return cls(buffers=buffers, **data)

    def keys(self) -> list[SharedBuffer]:
        return self.buffers[0::2]

    def values(self) -> list[SharedBuffer]:
        return self.buffers[1::2]


def share_gqa_cache(model: ir.Model) -> SharedCacheLayout | None:
    """Rewrite every GroupQueryAttention node to the shared-buffer form; None when the model
    has none. Raises a PeakcError naming the node when its past is not a cache input (layer)."""
    nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    if not nodes:
        return None
    layout = SharedCacheLayout(
        original_inputs=[v.name for v in model.graph.inputs],
        positions=upstream_input(nodes[0].inputs[TOTAL_INPUT], nodes[0]),
    )
    total = ir.Value(name=TOTAL_LENGTH, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT32))
    for layer, node in enumerate(nodes):
        for slot, out_slot, kind in (
            (PAST_KEY, PRESENT_KEY, "key"),
            (PAST_VALUE, PRESENT_VALUE, "value"),
        ):
            source, index = cache_source(node, slot)
            past = ir.Value(
                name=f"past_{kind}.{layer}",
                shape=ir.Shape(node.inputs[slot].shape),
                type=node.inputs[slot].type,
            )
            model.graph.inputs.append(past)
            node.replace_input_with(slot, past)
            present = node.outputs[out_slot]
            present.name = f"present_{kind}.{layer}"
            present.shape = past.shape
            present.type = past.type
            model.graph.outputs.append(present)
            layout.buffers.append(SharedBuffer(past.name, present.name, source, index))
        node.replace_input_with(TOTAL_INPUT, total)
    model.graph.inputs.append(total)
    remove_dead(model)
    for source in {b.source for b in layout.buffers if b.index is not None}:
        first = next(b.past for b in layout.buffers if b.source == source)
        reroute_shapes(model, source, first)
    remove_dead(model)
    model.metadata_props[METADATA_KEY] = layout.to_json()
    return layout


def cache_source(node: ir.Node, slot: int) -> tuple[str, int | None]:
    """The graph input (and layer index) a GroupQueryAttention past input reads: the input
    itself, or Gather(input, constant i, axis=0), through Cast/CastLike/Identity."""
    value = node.inputs[slot]
    while value.producer() is not None and value.producer().op_type in (
        "Cast",
        "CastLike",
        "Identity",
    ):
        value = value.producer().inputs[0]
    producer = value.producer()
    if producer is None and value.is_graph_input():
        return value.name, None
    if producer is not None and producer.op_type == "Gather":
        data, indices = producer.inputs
        axis = producer.attributes.get_int("axis", 0)
        constant = ir.convenience.get_const_tensor(indices)
        if data.is_graph_input() and axis == 0 and constant is not None and constant.size == 1:
            return data.name, int(constant.numpy().reshape(()))
    raise PeakcError(
        f"GroupQueryAttention node {node.name}: past input {slot} is not a cache graph input "
        "or a constant layer of one (cannot share its buffer with present)"
    )


def upstream_input(value: ir.Value, node: ir.Node) -> str:
    """The first graph input found walking up from `value` (the total length's positions)."""
    todo = [value]
    while todo:
        current = todo.pop(0)
        if current is None:
            continue
        if current.is_graph_input():
            return current.name
        if current.producer() is not None:
            todo.extend(current.producer().inputs)
    raise PeakcError(
        f"GroupQueryAttention node {node.name}: its total_sequence_length reads no graph input"
    )


def reroute_shapes(model: ir.Model, source: str, layer: str) -> None:
    """Shape(source [L, ...]) read elsewhere (batch size etc.) -> the same from a layer's
    buffer [...] (with the static L in front when the slice starts at 0), so the stacked
    cache input can go."""
    inputs = {v.name: v for v in model.graph.inputs}
    if source not in inputs:
        return  # nothing but the layers read it: already gone
    stacked, single = inputs[source], inputs[layer]
    for use in list(stacked.uses()):
        node = use.node
        if node.op_type != "Shape":
            raise PeakcError(
                f"cache input {source} is still read by {node.op_type} node {node.name} after "
                "its layers became shared buffers"
            )
        rank = len(stacked.shape)
        start = node.attributes.get_int("start", 0) % (rank + 1)
        end = node.attributes.get_int("end", rank)
        end = end + rank if end < 0 else min(end, rank)
        tail = ir.node("Shape", [single], {"start": max(start - 1, 0), "end": end - 1})
        nodes = [tail]
        result = tail.outputs[0]
        if start == 0:
            layers = ir.tensor([stacked.shape[0]], dtype=ir.DataType.INT64)
            head = ir.node("Constant", [], {"value": layers})
            concat = ir.node("Concat", [head.outputs[0], result], {"axis": 0})
            nodes += [head, concat]
            result = concat.outputs[0]
        model.graph.insert_before(node, nodes)
        node.outputs[0].replace_all_uses_with(result)


def remove_dead(model: ir.Model) -> None:
    """Drop nodes whose outputs nobody reads, then graph inputs nobody reads."""
    graph = model.graph
    outputs = set(id(v) for v in graph.outputs)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not v.uses() and id(v) not in outputs for v in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for value in list(graph.inputs):
        if not value.uses():
            graph.inputs.remove(value)


def read_layout(metadata: dict[str, str]) -> SharedCacheLayout | None:
    """The layout stored by share_gqa_cache in a model's metadata, or None."""
    text = metadata.get(METADATA_KEY)
    return SharedCacheLayout.from_json(text) if text else None
