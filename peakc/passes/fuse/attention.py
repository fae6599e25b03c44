"""Scaled dot-product attention → peakc::attention, with the KV head repetition removed (GQA).

k/v that HF repeats from Hkv to H heads (unsqueeze, expand, [clone], view) are read before
the repetition. A mask computed from constants only is evaluated: a lower-triangular boolean
mask becomes is_causal=True and an all-true mask is dropped; other masks (padding masks
that depend on the inputs) stay as the op's mask input.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from peakc.ir.graph import Graph
from peakc.passes.fuse.aten_match import aten, evaluate_constant, is_op, shape_of
from peakc.passes.fuse.engine import FusionRule, Match
from peakc.passes.fuse.redundant import strip_copies

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def sdpa_arguments(node: fx.Node) -> dict:
    """aten.scaled_dot_product_attention's arguments by name, with defaults."""
    args = {
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": False,
        "scale": None,
        "enable_gqa": False,
    }
    args.update(zip(_SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def unrepeated_kv(node: fx.Node, heads: int) -> tuple[fx.Node, list[fx.Node]]:
    """(tensor before the head repetition, repetition nodes) or (node, []) without one."""
    if not is_op(node, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return node, []
    chain = [node]
    expanded = node.args[0]
    if expanded is not strip_copies(expanded):
        chain.append(expanded)
        expanded = strip_copies(expanded)
    if not is_op(expanded, aten.expand.default):
        return node, []
    unsq = expanded.args[0]
    if not (is_op(unsq, aten.unsqueeze.default) and unsq.args[1] == 2):
        return node, []
    base = unsq.args[0]
    b, hkv, s, d = shape_of(base)
    if shape_of(expanded) != (b, hkv, heads // hkv, s, d) or heads % hkv:
        return node, []
    chain += [expanded, unsq]
    if any(len(n.users) != 1 for n in chain):
        return node, []
    return base, chain


class AttentionRule(FusionRule):
    name = "attention"

    def prepare(self, graph: Graph) -> None:
        self._gm = graph.gm
        self._mask_kind: dict[fx.Node, str] = {}

    def is_anchor(self, node: fx.Node) -> bool:
        return is_op(node, aten.scaled_dot_product_attention.default)

    def match(self, node: fx.Node) -> Match | str:
        a = sdpa_arguments(node)
        if a["dropout_p"] != 0.0:
            return f"dropout_p is {a['dropout_p']}, not 0"
        q, k, v = a["query"], a["key"], a["value"]
        if len(shape_of(q)) != 4 or len(shape_of(k)) != 4:
            return f"q is {shape_of(q)}, k is {shape_of(k)}: not [B, heads, S, D]"
        heads = shape_of(q)[1]
        nodes = [node]
        if not a["enable_gqa"]:
            k, k_chain = unrepeated_kv(k, heads)
            v, v_chain = unrepeated_kv(v, heads)
            if bool(k_chain) != bool(v_chain):
                return "only one of k and v is repeated across heads"
            nodes = [*k_chain, *v_chain, node]
        mask, causal = a["attn_mask"], bool(a["is_causal"])
        if mask is not None:
            kind = self._classify_mask(mask, shape_of(q)[2], shape_of(k)[2])
            if kind == "causal" and not causal:
                mask, causal = None, True
            elif kind == "none":
                mask = None
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(shape_of(q)[-1])
        return Match(
            outputs=[node], nodes=nodes, values={"args": (q, k, v, mask, causal, float(scale))}
        )

    def _classify_mask(self, mask: fx.Node, s: int, sk: int) -> str:
        """'causal', 'none' (all true) or 'tensor' for a mask node; evaluated once per node."""
        if mask not in self._mask_kind:
            value = evaluate_constant(self._gm, mask)
            kind = "tensor"
            if value is not None and value.dtype == torch.bool:
                causal = torch.ones(s, sk, dtype=torch.bool).tril()
                if bool(value.all()):
                    kind = "none"
                elif value.shape[-2:] == causal.shape and bool((value == causal).all()):
                    kind = "causal"
            self._mask_kind[mask] = kind
        return self._mask_kind[mask]

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        return graph.graph.call_function(torch.ops.peakc.attention.default, match.values["args"])
