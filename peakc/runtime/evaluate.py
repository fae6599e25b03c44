"""Perplexity over non-overlapping windows, the same way for a source model and an artifact.

A source is captured at the window length and an artifact's forward program is read back as a
Graph; both are run by the same interpreter, on CPU or an accelerator. ONNX programs (the ort
backend) have no Graph to read back: they run in their own onnxruntime session, on the device
the artifact records. Every path scores the windows with `window_perplexity`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.runtime.blocks import run_graph


@dataclass
class Perplexity:
    """exp(mean next-token negative log-likelihood) over `tokens` predictions in `windows`."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int


def perplexity(
    graph: Graph, windows: torch.Tensor, device: torch.device | str = "cpu"
) -> Perplexity:
    """Run `graph` (input: token ids [1, seq]) on each window; logits predict the next token."""
    return window_perplexity(
        lambda ids: run_graph(graph, (ids,), device)[0], graph.example_inputs, windows
    )


def artifact_perplexity(artifact, windows: torch.Tensor) -> Perplexity:
    """An artifact whose program runs in its own runtime (an ONNX program): `artifact(ids)`."""
    return window_perplexity(lambda ids: artifact(ids)[0], artifact.example_inputs, windows)


def prefill_perplexity(
    prefill: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor
) -> Perplexity:
    """A decoder program (--task generate): each window is one prefill from an empty cache,
    `prefill(ids [1, seq]) -> logits` (Generator.prefill_logits)."""
    example = (torch.zeros((1, windows.shape[1]), dtype=torch.int64),)
    return window_perplexity(prefill, example, windows)


def window_perplexity(
    run: Callable[[torch.Tensor], torch.Tensor],
    example_inputs: tuple[torch.Tensor, ...],
    windows: torch.Tensor,
) -> Perplexity:
    """`run(ids [batch, seq]) -> logits [batch, seq, vocab]` over the windows, `batch` at a
    time as the example inputs have it; mean next-token NLL."""
    (captured,) = example_inputs if len(example_inputs) == 1 else (None,)
    if captured is None or captured.dim() != 2 or captured.dtype != torch.int64:
        raise PeakcError("eval: the model must take one input of token ids [batch, seq]")
    seq_len = windows.shape[1]
    if captured.shape[1] != seq_len:
        raise PeakcError(
            f"eval: windows have {seq_len} tokens but the model was captured at sequence length "
            f"{captured.shape[1]}"
        )
    batch = captured.shape[0]
    total, count = 0.0, 0
    for i in range(0, windows.shape[0] - batch + 1, batch):
        ids = windows[i : i + batch]
        total += next_token_nll(run(ids), ids, "eval")
        count += ids.shape[0] * (ids.shape[1] - 1)
    if count == 0:
        raise PeakcError("eval: no complete window to evaluate")
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, count // (seq_len - 1), seq_len)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, owner: str) -> float:
    """Summed NLL of each window's next tokens: logits [batch, seq, vocab], ids [batch, seq]."""
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise PeakcError(f"{owner}: the model's first output is {list(logits.shape)}, not logits")
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        ids[:, 1:].to(logits.device).reshape(-1),
        reduction="sum",
    )
    return float(loss)
