"""Causal LMs with an explicit, preallocated KV cache, for generation capture.

`DecoderWithCache` wraps a Llama-family model (peakc's demo Llama, or transformers' Llama,
Mistral, Qwen2, SmolLM2 and Mixtral, its MoE block in the MLP's place: they share the module
layout) and reuses its submodules, so
weights and module paths stay those of the source model. Its forward takes

    input_ids [B, S] int64, positions [B, S] int64 (each token's cache slot),
    k_cache, v_cache [layers, B, kv_heads, max_len, head_dim]

and returns (logits [B, S, vocab], new_k, new_v [layers, B, kv_heads, S, head_dim]). Attention
runs through `peakc::attention_cache`; the runtime writes new_k/new_v into the cache after each
step. The same program serves prefill (S = prompt length) and decode (S = 1): batch and
sequence length are dynamic up to the limits recorded in the artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from peakc.errors import PeakcError
from peakc.ir import ops  # noqa: F401  (registers peakc::attention_cache)
from peakc.runtime import kv_cache as runtime_kv_cache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")


@dataclass
class CacheLayout:
    """What the runtime needs to allocate and use the cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    max_batch: int
    dtype: str
    vocab_size: int

    def to_dict(self) -> dict:
        return asdict(self)


class DecoderWithCache(nn.Module):
    """Prefill/decode forward of a Llama-family causal LM over an explicit KV cache."""

    def __init__(self, causal_lm: nn.Module, rotary: nn.Module | None, scale: float) -> None:
        super().__init__()
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self._rotary = rotary
        self.scale = scale
        first = self.model.layers[0].self_attn
        self.head_dim = first.q_proj.out_features // _num_heads(causal_lm)
        self.num_heads = _num_heads(causal_lm)
        self.num_kv_heads = first.k_proj.out_features // self.head_dim

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rotary is not None:  # transformers: rotary_emb(x, position_ids) -> cos, sin
            return self._rotary(x, positions)
        return self.model.cos_cached[positions], self.model.sin_cached[positions]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D]
        new_k, new_v = [], []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = torch.ops.peakc.attention_cache(
                q, k, v, k_cache[i], v_cache[i], positions, self.scale
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_k.append(k)
            new_v.append(v)
        logits = self.lm_head(self.model.norm(x))
        return logits, torch.stack(new_k), torch.stack(new_v)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _num_heads(causal_lm: nn.Module) -> int:
    config = getattr(causal_lm, "config", None)
    if hasattr(config, "num_attention_heads"):
        return config.num_attention_heads
    return config.num_heads


def wrap_for_generation(
    causal_lm: nn.Module, max_seq_len: int, max_batch: int, name: str
) -> tuple[DecoderWithCache, CacheLayout]:
    """Wrap a supported causal LM; a clear error names the model type when unsupported."""
    config = getattr(causal_lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None and hasattr(getattr(causal_lm, "model", None), "cos_cached"):
        rotary, limit = None, config.max_positions  # peakc's demo Llama
        scale = (config.hidden_size // config.num_heads) ** -0.5
        vocab = config.vocab_size
    elif model_type in SUPPORTED_MODEL_TYPES:
        rotary = causal_lm.model.rotary_emb
        limit = config.max_position_embeddings
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        scale = head_dim**-0.5
        vocab = config.vocab_size
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and max_seq_len > window:
            raise PeakcError(
                f"{name}: max sequence length {max_seq_len} exceeds the sliding window {window}"
            )
    else:
        raise PeakcError(
            f"{name}: generation capture supports model types {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"and demo:llama, not '{model_type}'"
        )
    if max_seq_len > limit:
        raise PeakcError(f"{name}: max sequence length {max_seq_len} exceeds the model's {limit}")
    decoder = DecoderWithCache(causal_lm, rotary, scale).eval()
    dtype = next(causal_lm.parameters()).dtype
    layout = CacheLayout(
        num_layers=len(decoder.model.layers),
        num_kv_heads=decoder.num_kv_heads,
        head_dim=decoder.head_dim,
        max_seq_len=max_seq_len,
        max_batch=max_batch,
        dtype=str(dtype).removeprefix("torch."),
        vocab_size=vocab,
    )
    return decoder, layout


def example_inputs(layout: CacheLayout, prompt_len: int = 8) -> tuple[torch.Tensor, ...]:
    """Inputs for capture: a batch of 2 prompts of `prompt_len` tokens and an empty cache."""
    batch = min(2, layout.max_batch)
    ids = torch.randint(
        0, layout.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    positions = torch.arange(prompt_len).expand(batch, prompt_len).contiguous()
    cache = empty_cache(layout, batch)
    return ids, positions, cache, cache.clone()


def empty_cache(
    layout: CacheLayout, batch: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    return runtime_kv_cache.empty_cache(layout.to_dict(), batch, device)


def dynamic_shapes(layout: CacheLayout) -> dict:
    """torch.export dynamic shapes: batch 1..max_batch, sequence 1..max_seq_len (a batch of
    at most one is static: torch.export refuses a dim whose range is one value)."""
    batch = "batch" if layout.max_batch > 1 else None
    dims = {"seq": [1, layout.max_seq_len]}
    if batch:
        dims = {"batch": [1, layout.max_batch], **dims}

    def spec(**axes: str | None) -> dict[str, str]:
        return {axis: dim for axis, dim in axes.items() if dim}

    return {
        "dims": dims,
        "inputs": [
            spec(**{"0": batch, "1": "seq"}),
            spec(**{"0": batch, "1": "seq"}),
            spec(**{"1": batch}),
            spec(**{"1": batch}),
        ],
    }
