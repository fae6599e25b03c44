"""A decode-step program at a fixed batch and one token: the exported decoder with static input
shapes, its shape computations constant-folded away, so that ONNX Runtime places every node on
the CUDA provider and can capture the step as a CUDA graph.

The exported decoder keeps batch and sequence symbolic; its Shape/Gather/Concat arithmetic on
them runs on the CPU provider, and ORT refuses CUDA graphs for a session with any CPU node.
Here the `batch` and `seq` dims of every value become `batch` and 1, stale inferred shapes are
dropped, and onnxscript's optimizer (constant folding with ONNX shape inference) folds the
shape arithmetic into initializers. `shape_dependent_nodes` lists what would still compute a
shape at run time; the lowering refuses a specialization that leaves any. A decode program
serves decode_binding.SharedCacheStep only, which reads the logits and the shared buffers: the
other outputs (new_k/new_v, copies of what GroupQueryAttention wrote into the buffers) are
dropped with the nodes only they read (the rotated k once GroupQueryAttention rotates).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import onnxscript.optimizer

from peakc.backends.ort.shared_cache import read_layout
from peakc.errors import PeakcError

BATCH_DIM, SEQ_DIM = "batch", "seq"  # the exporter's names (peakc.models.kv_cache dims)
SHAPE_OPS = ("Shape", "Size")
# op -> input slots that ONNX Runtime's CUDA kernels read on the host (shape-like inputs)
HOST_INPUTS = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "ConstantOfShape": (0,),
    "Slice": (1, 2, 3, 4),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "ReduceMax": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "Split": (1,),
    "Pad": (1, 2, 3),
    "TopK": (1,),
    "Resize": (1, 2, 3),
}


def decode_program_name(program: str, batch: int) -> str:
    """File name of the static decode program for `batch` (beside `program`.onnx)."""
    return f"{program}.decode_b{batch}.onnx"


def specialize_decode(path: Path, batch: int, out: Path) -> list[str]:
    """Write `path`'s decoder specialized to `batch` sequences of one token to `out` (same
    folder: initializers in external data stay references to the same data file). Returns
    the value names whose shape is still not static (outputs included), empty when all are."""
    if out.parent != path.parent:
        raise PeakcError(f"static decode program {out.name} must be written beside {path.name}")
    model = ir.load(path)
    drop_cache_copies(model)
    static_shapes(model, {BATCH_DIM: batch, SEQ_DIM: 1})
    onnxscript.optimizer.optimize_ir(model)
    left = shape_dependent_nodes(model)
    if left:
        raise PeakcError(
            f"{path.name} at batch {batch}: shape computations left after constant folding: "
            + ", ".join(left[:5])
        )
    for output, shape in output_shapes(model, batch).items():
        output.shape = shape
    ir.save(model, out)
    return [v.name for v in model.graph.outputs if not _is_static(v.shape)]


def drop_cache_copies(model: ir.Model) -> None:
    """Keep output 0 (logits) and the shared buffers' present outputs; the optimizer then
    removes what only the dropped outputs read. No change without a shared cache."""
    layout = read_layout(dict(model.metadata_props))
    if layout is None:
        return
    presents = {b.present for b in layout.buffers}
    kept = [v for i, v in enumerate(model.graph.outputs) if i == 0 or v.name in presents]
    model.graph.outputs.clear()
    model.graph.outputs.extend(kept)


def static_shapes(model: ir.Model, sizes: dict[str, int]) -> None:
    """Replace the named symbolic dims of every graph value by their size; values whose shape
    keeps another symbolic dim lose it (shape inference fills them again)."""
    values = list(model.graph.inputs) + [o for n in model.graph for o in n.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = [sizes.get(d.value, d) if isinstance(d, ir.SymbolicDim) else d for d in value.shape]
        value.shape = ir.Shape(dims) if all(isinstance(d, int) for d in dims) else None
    for value in model.graph.inputs:
        if value.shape is None:
            raise PeakcError(f"decoder input {value.name} has a dim other than batch or seq")


def output_shapes(model: ir.Model, batch: int) -> dict[ir.Value, ir.Shape]:
    """Static shapes for outputs inference left open: present_* take their past's shape."""
    inputs = {v.name: v for v in model.graph.inputs}
    shapes = {}
    for value in model.graph.outputs:
        past = value.name.replace("present_", "past_", 1)
        if not _is_static(value.shape) and past in inputs:
            shapes[value] = inputs[past].shape
    return shapes


def shape_dependent_nodes(model: ir.Model) -> list[str]:
    """Nodes that compute shapes at run time: Shape/Size, and nodes feeding a host-read input
    (a Reshape's shape, a Range's limits...) that is not a constant. Empty for a program that
    ONNX Runtime can run entirely on the CUDA provider."""
    found = []
    for node in model.graph:
        if node.op_type in SHAPE_OPS:
            found.append(f"{node.op_type} {node.name}")
            continue
        for slot in HOST_INPUTS.get(node.op_type, ()):
            if slot >= len(node.inputs) or node.inputs[slot] is None:
                continue
            value = node.inputs[slot]
            if value.const_value is None and ir.convenience.get_const_tensor(value) is None:
                found.append(f"{node.op_type} {node.name} (input {slot} computed at run time)")
    return found


def _is_static(shape: ir.Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)
