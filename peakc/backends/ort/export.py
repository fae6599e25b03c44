"""The transformed Graph as an ONNX model: torch.onnx's dynamo exporter with peakc's
contrib-op translations, onnxscript's optimizer for cleanup, then the ONNX checker.

Weights are initializers in one external data file next to the model (`<model>.onnx.data`).
Each peakc op is lowered as the registry says (`register_lowering(op, "ort")` in contrib.py
and matmul_nbits.py); an op without an ort lowering is exported through its reference
implementation; when that does not export either, the error names the op.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import onnxscript.optimizer
import torch
import torch.fx as fx

from peakc.backends.ort.contrib import CONTRIB_OPS, MS_DOMAIN
from peakc.backends.ort.gqa_fold import GqaFoldReport, fold_gqa
from peakc.backends.ort.matmul_nbits import MatMulNBitsContext, MatMulNBitsReport
from peakc.backends.ort.shared_cache import SharedCacheLayout, share_gqa_cache
from peakc.errors import PeakcError
from peakc.ir.capture import export_dynamic_shapes
from peakc.ir.graph import Graph
from peakc.ir.ops import OPS, find_op, lowering_for, lowerings, peakc_op_name

OPSET = 18  # the onnxscript opset contrib.py writes against
EXTERNAL_DATA_SUFFIX = ".data"
# Initializers past this size go to the external data file (smaller ones stay in the model);
# each starts at a page boundary, so onnxruntime and numpy can map it in place.
EXTERNAL_MIN_BYTES = 256
EXTERNAL_ALIGNMENT = 4096


@dataclass
class OnnxExport:
    """What the export wrote and measured."""

    path: Path
    external_data: bool
    ir_version: int
    opset: int
    contrib_ops: dict[str, int]
    reference_ops: list[str]  # peakc ops exported through their reference implementation
    nodes_before_cleanup: int
    nodes_after_cleanup: int
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    matmul_nbits: MatMulNBitsReport = field(default_factory=MatMulNBitsReport)
    shared_cache: SharedCacheLayout | None = None
    gqa_fold: GqaFoldReport | None = None  # None when the fold was off or had no GQA node


@functools.cache
def max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads (onnx may write newer)."""
    import onnxruntime

    for version in range(onnx.IR_VERSION, 6, -1):
        model = _probe_model(version)
        try:
            onnxruntime.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        except Exception:  # noqa: BLE001 - any load failure means this IR version is too new
            continue
        return version
    raise PeakcError(f"onnxruntime {onnxruntime.__version__} loads no ONNX IR version >= 7")


def translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """torch.onnx's custom translation table: every op the registry lowers for ort at emit
    time (peakc ops and the backend's own), by its torch overload."""
    return {
        find_op(name, "ort").overload: lowering.fn
        for name, lowering in lowerings("ort").items()
        if lowering.stage == "emit"
    }


@contextlib.contextmanager
def quiet_torch_onnx_registry():
    """torch.onnx warns once per torchvision op when torchvision is not installed (peakc needs
    none of them): those lines are kept out of peakc's output during the export."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def export_onnx(
    graph: Graph, path: Path, device: str = "cpu", fold_rotary: bool = True
) -> OnnxExport:
    """Export for `device` ('cpu' or 'cuda': its translations and MatMulNBits bit widths),
    clean up, share GroupQueryAttention's cache buffers, move rotary and packed QKV into
    GroupQueryAttention (`fold_rotary`), set the IR version, save (weights in one external
    data file) and check."""
    context = MatMulNBitsContext(device)
    gm, reference_ops = graph_for_export(graph, context)
    nbits_report = context.matmul_nbits
    table = translation_table()
    input_names = [n.name for n in graph.input_nodes()]
    output_names = [f"output_{i}" for i in range(len(graph.output_nodes()))]
    shapes = export_dynamic_shapes(graph.info.get("dynamic"), leading=0)
    try:
        with torch.no_grad(), quiet_torch_onnx_registry():
            program = torch.onnx.export(
                gm,
                tuple(graph.example_inputs),
                dynamo=True,
                custom_translation_table=table,
                dynamic_shapes=shapes,
                input_names=input_names,
                output_names=output_names,
                opset_version=OPSET,
                optimize=False,
                verbose=False,
            )
    except Exception as exc:
        raise export_error(exc, reference_ops) from exc
    model = program.model
    before = _count_nodes(model)
    onnxscript.optimizer.optimize_ir(model)  # constant folding, dead nodes, unused functions
    shared_cache = share_gqa_cache(model)  # past/present as one buffer per layer (GQA spec)
    folded = None
    if fold_rotary and shared_cache is not None:
        folded = fold_gqa(model, shared_cache.positions)  # do_rotary, packed QKV
    after = _count_nodes(model)
    model.ir_version = max_ir_version()
    model.opset_imports.setdefault(MS_DOMAIN, 1)  # translations call contrib ops by schema only
    contiguous_initializers(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_with_external_data(model, path)
    check_onnx(path)
    return OnnxExport(
        path=path,
        external_data=True,
        ir_version=model.ir_version,
        opset=OPSET,
        contrib_ops=count_contrib_ops(model),
        reference_ops=reference_ops,
        nodes_before_cleanup=before,
        nodes_after_cleanup=after,
        input_names=input_names,
        output_names=output_names,
        matmul_nbits=nbits_report,
        shared_cache=shared_cache,
        gqa_fold=folded,
    )


def save_with_external_data(model: onnx_ir.Model, path: Path) -> Path:
    """Save `model` to `path` with its initializers in one external data file beside it
    (whatever the model's size: the static decode programs reference the same file, and
    session.py loads it once per device for all of them). Returns the data file's path."""
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    if not save_takes_alignment():
        write_aligned_external_data(model, path, data)
        return data
    onnx_ir.save(
        model,
        path,
        external_data=data.name,
        size_threshold_bytes=EXTERNAL_MIN_BYTES,
        alignment=EXTERNAL_ALIGNMENT,
        align_threshold=0,
    )
    return data


@functools.cache
def save_takes_alignment() -> bool:
    """onnx_ir.save has `alignment` from onnx_ir 1.1 on (1.0 aligns only tensors over 1 MB)."""
    return "alignment" in inspect.signature(onnx_ir.save).parameters


def write_aligned_external_data(model: onnx_ir.Model, path: Path, data: Path) -> None:
    """What onnx_ir.save(alignment=EXTERNAL_ALIGNMENT) writes, for onnx_ir versions without
    it: each initializer over EXTERNAL_MIN_BYTES goes to `data` at the next page boundary, the
    model at `path` references it there. The model object is left as it was. (Initializers
    must be in memory, as the exporter's are, not already in `data`.)"""
    moved: dict[onnx_ir.Value, onnx_ir.TensorProtocol] = {}
    try:
        with open(data, "wb") as out:
            for graph in model.graphs():
                for value in graph.initializers.values():
                    tensor = value.const_value
                    if tensor is None or tensor.nbytes <= EXTERNAL_MIN_BYTES:
                        continue
                    out.write(b"\0" * (-out.tell() % EXTERNAL_ALIGNMENT))
                    offset, payload = out.tell(), tensor.tobytes()
                    out.write(payload)
                    moved[value] = tensor
                    value.const_value = onnx_ir.ExternalTensor(
                        data.name,
                        offset,
                        len(payload),
                        tensor.dtype,
                        shape=tensor.shape,
                        name=value.name,
                        base_dir=str(path.parent),
                    )
        onnx_ir.save(model, path)
    finally:
        for value, tensor in moved.items():
            value.const_value = tensor


def graph_for_export(graph: Graph, context: MatMulNBitsContext) -> tuple[fx.GraphModule, list[str]]:
    """A copy of the graph as ort emits it: each peakc op whose registered lowering rewrites
    it (linear_wq -> MatMulNBits' layout) rewritten, and the ops with no ort lowering calling
    their reference. Returns the module and the names of the ops left to their reference."""
    copy = graph.copy()
    reference_ops = set()
    for node in list(copy.call_nodes()):
        if node.target is torch.ops.aten.empty_permuted.default:
            _as_plain_empty(node)
        name = peakc_op_name(node.target)
        if name is None:
            continue
        lowering = lowering_for(name, "ort")
        if lowering is None:
            node.target = OPS[name].reference
            reference_ops.add(name)
        elif lowering.stage == "rewrite":
            lowering.fn(copy, node, context)
    copy.recompile()
    return copy.gm, sorted(reference_ops)


def _as_plain_empty(node: fx.Node) -> None:
    """aten.empty_permuted (an uninitialized buffer in a given stride order; MoE routing makes
    one for its inverse permutation) has no ONNX translation; values do not depend on the
    order, so it becomes aten.empty with the same size and dtype."""
    size, _order = node.args[:2]
    kwargs = {k: v for k, v in node.kwargs.items() if k in ("dtype", "device")}
    node.target = torch.ops.aten.empty.memory_format
    node.args, node.kwargs = (size,), kwargs


def export_error(exc: BaseException, reference_ops: list[str]) -> PeakcError:
    """A one-line error; it names the peakc ops exported through their reference, if any."""
    text = _root_cause(exc)
    if reference_ops:
        names = ", ".join(f"peakc::{n}" for n in reference_ops)
        return PeakcError(
            f"ort backend: {names} has no ONNX mapping and its reference implementation does "
            f"not export: {text}"
        )
    return PeakcError(f"ort backend: torch.onnx export failed: {text}")


def check_onnx(path: Path) -> None:
    """onnx.checker on the saved file (the path form handles external data)."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise PeakcError(f"{path.name} fails the ONNX checker: {_first_line(exc)}") from exc


def count_contrib_ops(model: onnx_ir.Model) -> dict[str, int]:
    """How many nodes of each ONNX Runtime contrib op the model holds (functions included)."""
    counts: dict[str, int] = {}
    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == MS_DOMAIN or node.op_type in CONTRIB_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def contiguous_initializers(model: onnx_ir.Model) -> None:
    """Give constant folding's strided results (a folded weight Transpose is a numpy view) a
    contiguous copy: numpy writes a strided array to a file element by element, ~25x slower,
    which made an 8B model's 16 GB save take minutes. torch copies with all threads."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        array = getattr(tensor, "raw", None)
        if not isinstance(array, np.ndarray) or array.flags.c_contiguous:
            continue
        try:
            array = torch.from_numpy(array).contiguous().numpy()
        except TypeError:  # a dtype torch does not take from numpy (ml_dtypes' bfloat16)
            array = np.ascontiguousarray(array)
        value.const_value = onnx_ir.Tensor(array, dtype=tensor.dtype, name=tensor.name)


def _count_nodes(model: onnx_ir.Model) -> int:
    return sum(1 for _ in onnx_ir.traversal.RecursiveGraphIterator(model.graph))


def _probe_model(ir_version: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [value("x", TensorProto.FLOAT, [1])],
        [value("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = ir_version
    return model


def _root_cause(exc: BaseException) -> str:
    """torch.onnx wraps the real error in several layers: the innermost one, with the FX node
    being translated when the exporter says which."""
    node = ""
    while exc.__cause__ is not None:
        match = re.search(r"Error when translating node (%\S+)", str(exc))
        node = f" (at node {match.group(1)})" if match else node
        exc = exc.__cause__
    return f"{type(exc).__name__}: {_first_line(exc)}{node}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
