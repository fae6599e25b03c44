"""Fusion on generation graphs (KV cache, dynamic batch/sequence): rotary tables by position."""

from __future__ import annotations

import warnings

import pytest
import torch

import peakc
from peakc.ir.ops import peakc_op_name
from peakc.models import kv_cache, load_source_for_task

MAX_SEQ, MAX_BATCH = 48, 3


def compile_for_generation(module, inputs, dynamic):
    """cleanup,fuse on the generation graph (parity is checked by compile at capture shapes)."""
    compiled = peakc.compile(module, inputs, pipeline="cleanup,fuse", dynamic=dynamic)
    fuse = compiled.records[-1]
    assert fuse["name"] == "fuse" and fuse["parity_rel_error"] <= 1e-5
    return compiled, fuse["stats"], compiled.contents.report.get("fusion_near_misses", [])


@pytest.fixture(scope="module")
def demo_generation():
    """demo:llama's decoder: tables are cos_cached[positions] (a stored table gathered)."""
    source = load_source_for_task("demo:llama", "generate", MAX_SEQ, MAX_BATCH)
    return source, *compile_for_generation(source.module, source.example_inputs, source.dynamic)


@pytest.fixture(scope="module")
def hf_generation():
    """transformers Llama's decoder: tables come from rotary_emb(x, position_ids)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    decoder, layout = kv_cache.wrap_for_generation(model, MAX_SEQ, MAX_BATCH, "tiny-llama")
    inputs = kv_cache.example_inputs(layout)
    return (
        decoder,
        layout,
        *compile_for_generation(decoder, inputs, kv_cache.dynamic_shapes(layout)),
    )


def rotary_nodes(graph):
    return [n for n in graph.call_nodes() if peakc_op_name(n.target) == "rotary_embedding"]


def step_inputs(layout: dict | kv_cache.CacheLayout, batch: int, start: int, length: int):
    """A step at cache positions start..start+length-1 for `batch` rows, over a random cache."""
    layout = layout if isinstance(layout, kv_cache.CacheLayout) else kv_cache.CacheLayout(**layout)
    gen = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(0, layout.vocab_size, (batch, length), generator=gen)
    positions = (torch.arange(start, start + length) + torch.arange(batch)[:, None]).contiguous()
    cache = kv_cache.empty_cache(layout, batch)
    k, v = torch.randn(cache.shape, generator=gen), torch.randn(cache.shape, generator=gen)
    return ids, positions, k, v


def check_steps(compiled, module, layout) -> None:
    """Prefill and decode at shapes other than the captured one: fused == unfused module."""
    for batch, start, length in ((3, 0, 5), (1, 7, 1), (2, 20, 1)):
        inputs = step_inputs(layout, batch, start, length)
        with torch.no_grad():
            want = module(*inputs)
        got = compiled(*inputs)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            assert (a - b).norm() <= 1e-5 * b.norm()


def test_demo_generation_rotary_gathers_half_tables(demo_generation):
    source, compiled, stats, misses = demo_generation
    assert stats["fused.rotary"] == 4 and stats["fused.rms_norm"] == 5
    assert not any(m.startswith("rotary:") for m in misses), misses
    tables = {n for node in rotary_nodes(compiled.graph) for n in node.args[1:3]}
    assert len(tables) == 2  # one cos and one sin table, shared by every layer
    for table in tables:  # stored_cached[..., :8][positions]: gathered from the first half
        assert table.target is torch.ops.aten.index.Tensor
        sliced, (positions,) = table.args
        assert sliced.target is torch.ops.aten.slice.Tensor and sliced.args[2:] == (0, 8)
        assert sliced.args[0].op == "get_attr" and positions.op == "placeholder"
    # the full-width gathers and their unsqueezes are gone with the rotations they fed
    assert sum(n.target is torch.ops.aten.index.Tensor for n in compiled.graph.call_nodes()) == 2
    check_steps(compiled, source.module, source.generation)


def test_hf_generation_rotary_from_position_ids(hf_generation):
    decoder, layout, compiled, stats, misses = hf_generation
    assert stats["fused.rotary"] == 4 and stats["fused.skip_norm"] == 4
    assert not any(m.startswith("rotary:") for m in misses), misses
    for node in rotary_nodes(compiled.graph):
        assert node.args[1].meta["val"].shape[-1] == 8  # half of head_dim 16
    check_steps(compiled, decoder, layout)


def test_stats_count_the_models_cached_attention(demo_generation):
    """attention_cache comes from the model (no rule fuses it): the stats say it is there,
    and fused.attention still counts only this pass's rewrites."""
    _, compiled, stats, _ = demo_generation
    ops = [peakc_op_name(n.target) for n in compiled.graph.call_nodes()]
    assert ops.count("attention_cache") == 2  # one per layer
    assert stats["already_fused.attention_cache"] == 2 and stats["fused.attention"] == 0
