"""peakc::linear_wq as ONNX Runtime's MatMulNBits: a graph rewrite run just before export.

MatMulNBits wants B uint8 [N, n_blocks, blob], scales [N*n_blocks] in the activation's dtype,
zero points packed per row (left out when every zero is 2^(bits-1), the op's default: symmetric
weights then skip one 4-bit zero per block of 32), and a block size that is a power of two
>= 16. linear_wq's layout (peakc/ir/ops.py) is re-expressed on the host:
- per-channel weights (group_size = in_features) get blocks of min(128, largest power of two
  <= K) columns that repeat the channel's scale and zero point (exact);
- groups larger than 128 are split into blocks of 128 that repeat the group's scale (exact);
- act-order weights with a g_idx (dynamic groups) are reordered so that each group's columns
  are contiguous, and the input is gathered in that order (`perm`; exact). onnxruntime's own
  g_idx input is not used: on the CPU provider it gives wrong results with zero points.
A linear_wq that cannot be expressed (3 bits, say) is dequantized on the host and exported as
a float MatMul (its reference's unpacking does not export: ONNX has no integer bit shifts);
`why_not` says why and the export report lists it. The rewrite is the registered ort
lowering of linear_wq (stage "rewrite"); matmul_nbits is the backend's own op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.ir.ops import (
    PackedWeight,
    define_op,
    dequantize_weight,
    pack_bits,
    register_lowering,
    unpack_bits,
)

MAX_BLOCK = 128
# Bit widths each provider's MatMulNBits kernel takes (onnxruntime 1.31/1.32; checked on the
# CPU provider: 2, 4, 8; the CUDA kernels take 4 and 8).
SUPPORTED_BITS = {"cpu": (2, 4, 8), "cuda": (4, 8)}


def _matmul_nbits_reference(
    x: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    block_size: int,
    in_features: int,
) -> torch.Tensor:
    """MatMulNBits semantics: y = x[..., perm] @ Wᵀ + bias, W dequantized from B's blocks
    (without zero points every block's zero is 2^(bits-1), the contrib op's default)."""
    rows, n_blocks = b.shape[0], b.shape[1]
    if zero_points is None:
        middle = torch.full((rows, n_blocks), 1 << (bits - 1), device=b.device)
        zero_points = pack_bits(middle, bits)
    w = dequantize_weight(
        b.reshape(rows, -1),
        scales.reshape(rows, n_blocks),
        zero_points.reshape(rows, -1),
        None,
        bits,
        block_size,
        n_blocks * block_size,
    )[:, :in_features]
    if perm is not None:
        x = x.index_select(-1, perm.long())
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _matmul_nbits_fake(x, b, scales, zero_points, perm, bias, bits, block_size, in_features):
    return x.new_empty((*x.shape[:-1], b.shape[0]))


MATMUL_NBITS = define_op("matmul_nbits", _matmul_nbits_reference, _matmul_nbits_fake, backend="ort")


@dataclass
class MatMulNBitsLayout:
    """One linear_wq's weights in MatMulNBits' layout."""

    b: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None  # None: every zero is 2^(bits-1) (symmetric weights)
    perm: torch.Tensor | None
    block_size: int


@dataclass
class MatMulNBitsReport:
    """What the rewrite did: how many linears became MatMulNBits, and why the others did not."""

    rewritten: int = 0
    reordered: int = 0  # act-order linears whose input is gathered (perm)
    not_rewritten: dict[str, str] = field(default_factory=dict)  # module -> reason


@dataclass
class MatMulNBitsContext:
    """What the rewrite needs from the export: the device (its bit widths) and the report."""

    device: str
    matmul_nbits: MatMulNBitsReport = field(default_factory=MatMulNBitsReport)


def block_size_for(group_size: int, in_features: int) -> int:
    """The MatMulNBits block size for a group size: a power of two in [16, 128] dividing the
    group (or any, for one group per channel); 0 when there is none."""
    if group_size >= in_features:  # per channel: every block repeats the channel's scale
        size = 1 << (min(in_features, MAX_BLOCK).bit_length() - 1)
    elif group_size & (group_size - 1) == 0:
        size = min(group_size, MAX_BLOCK)
    else:
        return 0
    return size if size >= 16 else 0


def why_not(node: fx.Node, graph: Graph, bits_supported: tuple[int, ...]) -> str | None:
    """None when `node` (a linear_wq) can become MatMulNBits, else the reason."""
    _, packed, _ = PackedWeight.of(node.args)
    bits, group_size, in_features = packed.layout()
    if bits not in bits_supported:
        return (
            f"{bits}-bit weights: MatMulNBits takes {bits_supported} bits here; exported as a "
            "float MatMul"
        )
    if block_size_for(group_size, in_features) == 0:
        return f"group size {group_size} has no power-of-two block size >= 16"
    if not all(_is_constant(a) for a in (packed.qweight, packed.scales)):
        return "packed weights are not constants of the graph"
    if packed.g_idx is not None:
        groups = graph.get_weight(packed.g_idx.target).long()
        counts = torch.bincount(groups)
        full = counts[:-1] if len(counts) > 1 else counts[:0]
        if bool((full != group_size).any()) or int(counts[-1]) > group_size:
            return "g_idx groups are not of group_size columns each"
    return None


def to_layout(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> MatMulNBitsLayout:
    """linear_wq weights re-expressed as MatMulNBits inputs (see the module docstring)."""
    rows = qweight.shape[0]
    block = block_size_for(group_size, in_features)
    z = unpack_bits(qzeros, bits, scales.shape[1])
    symmetric = bool((z == 1 << (bits - 1)).all())
    if g_idx is None and block == group_size and in_features % block == 0:
        # pack_bits' rows (LSB first, each row padded on its own) are MatMulNBits' layout
        # already when every block is one group: no unpacking, no re-packing
        return MatMulNBitsLayout(
            b=qweight.view(rows, in_features // block, block * bits // 8),
            scales=scales.to(dtype).reshape(-1).contiguous(),
            zero_points=None if symmetric else qzeros.reshape(-1),
            perm=None,
            block_size=block,
        )
    q = unpack_bits(qweight, bits, in_features)
    perm = None
    if g_idx is None:
        groups = torch.arange(in_features) // group_size
    else:
        perm = torch.argsort(g_idx.long(), stable=True)
        q = q[:, perm]
        groups = g_idx.long()[perm]
    n_blocks = -(-in_features // block)
    block_group = groups[torch.arange(n_blocks) * block]  # every block lies inside one group
    q = torch.nn.functional.pad(q, (0, n_blocks * block - in_features))
    return MatMulNBitsLayout(
        b=pack_bits(q, bits).view(rows, n_blocks, block * bits // 8),
        scales=scales[:, block_group].to(dtype).reshape(-1).contiguous(),
        zero_points=None if symmetric else pack_bits(z[:, block_group], bits).reshape(-1),
        perm=None if perm is None else perm.to(torch.int64),
        block_size=block,
    )


def why_not_on(node: fx.Node, graph: Graph, context: MatMulNBitsContext) -> str | None:
    """The registry's per-node check: why_not with the bit widths of the export's device."""
    return why_not(node, graph, SUPPORTED_BITS[context.device])


@register_lowering(
    "linear_wq",
    "ort",
    label="contrib/onnx (MatMulNBits)",
    stage="rewrite",
    why_not=why_not_on,
    fallback="as float MatMul (dequantized at export)",
)
def lower_linear_wq(graph: Graph, node: fx.Node, context: MatMulNBitsContext) -> None:
    """Replace one linear_wq in `graph` (in place) by the backend's matmul_nbits op, or by a
    float linear on its dequantized weight when MatMulNBits cannot express it."""
    report = context.matmul_nbits
    module = node.meta.get("peakc_module", node.name)
    reason = why_not_on(node, graph, context)
    if reason is not None:
        report.not_rewritten[module] = reason
        _dequantize_in_place(graph, node)
        return
    x, packed, bias = PackedWeight.of(node.args)
    weight = _constants(graph, packed)
    layout = to_layout(
        weight.qweight,
        weight.scales,
        weight.qzeros,
        weight.g_idx,
        *weight.layout(),
        x.meta["val"].dtype,
    )
    prefix = packed.qweight.target.rsplit(".", 1)[0]
    tensors = {"nbits_b": layout.b, "nbits_scales": layout.scales}
    if layout.zero_points is not None:
        tensors["nbits_zero_points"] = layout.zero_points
    if layout.perm is not None:
        tensors["nbits_perm"] = layout.perm
        report.reordered += 1
    attrs = {
        key: graph.add_weight(f"{prefix}.{key}", value, before=node)
        for key, value in tensors.items()
    }
    args = (
        x,
        attrs["nbits_b"],
        attrs["nbits_scales"],
        attrs.get("nbits_zero_points"),
        attrs.get("nbits_perm"),
        bias,
        packed.bits,
        layout.block_size,
        packed.in_features,
    )
    graph.replace_call(node, MATMUL_NBITS_OVERLOAD, args, packed.tensors().values())
    report.rewritten += 1


def _dequantize_in_place(graph: Graph, node: fx.Node) -> None:
    """linear_wq with constant weights -> aten.linear on the dequantized float weight."""
    x, packed, bias = PackedWeight.of(node.args)
    if not all(_is_constant(a) for a in packed.tensors().values()):
        return  # left to its reference implementation
    weight = _constants(graph, packed).dequantize().to(x.meta["val"].dtype)
    prefix = packed.qweight.target.rsplit(".", 1)[0]
    attr = graph.add_weight(f"{prefix}.dequantized_weight", weight, before=node)
    graph.replace_call(
        node, torch.ops.aten.linear.default, (x, attr, bias), packed.tensors().values()
    )


def _is_constant(arg: object) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _constants(graph: Graph, packed: PackedWeight) -> PackedWeight:
    """The node-valued packed weight with the graph's tensors in place of its get_attr nodes."""
    return packed.with_tensors({k: graph.get_weight(n.target) for k, n in packed.tensors().items()})


MATMUL_NBITS_OVERLOAD = MATMUL_NBITS.overload
