"""The KV cache a generation artifact takes, built from its layout (graph.info["generation"],
the manifest's generation entry: `CacheLayout.to_dict()` of peakc/models/kv_cache.py).

One cache tensor per kind (keys, values): [layers, batch, kv_heads, max_seq_len, head_dim].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def cache_shape(layout: Mapping[str, Any], batch: int) -> tuple[int, ...]:
    """[layers, batch, kv_heads, max_seq_len, head_dim] for `batch` sequences."""
    return (
        int(layout["num_layers"]),
        batch,
        int(layout["num_kv_heads"]),
        int(layout["max_seq_len"]),
        int(layout["head_dim"]),
    )


def empty_cache(
    layout: Mapping[str, Any], batch: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Zeros of `cache_shape` in the layout's dtype on `device`."""
    dtype = getattr(torch, layout["dtype"])
    return torch.zeros(cache_shape(layout, batch), dtype=dtype, device=device)
