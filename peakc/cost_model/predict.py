"""CostModel: the one call passes and backends make to ask what a graph costs on the target.

`CostModel(profile).phases(graph)` predicts a prefill and, for a generation decoder, one decode
step: time in the profile's runtime and memory by tier. A graph captured with dynamic dims
(`--task generate`) is costed at concrete shapes by re-running shape propagation on a copy
with meta-device inputs, so no weights move and the caller's graph is untouched. A graph with
static shapes is costed as captured (its one shape is the prefill; it has no decode step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from peakc.cost_model.estimate import DEFAULT_RUNTIME, Estimate, estimate
from peakc.cost_model.hardware import HardwareProfile
from peakc.errors import PeakcError
from peakc.ir import meta as ir_meta
from peakc.ir.graph import Graph

TIERS = ("device", "host", "disk")


@dataclass
class PhaseCost:
    """Predicted seconds and bytes of one phase (a prefill or one decode step)."""

    phase: str
    batch: int
    tokens: int  # new tokens per sequence: the prompt for prefill, 1 for decode
    context: int  # KV-cache slots attended to (0 for a graph without a cache)
    seconds: float
    weights_bytes: float
    activation_bytes: float
    kv_cache_bytes: float

    @property
    def device_bytes(self) -> float:
        return self.weights_bytes + self.activation_bytes + self.kv_cache_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "batch": self.batch,
            "tokens": self.tokens,
            "context": self.context,
            "ms": round(self.seconds * 1e3, 4),
            "weights_mb": round(self.weights_bytes / 2**20, 3),
            "activation_mb": round(self.activation_bytes / 2**20, 3),
            "kv_cache_mb": round(self.kv_cache_bytes / 2**20, 3),
            "device_mb": round(self.device_bytes / 2**20, 3),
        }


@dataclass
class GraphCost:
    """A graph's predicted phases on one target, and memory needed per tier."""

    target: str
    runtime: str
    prefill: PhaseCost
    decode: PhaseCost | None
    memory: dict[str, float] = field(default_factory=dict)  # bytes needed per tier
    capacity: dict[str, float] = field(default_factory=dict)  # bytes the target has per tier

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "runtime": self.runtime,
            "prefill": self.prefill.to_dict(),
            "decode": self.decode.to_dict() if self.decode else None,
            "memory_mb": {tier: round(b / 2**20, 3) for tier, b in self.memory.items()},
        }


class CostModel:
    """Estimates on one HardwareProfile, for the runtime the artifact will use."""

    def __init__(self, profile: HardwareProfile, runtime: str = DEFAULT_RUNTIME) -> None:
        self.profile = profile
        self.runtime = runtime

    def __repr__(self) -> str:
        return f"CostModel({self.profile.name}, runtime={self.runtime})"

    def estimate(self, graph: Graph, **phase: Any) -> Estimate:
        """Per-node, per-block and total estimate of `graph` at its recorded (static) shapes."""
        return estimate(graph, self.profile, runtime=self.runtime, **phase)

    def phases(
        self, graph: Graph, batch: int | None = None, prompt_len: int | None = None
    ) -> GraphCost:
        """Prefill of `prompt_len` tokens for `batch` sequences and, for a generation decoder,
        one decode step attending to the prompt (defaults: the graph's example shape)."""
        generation = graph.info.get("generation")
        if generation is None or not graph.info.get("dynamic"):
            prefill = self._phase(graph, "prefill", self.estimate(graph), context=0)
            return self._graph_cost(prefill, None)
        ids, _, k_cache, _ = graph.example_inputs
        batch = batch or ids.shape[0]
        prompt_len = prompt_len or ids.shape[1]
        slots = k_cache.shape[-2]
        if prompt_len >= slots:
            raise PeakcError(
                f"cost model: prompt of {prompt_len} tokens leaves no KV-cache slot "
                f"(the cache holds {slots})"
            )
        prefill = self._decoder_phase(graph, "prefill", batch, prompt_len, prompt_len)
        decode = self._decoder_phase(graph, "decode", batch, 1, prompt_len + 1)
        return self._graph_cost(prefill, decode)

    def step_seconds(self, graph: Graph) -> float:
        """Predicted seconds of the step a graph repeats most: one decode step (attending to
        the example prompt) for a generation decoder, else the graph at its captured shapes."""
        if graph.info.get("generation") is not None and graph.info.get("dynamic"):
            ids = graph.example_inputs[0]
            return self._decoder_phase(graph, "decode", ids.shape[0], 1, ids.shape[1] + 1).seconds
        return self.estimate(graph).total_time

    def phases_or_reason(self, graph: Graph) -> GraphCost | str:
        """`phases(graph)`, or the one-line reason the cost model could not cost it (a report
        then says why its prediction is missing instead of the pass failing)."""
        try:
            return self.phases(graph)
        except PeakcError as exc:
            return str(exc)

    def decoder_estimate(
        self, graph: Graph, phase: str, batch: int, tokens: int, context: int
    ) -> tuple[Graph, Estimate]:
        """A generation decoder shaped for `batch` x `tokens` new tokens attending to `context`
        slots, and its per-node and per-block estimate (offload places blocks from it)."""
        ids, positions, k_cache, v_cache = graph.example_inputs
        inputs = [
            _like(ids, (batch, tokens)),
            _like(positions, (batch, tokens)),
            _like(k_cache, (*k_cache.shape[:1], batch, *k_cache.shape[2:])),
            _like(v_cache, (*v_cache.shape[:1], batch, *v_cache.shape[2:])),
        ]
        shaped = concrete(graph, inputs)
        kv_len = context if phase == "decode" else None
        est = self.estimate(
            shaped, phase=phase, batch=batch, seq=tokens, kv_len=kv_len, kv_tokens=context
        )
        return shaped, est

    def _decoder_phase(
        self, graph: Graph, phase: str, batch: int, tokens: int, context: int
    ) -> PhaseCost:
        shaped, est = self.decoder_estimate(graph, phase, batch, tokens, context)
        cost = self._phase(shaped, phase, est, context)
        # the cache a decoder takes is allocated whole (every slot), so it is what memory holds
        cost.kv_cache_bytes = float(
            sum(t.numel() * t.element_size() for t in shaped.example_inputs[2:])
        )
        return cost

    def _phase(self, graph: Graph, phase: str, est: Estimate, context: int) -> PhaseCost:
        first = graph.example_inputs[0] if graph.example_inputs else None
        batch = int(first.shape[0]) if first is not None and first.dim() else 1
        tokens = int(first.shape[1]) if first is not None and first.dim() > 1 else 1
        if est.batch is not None:
            batch = est.batch
        if phase == "decode":
            tokens = 1
        return PhaseCost(
            phase=phase,
            batch=batch,
            tokens=tokens,
            context=context,
            seconds=est.total_time,
            weights_bytes=est.memory.weights,
            activation_bytes=est.memory.peak_activations,
            kv_cache_bytes=est.memory.kv_cache,
        )

    def _graph_cost(self, prefill: PhaseCost, decode: PhaseCost | None) -> GraphCost:
        device = max(p.device_bytes for p in (prefill, decode) if p is not None)
        capacity = {t: self.profile.memory_capacity.get(t, float("inf")) for t in TIERS}
        return GraphCost(
            target=self.profile.name,
            runtime=self.runtime,
            prefill=prefill,
            decode=decode,
            memory={"device": device, "host": 0.0, "disk": 0.0},
            capacity=capacity,
        )


def concrete(
    graph: Graph, inputs: list[tuple[tuple[int, ...], torch.dtype, torch.device]]
) -> Graph:
    """A copy of `graph` whose recorded values are those inputs of (shape, dtype, device)
    give (static shapes); its example inputs are meta tensors of those shapes (no memory)."""
    metas = tuple(torch.empty(shape, dtype=dtype, device="meta") for shape, dtype, _ in inputs)
    out = graph.specialized(metas, None)
    try:
        derived = ir_meta.propagate_at(out.gm, inputs)
    except Exception as exc:  # any failure of fake propagation: the graph cannot be shaped
        text = str(exc).strip().splitlines()
        raise PeakcError(
            f"cost model: shape propagation at {[list(i[0]) for i in inputs]} failed: "
            f"{text[0] if text else type(exc).__name__}"
        ) from exc
    for node, value in derived.items():
        if node.op != "output":
            node.meta["val"] = value
    return out


def _like(
    t: torch.Tensor, shape: tuple[int, ...]
) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
    return tuple(int(d) for d in shape), t.dtype, t.device


def cost_change(before: GraphCost | str, after: GraphCost | str) -> dict[str, Any]:
    """The report entry a pass writes: predicted phases before and after it ran (or, where
    the cost model could not cost a graph, why)."""

    def entry(cost: GraphCost | str) -> dict[str, Any]:
        return {"unavailable": cost} if isinstance(cost, str) else cost.to_dict()

    return {"before": entry(before), "after": entry(after)}
