"""Perplexity over non-overlapping windows, the same way for a source model and an artifact.

Both are turned into a Graph (a source is captured at the window length, an artifact's
forward program is read back) and run by the same interpreter, on CPU or an accelerator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peakc.errors import PeakcError
from peakc.ir.graph import Graph


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
    from peakc.passes.calibration import run_graph

    (captured,) = graph.example_inputs if len(graph.example_inputs) == 1 else (None,)
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
        logits = run_graph(graph, (ids,), device)[0]
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise PeakcError(f"eval: the model's first output is {list(logits.shape)}, not logits")
        target = ids[:, 1:].to(logits.device)
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            reduction="sum",
        )
        total += float(loss)
        count += target.numel()
    if count == 0:
        raise PeakcError("eval: no complete window to evaluate")
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, count // (seq_len - 1), seq_len)
