"""The low-bit and 2:4 linears as the Triton backend lowers them, and as eager programs run them
on CUDA.

Triton backend: a "rewrite" lowering turns each `linear_wq`, `linear_sparse24` and
`linear_sparse24_wq` node into one of the backend's own ops holding the kernels' repacked
layout as new weights (so the artifact stores that layout), and an "emit" lowering runs that op
with the launcher contract (`fn(*args, config=None)`, `fn.kernels`, `fn.configs`). A layout
the kernels do not cover is declined with the reason (the report names the layer); a 2:4
weight whose K is not a multiple of 4 (or whose groups do not hold whole groups of 4) is a
compile error naming the layer.

`linear_compressed` (QMoE's dictionary-coded experts) is rewritten the same way: its code
stream is decoded (checked) and transcoded into the sliced-ELL layout that
linear_compressed.py's kernel reads, stored as the layer's weights. `grouped_mm_compressed`
(a MoE layer's routed experts stacked in one coded matrix) likewise, into the grouped layout
of grouped_mm_compressed.py, whose kernel runs every expert of the layer in one launch.

Eager backend: `register_cuda_kernels()` makes the kernels the CUDA implementation of the four
peakc ops; their weights stay in peakc's layout in the artifact and are repacked (transcoded)
once, on first use, per weight tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from peakc.errors import PeakcError
from peakc.ir.ops import (
    GROUPED_MM,
    LINEAR_COMPRESSED,
    LINEAR_SPARSE24,
    LINEAR_SPARSE24_WQ,
    LINEAR_WQ,
    PackedWeight,
    define_op,
    register_lowering,
)

from . import grouped_mm_compressed as gmc
from . import linear_compressed as lc
from . import linear_wq as wq
from . import sparse24

if TYPE_CHECKING:
    from torch import fx

    from peakc.ir.graph import Graph

BACKEND = "triton"
X_DTYPES = (torch.float16, torch.bfloat16)
COMPRESSED_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # linear_compressed's


# --- the backend's own ops: the repacked layouts ---------------------------------------------


def _repacked_linear(
    qweight, scales, zeros, perm, bits, group_size, in_features
) -> wq.RepackedLinear:
    """The RepackedLinear that a linear_wq_repacked call's operands describe."""
    blocks, out_features, slot = qweight.shape
    k_padded = blocks * slot * (16 // bits)
    per_channel = scales.shape[0] == 1  # one scale row: group = the padded K
    groups = 1 if per_channel else -(-in_features // group_size)
    group = k_padded if per_channel else group_size
    return wq.RepackedLinear(
        qweight, scales, zeros, perm, bits, group_size, group, groups, in_features,
        out_features, k_padded,
    )  # fmt: skip


def _linear_wq_repacked_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """linear_wq on the Triton kernels' repacked layout (linear_wq.py): unpack, dequantize,
    x @ Wᵀ + bias."""
    packed = _repacked_linear(qweight, scales, zeros, perm, bits, group_size, in_features)
    w = wq.dequantize_repacked(packed)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _linear_wq_repacked_fake(x, qweight, *rest):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))  # qweight [blocks, N, S]


def _sparse24_of(values, meta, scales, zeros, bits, group_rows, in_features) -> Any:
    """The RepackedSparse24 that a linear_sparse24_repacked call's operands describe."""
    if bits == 0:
        return sparse24.RepackedSparse24(values, meta, in_features, values.shape[1])
    kept = in_features // 2
    blocks, out_features, slot = values.shape  # linear_wq's repacked codes
    k_padded = blocks * slot * (16 // bits)
    per_channel = scales.shape[0] == 1
    groups = 1 if per_channel else -(-kept // group_rows)
    inner = wq.RepackedLinear(
        values, scales, zeros, None, bits, kept if per_channel else group_rows, group_rows,
        groups, kept, out_features, k_padded,
    )  # fmt: skip
    return sparse24.RepackedSparse24(inner, meta, in_features, values.shape[1])


def _linear_sparse24_repacked_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_rows: int,
    in_features: int,
) -> torch.Tensor:
    """linear_sparse24(_wq) on the Triton kernel's repacked layout (sparse24.py; bits 0: float
    values): decompress (and dequantize), x @ Wᵀ + bias."""
    packed = _sparse24_of(values, meta, scales, zeros, bits, group_rows, in_features)
    w = sparse24.dense_weight(packed)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _linear_sparse24_repacked_fake(x, values, *rest):
    return x.new_empty((*x.shape[:-1], values.shape[1]))


LINEAR_WQ_REPACKED = define_op(
    "linear_wq_repacked", _linear_wq_repacked_reference, _linear_wq_repacked_fake, backend=BACKEND
)
LINEAR_SPARSE24_REPACKED = define_op(
    "linear_sparse24_repacked",
    _linear_sparse24_repacked_reference,
    _linear_sparse24_repacked_fake,
    backend=BACKEND,
)


# --- launchers (the emit lowerings of the backend's ops) -------------------------------------


def _kernel_config(config: dict | None, kind: type) -> Any:
    """A launcher's config dict as the kernels' config (empty or None: chosen by M)."""
    return kind(**config) if config else None


@register_lowering("linear_wq_repacked", BACKEND, label="triton/linear_wq")
def launch_linear_wq(qx, qweight, scales, zeros, perm, bias, bits, group_size, in_features,
                     config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """The fused kernel (split-K at decode batches) or dequantize + cuBLAS, by M or by
    `config`."""
    packed = _repacked_linear(qweight, scales, zeros, perm, bits, group_size, in_features)
    return wq.linear_wq_triton(qx, packed, bias, _kernel_config(config, wq.KernelConfig))


launch_linear_wq.kernels = (wq.linear_wq_kernel, wq.sum_splits_kernel, wq.dequantize_kernel)
launch_linear_wq.configs = [
    {},  # by M: linear_wq.CONFIGS
    {"kernel": "fused", "block_m": 16, "block_n": 64, "reduction": "partials"},
    {"kernel": "fused", "block_m": 16, "block_n": 128, "waves": 4.0},
    {"kernel": "fused", "block_m": 64, "block_n": 128, "num_stages": 4},
    {"kernel": "dequant", "block_m": 1, "block_n": 64},
]


@register_lowering("linear_sparse24_repacked", BACKEND, label="triton/linear_sparse24")
def launch_linear_sparse24(x, values, meta, scales, zeros, bias, bits, group_rows, in_features,
                           config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """The 2:4 kernel (fused GEMV/GEMM, dense expansion + cuBLAS, or torch's semi-structured
    for float values), by M or by `config`."""
    packed = _sparse24_of(values, meta, scales, zeros, bits, group_rows, in_features)
    chosen = _kernel_config(config, sparse24.Sparse24Config)
    return sparse24.linear_sparse24_triton(x, packed, bias, chosen)


launch_linear_sparse24.kernels = (
    sparse24.linear_sparse24_kernel,
    sparse24.sparse24_dense_kernel,
    wq.sum_splits_kernel,
)
launch_linear_sparse24.configs = [
    {},  # by M: sparse24.SPARSE24_CONFIGS
    {"block_m": 1, "block_n": 64, "block_k": 128},
    {"block_m": 16, "block_n": 128, "block_k": 64},
    {"block_m": 1, "block_n": 64, "block_k": 64, "kernel": "dense"},
]


# --- rewrite lowerings: peakc ops -> the backend's ops, repacked at compile time -------------


def _layer(node: fx.Node) -> str:
    return node.meta.get("peakc_module", node.name)


def _constant_args(graph: Graph, nodes: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The weights behind get_attr nodes (None when some operand is computed)."""
    if not all(getattr(n, "op", None) == "get_attr" for n in nodes.values()):
        return None
    return {k: graph.get_weight(n.target) for k, n in nodes.items()}


def _x_dtype_reason(x: fx.Node) -> str | None:
    dtype = x.meta["val"].dtype
    return None if dtype in X_DTYPES else f"activations are {dtype} (the kernels take fp16/bf16)"


def linear_wq_why_not(node: fx.Node, graph: Graph, context: Any = None) -> str | None:
    """Why the kernels do not cover this linear_wq (None: they do)."""
    x, packed, _ = PackedWeight.of(node.args)
    if packed.bits not in wq.BITS:
        return f"{packed.bits}-bit weights (the kernels take 4 and 8)"
    if _constant_args(graph, packed.tensors()) is None:
        return "the packed weights are computed in the graph, not stored"
    scales = packed.scales.meta["val"]
    if scales.shape[1] > 1 and (packed.group_size & (packed.group_size - 1) or
                                packed.group_size < wq.MIN_GROUP):  # fmt: skip
        return f"group size {packed.group_size} is not a power of two >= {wq.MIN_GROUP}"
    return _x_dtype_reason(x)


@register_lowering(
    "linear_wq",
    BACKEND,
    label="triton/linear_wq",
    stage="rewrite",
    why_not=linear_wq_why_not,
)
def rewrite_linear_wq(graph: Graph, node: fx.Node, context: Any = None) -> None:
    """linear_wq -> linear_wq_repacked, its weights repacked into the kernels' layout."""
    x, packed, bias = PackedWeight.of(node.args)
    weight = packed.with_tensors(_constant_args(graph, packed.tensors()))
    repacked = wq.repack_linear_wq(
        weight.qweight, weight.scales, weight.qzeros, weight.g_idx, *weight.layout(),
        name=_layer(node),
    )  # fmt: skip
    tensors = {"qweight": repacked.qweight, "scales": repacked.scales, "zeros": repacked.zeros}
    if repacked.perm is not None:
        tensors["perm"] = repacked.perm
    nodes = _add_weights(graph, node, packed.qweight.target, "triton", tensors)
    args = (x, nodes["qweight"], nodes["scales"], nodes["zeros"], nodes.get("perm"), bias,
            packed.bits, packed.group_size, packed.in_features)  # fmt: skip
    graph.replace_call(node, LINEAR_WQ_REPACKED.overload, args, packed.tensors().values())


def sparse24_why_not(node: fx.Node, graph: Graph, context: Any = None) -> str | None:
    """Why the 2:4 kernel does not cover this linear_sparse24(_wq) (None: it does)."""
    operands = _sparse24_operands(node)
    if _constant_args(graph, operands) is None:
        return "the compressed weights are computed in the graph, not stored"
    bits = node.args[6] if node.target == LINEAR_SPARSE24_WQ.overload else 0
    if bits not in (0, *wq.BITS):
        return f"{bits}-bit values (the kernel takes float, 4 and 8)"
    return _x_dtype_reason(node.args[0])


def _sparse24_operands(node: fx.Node) -> dict[str, Any]:
    if node.target == LINEAR_SPARSE24.overload:
        return {"values": node.args[1], "meta": node.args[2]}
    _, qvalues, scales, qzeros, meta = node.args[:5]
    return {"qvalues": qvalues, "scales": scales, "qzeros": qzeros, "meta": meta}


def _rewrite_sparse24(graph: Graph, node: fx.Node, context: Any = None) -> None:
    """linear_sparse24(_wq) -> linear_sparse24_repacked in the kernel's layout; a K that 2:4
    cannot tile is a PeakcError naming the layer."""
    operands = _sparse24_operands(node)
    t = _constant_args(graph, operands)
    name = _layer(node)
    if node.target == LINEAR_SPARSE24.overload:
        _, _, _, bias, in_features = node.args
        packed = sparse24.repack_sparse24(t["values"], t["meta"], in_features, name=name)
        tensors = {"values": packed.values, "meta": packed.meta}
        bits, group_rows = 0, 1
    else:
        _, _, _, _, _, bias, bits, group_size, in_features = node.args
        packed = sparse24.repack_sparse24_wq(
            t["qvalues"], t["scales"], t["qzeros"], t["meta"], bits, group_size, in_features,
            name=name,
        )  # fmt: skip
        inner = packed.values
        tensors = {"values": inner.qweight, "meta": packed.meta, "scales": inner.scales,
                   "zeros": inner.zeros}  # fmt: skip
        bits, group_rows = inner.bits, inner.group
    first = next(iter(operands.values())).target
    nodes = _add_weights(graph, node, first, "triton24", tensors)
    scales = nodes.get("scales", nodes["values"])
    args = (node.args[0], nodes["values"], nodes["meta"], scales, nodes.get("zeros", scales),
            bias, bits, group_rows, in_features)  # fmt: skip
    graph.replace_call(node, LINEAR_SPARSE24_REPACKED.overload, args, operands.values())


for _op in ("linear_sparse24", "linear_sparse24_wq"):
    register_lowering(
        _op, BACKEND, label="triton/linear_sparse24", stage="rewrite", why_not=sparse24_why_not
    )(_rewrite_sparse24)


def _add_weights(graph: Graph, node: fx.Node, old_name: str, tag: str, tensors: dict) -> dict:
    """The repacked tensors as new weights beside the old ones (`<module>.<tag>_<field>`)."""
    prefix = old_name.rsplit(".", 1)[0]
    return {
        key: graph.add_weight(f"{prefix}.{tag}_{key}", value.contiguous(), before=node)
        for key, value in tensors.items()
    }


# --- linear_compressed: transcoded into the sliced-ELL layout (linear_compressed.py) --------


def _linear_compressed_ell_reference(
    x: torch.Tensor,
    entries: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    part: int,
) -> torch.Tensor:
    """linear_compressed on the kernel's sliced-ELL layout (linear_compressed.py): expand the
    levels, scale per row, x @ Wᵀ + bias."""
    levels = lc.ell_levels(entries, blocks, scales.shape[0], in_features, part)
    w = levels.to(scales.dtype) * scales[:, None]
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _linear_compressed_ell_fake(x, entries, blocks, scales, *rest):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


LINEAR_COMPRESSED_ELL = define_op(
    "linear_compressed_ell",
    _linear_compressed_ell_reference,
    _linear_compressed_ell_fake,
    backend=BACKEND,
)


@register_lowering("linear_compressed_ell", BACKEND, label="triton/linear_compressed")
def launch_linear_compressed(x, entries, blocks, scales, bias, in_features, part,
                             config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """The sliced-ELL GEMV/GEMM, its config by M or by `config`."""
    return lc.linear_compressed_ell_triton(
        x, entries, blocks, scales, bias, in_features, part, config
    )


launch_linear_compressed.kernels = lc.linear_compressed_ell_triton.kernels
launch_linear_compressed.configs = lc.ELL_CONFIGS


def _code_operands(node: fx.Node) -> dict[str, Any]:
    _, words, offsets, table, checksum = node.args[:5]
    return {"words": words, "offsets": offsets, "table": table, "checksum": checksum}


def linear_compressed_why_not(node: fx.Node, graph: Graph, context: Any = None) -> str | None:
    """Why the sliced-ELL kernels do not take this linear_compressed or grouped_mm_compressed
    (None: they do)."""
    if _constant_args(graph, _code_operands(node)) is None:
        return "the code stream is computed in the graph, not stored"
    dtype = node.args[0].meta["val"].dtype
    if dtype not in COMPRESSED_X_DTYPES:
        return f"activations are {dtype} (the kernel takes fp16/bf16/fp32)"
    return None


@register_lowering(
    "linear_compressed",
    BACKEND,
    label="triton/linear_compressed",
    stage="rewrite",
    why_not=linear_compressed_why_not,
)
def rewrite_linear_compressed(graph: Graph, node: fx.Node, context: Any = None) -> None:
    """linear_compressed -> linear_compressed_ell, its code stream decoded (checked: a damaged
    stream is a PeakcError naming the layer) and transcoded (on a GPU when there is one)."""
    x, _, _, _, _, scales, bias, in_features, segment, max_words = node.args
    rows = node.meta["val"].shape[-1]
    nodes, ell = _store_transcoded(graph, node, lambda *stream: lc.transcode(
        *stream, rows, in_features, segment, max_words))  # fmt: skip
    args = (x, nodes["entries"], nodes["blocks"], scales, bias, in_features, ell.part)
    graph.replace_call(node, LINEAR_COMPRESSED_ELL.overload, args, _code_operands(node).values())


def _store_transcoded(
    graph: Graph, node: fx.Node, transcode: Callable[..., lc.EllWeight]
) -> tuple[dict, lc.EllWeight]:
    """The node's code stream transcoded (on a GPU when there is one; a damaged stream is a
    PeakcError naming the layer) and stored as `<module>.ell_entries` / `.ell_blocks`."""
    operands = _code_operands(node)
    code = _constant_args(graph, operands)
    device = "cuda" if torch.cuda.is_available() else code["words"].device
    stream = [code[key].to(device) for key in ("words", "offsets", "table", "checksum")]
    try:
        ell = transcode(*stream)
    except PeakcError as exc:
        raise PeakcError(f"{_layer(node)}: {exc}") from None
    tensors = {"entries": ell.entries, "blocks": ell.blocks}
    tensors = {key: t.to(code["words"].device) for key, t in tensors.items()}
    return _add_weights(graph, node, operands["words"].target, "ell", tensors), ell


# --- grouped_mm_compressed: every routed expert of a layer in one launch ----------------------


def _grouped_mm_compressed_ell_reference(
    x: torch.Tensor,
    entries: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    group_offsets: torch.Tensor,
    in_features: int,
    part: int,
) -> torch.Tensor:
    """grouped_mm_compressed on the grouped sliced-ELL layout (grouped_mm_compressed.py):
    expand every expert's levels, scale per row, then grouped_mm."""
    experts = group_offsets.shape[0]
    rows = scales.shape[0] // experts
    levels = gmc.grouped_ell_levels(entries, blocks, experts, rows, in_features, part)
    w = (levels.to(scales.dtype) * scales[:, None]).view(experts, rows, in_features)
    return GROUPED_MM.reference(x, w.transpose(1, 2).to(x.dtype), group_offsets)


def _grouped_mm_compressed_ell_fake(x, entries, blocks, scales, group_offsets, *rest):
    return x.new_empty((x.shape[0], scales.shape[0] // group_offsets.shape[0]))


GROUPED_MM_COMPRESSED_ELL = define_op(
    "grouped_mm_compressed_ell",
    _grouped_mm_compressed_ell_reference,
    _grouped_mm_compressed_ell_fake,
    backend=BACKEND,
)


@register_lowering("grouped_mm_compressed_ell", BACKEND, label="triton/grouped_mm_compressed")
def launch_grouped_mm_compressed(x, entries, blocks, scales, group_offsets, in_features, part,
                                 config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """Every expert of the layer in one launch of the grouped sliced-ELL kernel, its config
    by the mean tokens per expert or by `config`."""
    return gmc.grouped_mm_ell_triton(
        x, entries, blocks, scales, group_offsets, in_features, part, config
    )


launch_grouped_mm_compressed.kernels = gmc.grouped_mm_ell_triton.kernels
launch_grouped_mm_compressed.configs = gmc.grouped_mm_ell_triton.configs


@register_lowering(
    "grouped_mm_compressed",
    BACKEND,
    label="triton/grouped_mm_compressed",
    stage="rewrite",
    why_not=linear_compressed_why_not,
)
def rewrite_grouped_mm_compressed(graph: Graph, node: fx.Node, context: Any = None) -> None:
    """grouped_mm_compressed -> grouped_mm_compressed_ell, the stacked experts' stream decoded
    (checked: a damaged stream is a PeakcError naming the layer) and transcoded, one expert's
    rows on whole slices."""
    x, _, _, _, _, scales, group_offsets, in_features, segment, max_words = node.args
    experts = group_offsets.meta["val"].shape[0]
    rows = experts * node.meta["val"].shape[-1]  # every expert's rows
    nodes, ell = _store_transcoded(graph, node, lambda *stream: gmc.transcode_experts(
        *stream, experts, rows, in_features, segment, max_words))  # fmt: skip
    args = (x, nodes["entries"], nodes["blocks"], scales, group_offsets, in_features, ell.part)
    graph.replace_call(
        node, GROUPED_MM_COMPRESSED_ELL.overload, args, _code_operands(node).values()
    )


# --- eager programs on CUDA: the kernels as the ops' CUDA implementation ---------------------

_REPACKED = WeakIdKeyDictionary()  # weight tensor (by identity) -> (version, repacked)


def _cached(weight: torch.Tensor, build: Callable[[], Any]) -> Any:
    """The repacked form of a weight, built once per tensor (its version checked)."""
    entry = _REPACKED.get(weight)
    if entry is None or entry[0] != weight._version:
        entry = (weight._version, build())
        _REPACKED[weight] = entry
    return entry[1]


def _cuda_linear_wq(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, in_features):
    if bits not in wq.BITS or x.dtype not in X_DTYPES:
        return LINEAR_WQ.reference(x, qweight, scales, qzeros, g_idx, bias, bits, group_size,
                                   in_features)  # fmt: skip
    packed = _cached(qweight, lambda: wq.repack_linear_wq(
        qweight, scales, qzeros, g_idx, bits, group_size, in_features))  # fmt: skip
    return wq.linear_wq_triton(x, packed, bias)


def _cuda_linear_sparse24(x, values, meta, bias, in_features):
    if x.dtype not in X_DTYPES:
        return LINEAR_SPARSE24.reference(x, values, meta, bias, in_features)
    packed = _cached(values, lambda: sparse24.repack_sparse24(values, meta, in_features))
    return sparse24.linear_sparse24_triton(x, packed, bias)


def _cuda_linear_sparse24_wq(x, qvalues, scales, qzeros, meta, bias, bits, group_size,
                             in_features):  # fmt: skip
    args = (qvalues, scales, qzeros, meta, bits, group_size, in_features)
    if bits not in wq.BITS or x.dtype not in X_DTYPES:
        return LINEAR_SPARSE24_WQ.reference(x, *args[:4], bias, *args[4:])
    packed = _cached(qvalues, lambda: sparse24.repack_sparse24_wq(*args))
    return sparse24.linear_sparse24_triton(x, packed, bias)


def _cuda_linear_compressed(x, words, offsets, table, checksum, scales, bias, in_features,
                            segment, max_words):  # fmt: skip
    stream = (words, offsets, table, checksum)
    if x.dtype not in COMPRESSED_X_DTYPES:
        return LINEAR_COMPRESSED.reference(x, *stream, scales, bias, in_features, segment,
                                           max_words)  # fmt: skip
    ell = _cached(words, lambda: lc.transcode(
        *stream, scales.shape[0], in_features, segment, max_words))  # fmt: skip
    return lc.linear_compressed_ell_triton(
        x, ell.entries, ell.blocks, scales, bias, in_features, ell.part
    )


@functools.cache
def register_cuda_kernels() -> None:
    """Make the kernels the CUDA implementation of linear_wq, linear_sparse24,
    linear_sparse24_wq and linear_compressed (layouts they do not cover run the reference);
    once per process."""
    for opdef, fn in (
        (LINEAR_WQ, _cuda_linear_wq),
        (LINEAR_SPARSE24, _cuda_linear_sparse24),
        (LINEAR_SPARSE24_WQ, _cuda_linear_sparse24_wq),
        (LINEAR_COMPRESSED, _cuda_linear_compressed),
    ):
        torch.library.register_kernel(f"{opdef.namespace}::{opdef.name}", "cuda", fn)
