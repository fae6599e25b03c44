"""Token windows as a graph's inputs: what calibrating passes (and evaluation) feed a graph.

A forward graph takes token ids [batch, seq] at its captured (static) length. A generation
decoder (graph.info["generation"], the KV-cache layout of peakc/models/kv_cache.py) takes
each window as a prefill from an empty cache: (ids [1, seq], positions, k_cache, v_cache).
"""

from __future__ import annotations

import torch

from peakc.data import calibration_windows
from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.runtime.kv_cache import empty_cache


def calibration_samples(
    graph: Graph, data: object, nsamples: int, seq_len: int, seed: int, owner: str
) -> list[tuple[torch.Tensor, ...]]:
    """Token windows from the calibration data, as input tuples for `graph`.

    For a decoder `seq_len` 0 means 512, capped by the cache length, and the empty caches are
    one shared tensor pair; for a forward graph 0 means its captured length, the only one it
    takes.
    """
    layout = graph.info.get("generation")
    if layout is not None:
        seq_len = seq_len or min(512, layout["max_seq_len"])
        if seq_len > layout["max_seq_len"]:
            raise PeakcError(
                f"{owner}: seq_len={seq_len} exceeds the decoder's cache of "
                f"{layout['max_seq_len']} tokens"
            )
        windows = calibration_windows(data, nsamples, seq_len, seed, owner)
        cache = empty_cache(layout, batch=1)
        positions = torch.arange(seq_len).view(1, seq_len)
        return [(windows[i : i + 1], positions, cache, cache) for i in range(len(windows))]
    inputs = graph.example_inputs
    if len(inputs) != 1 or inputs[0].dim() != 2 or inputs[0].dtype != torch.int64:
        raise PeakcError(
            f"{owner}: calibration needs a graph whose one input is token ids [1, seq]"
        )
    captured = int(inputs[0].shape[1])
    seq_len = seq_len or captured
    if seq_len != captured:
        raise PeakcError(
            f"{owner}: seq_len={seq_len} but the graph was captured at sequence length "
            f"{captured}; capture at the calibration length (peakc compile --seq-len {seq_len})"
        )
    windows = calibration_windows(data, nsamples, seq_len, seed, owner)
    batch = inputs[0].shape[0]
    return [(windows[i : i + batch],) for i in range(0, len(windows) - batch + 1, batch)]
