"""Prefill replayed from CUDA graphs at bucketed lengths (backends/triton/cuda_graphs.py): the
buckets, the padding, and the property the padding relies on, that a right-padded prompt gives
its real tokens the logits and cache slots of the unpadded one (the demo llama's triton decoder
program under TRITON_INTERPRET=1, in a subprocess, as the other triton tests run)."""

import pytest
import torch

pytest.importorskip("triton")

from peakc.backends.triton.cuda_graphs import PREFILL_MIN, pad_prompt, prefill_bucket  # noqa: E402


def test_bucket_is_the_next_power_of_two_inside_the_cache():
    assert prefill_bucket(1, 0, 4096) == PREFILL_MIN
    assert prefill_bucket(65, 64, 4096) == 128
    assert prefill_bucket(2048, 2047, 4096) == 2048
    assert prefill_bucket(100, 99, 128) == 128
    assert prefill_bucket(100, 99, 127) is None  # the padding would write past the cache


def test_padding_continues_each_rows_slots():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    positions = torch.tensor([[0, 1, 2], [10, 11, 12]])
    static_ids = torch.full((2, 6), 99)
    static_pos = torch.zeros(2, 6, dtype=torch.long)
    pad_prompt(ids, positions, static_ids, static_pos)
    assert static_ids.tolist() == [[5, 6, 7, 0, 0, 0], [8, 9, 0, 0, 0, 0]]
    assert static_pos.tolist() == [[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]]


CHECK = r"""
import json, sys
from pathlib import Path
import torch
import peakc
from peakc.backends.triton.cuda_graphs import pad_prompt
from peakc.models import load_source_for_task
from peakc.runtime.kv_cache import empty_cache

source = load_source_for_task("demo:llama", "generate", 48, 2)
artifact = peakc.load(peakc.compile(source, backend="triton").save(Path(sys.argv[1]) / "a"))
layout = artifact.manifest["generation"]
decoder = artifact.program("decoder")
weights = artifact.weight_list("decoder")
ids = torch.tensor([[5, 17, 99, 3, 250], [42, 7, 7, 1, 2]])
positions = torch.arange(5).expand(2, 5).contiguous()
cache = empty_cache(layout, 2)
logits, k, v = decoder(*weights, ids, positions, cache, cache.clone())
padded_ids = torch.zeros(2, 8, dtype=torch.long)
padded_pos = torch.zeros(2, 8, dtype=torch.long)
pad_prompt(ids, positions, padded_ids, padded_pos)
logits8, k8, v8 = decoder(*weights, padded_ids, padded_pos, cache, cache.clone())
print("RESULT " + json.dumps({
    "logits": float((logits8[:, :5] - logits).abs().max()),
    "scale": float(logits.abs().max()),
    "k": float((k8[..., :5, :] - k).abs().max()),
    "v": float((v8[..., :5, :] - v).abs().max()),
}))
"""


def test_padded_prompt_leaves_the_real_tokens_unchanged(tmp_path, interpreted):
    found = interpreted(CHECK, tmp_path, env={"PEAKC_TRITON_CACHE": str(tmp_path / "cache")})
    assert found["scale"] > 0
    assert found["logits"] <= 1e-4 * found["scale"]
    assert found["k"] <= 1e-5 and found["v"] <= 1e-5
