"""Memory by tier: weights, peak activation memory from tensor lifetimes, and the KV cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.fx as fx

from peakc.cost_model.op_costs import ATTENTION_OPS, is_view, kv_heads_of, nbytes, op_name, val
from peakc.ir.graph import Graph


@dataclass
class MemoryEstimate:
    """Bytes each tier must hold, and whether they fit the target's device memory."""

    weights: float
    peak_activations: float
    kv_cache: float
    device_capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.peak_activations + self.kv_cache

    @property
    def fits_device(self) -> bool:
        return self.total <= self.device_capacity

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits_device": self.fits_device}


def weight_bytes(graph: Graph) -> float:
    """Bytes of every distinct weight the graph reads."""
    seen: dict[str, float] = {}
    for node in graph.graph.nodes:
        if node.op == "get_attr" and node.users:
            seen[node.target] = nbytes(val(node))
    return float(sum(seen.values()))


def peak_activation_bytes(graph: Graph) -> float:
    """Most bytes of intermediate tensors alive at once when nodes run in graph order.

    Each kernel allocates its output; views share their input's storage; a storage is freed
    after its last reader ran; graph inputs live from the start, outputs to the end.
    Weights are not activations.
    """
    nodes = list(graph.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    storage: dict[fx.Node, fx.Node | None] = {}
    size: dict[fx.Node, float] = {}
    for node in nodes:
        if node.op == "get_attr" or node.op == "output":
            storage[node] = None
        elif node.op == "placeholder" or not is_view(node):
            storage[node] = node
            out = node.meta.get("val")
            outs = out if isinstance(out, (tuple, list)) else (out,)
            size[node] = float(sum(nbytes(o) for o in outs if hasattr(o, "element_size")))
        else:
            base = node.args[0] if node.args else None
            storage[node] = storage.get(base) if isinstance(base, fx.Node) else None
    last_use: dict[fx.Node, int] = {}
    end = len(nodes)
    for node in nodes:
        owner = storage.get(node)
        if owner is None:
            continue
        uses = [position[u] for u in node.users]
        if any(u.op == "output" for u in node.users):
            uses.append(end)
        last_use[owner] = max([last_use.get(owner, position[node]), *uses])
    frees: dict[int, list[fx.Node]] = {}
    for owner, at in last_use.items():
        frees.setdefault(at, []).append(owner)
    live = peak = 0.0
    for i, node in enumerate(nodes):
        if storage.get(node) is node:
            live += size[node]
            peak = max(peak, live)
        for owner in frees.get(i, []):
            live -= size[owner]
    return peak


def kv_cache_bytes(graph: Graph, batch: int, tokens: int) -> float:
    """K and V of `tokens` positions for every attention node, at the model's kv heads."""
    total = 0.0
    for node in graph.call_nodes():
        if op_name(node.target) not in ATTENTION_OPS:
            continue
        k, v = val(node.args[1]), val(node.args[2])
        per_token = kv_heads_of(node) * (k.shape[-1] + v.shape[-1]) * k.element_size()
        total += float(batch * tokens * per_token)
    return total


def kv_cache_formula(
    layers: int, batch: int, tokens: int, kv_heads: int, head_dim: int, dtype_bytes: int
) -> float:
    """2 (K and V) * layers * batch * tokens * kv_heads * head_dim * bytes per element."""
    return float(2 * layers * batch * tokens * kv_heads * head_dim * dtype_bytes)
