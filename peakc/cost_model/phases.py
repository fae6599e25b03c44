"""Prefill and decode estimates of a token model, by re-capturing it at the asked shape.

A captured graph has static shapes, so scaling its token dimensions would guess which
dims are tokens. Instead the model is captured again: prefill at (batch, prompt length),
decode at (batch, 1) with every attention node costed against a KV cache of `context`
tokens (the demo models carry no cache, so the decode step is modelled, not captured).
Capture works on meta-device models, so a 7B model's estimate needs no weights in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from peakc.cost_model.estimate import DEFAULT_RUNTIME, Estimate, estimate
from peakc.cost_model.hardware import HardwareProfile
from peakc.errors import PeakcError
from peakc.ir import capture
from peakc.ir.graph import Graph

Prepare = Callable[[Graph], Graph]


def token_inputs(module: torch.nn.Module, example: tuple, batch: int, seq: int) -> tuple:
    """Token ids of shape (batch, seq) on the model's device; the model must take token ids."""
    if (
        len(example) != 1
        or example[0].dtype not in (torch.int64, torch.int32)
        or example[0].dim() != 2
    ):
        raise PeakcError(
            "prefill/decode estimates need a model whose one input is token ids "
            "(batch, seq); this model's example inputs are not"
        )
    if batch < 1 or seq < 1:
        raise PeakcError(f"batch and seq must be positive, got batch={batch} seq={seq}")
    device = next((p.device for p in module.parameters()), example[0].device)
    return (torch.zeros(batch, seq, dtype=example[0].dtype, device=device),)


def estimate_prefill(
    module: torch.nn.Module,
    example: tuple,
    profile: HardwareProfile,
    batch: int,
    seq: int,
    prepare: Prepare | None = None,
    runtime: str = DEFAULT_RUNTIME,
) -> Estimate:
    """Process a prompt of `seq` tokens for `batch` sequences; KV cache sized for the prompt."""
    graph = capture(module, token_inputs(module, example, batch, seq), name="prefill")
    graph = prepare(graph) if prepare else graph
    return estimate(
        graph, profile, phase="prefill", batch=batch, seq=seq, kv_tokens=seq, runtime=runtime
    )


def estimate_decode(
    module: torch.nn.Module,
    example: tuple,
    profile: HardwareProfile,
    batch: int,
    context: int,
    prepare: Prepare | None = None,
    runtime: str = DEFAULT_RUNTIME,
) -> Estimate:
    """One new token per sequence attending to a KV cache of `context` tokens."""
    graph = capture(module, token_inputs(module, example, batch, 1), name="decode")
    graph = prepare(graph) if prepare else graph
    return estimate(
        graph,
        profile,
        phase="decode",
        batch=batch,
        seq=context,
        kv_len=context,
        kv_tokens=context,
        runtime=runtime,
    )
