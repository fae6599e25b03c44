"""Attention (`peakc::attention`, flash-style) and attention over the static KV cache
(`peakc::attention_cache`, split over the sequence, grouped-query heads, the cache write fused)
as Triton lowerings.

Both keep the running max, sum and output of an online softmax in fp32 registers while they
walk key blocks (scores in log2 units, so each exponent is one exp2), multiply on tensor cores
(tl.dot, ieee for fp32 inputs) and never materialize the [S, Sk] scores.

attention: one program per (query block, head); causal programs stop at their diagonal; a bool
or additive mask is read through its broadcast strides. Output [B, H, S, Dv] in [B, S, H, Dv]
memory, as the reference returns it.

attention_cache: one program per (block of query rows, KV head, split). Its rows are the KV
head's query heads times the new tokens, token-major, so every key and value block is read once
for all heads of the group. The keys a query sees are the cache prefix [0, p0) (p0 = the first
new token's slot) followed by the new tokens themselves, read from k/v rather than from the
cache: the new tokens of a sequence sit at ascending contiguous slots from p0 (the Generator's
layout, which ort's GroupQueryAttention lowering relies on too; always true for one token). A
split takes an equal share of those keys, so a one-token decode of 8 KV heads still spreads
over the whole GPU; a second kernel merges the splits' (max, sum, output) triples.
Functional like the reference by default; `write_cache=True` also stores the new keys and
values into the caches at their slots (no program reads those slots, so the store is race
free), for a runtime that keeps the cache in place instead of writing new_k/new_v itself.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from peakc.backends.triton.kernels.operands import dtype_reason, node_arguments
from peakc.ir.ops import register_lowering

if TYPE_CHECKING:
    from torch import fx

LOG2E = 1.4426950408889634
MASK_KINDS = {None: 0, "bool": 1, "float": 2}

ATTENTION_CONFIGS = [
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2},
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
    {"block_m": 128, "block_n": 32, "num_warps": 4, "num_stages": 3},
    {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 2},
]
# block_m 0: rows of the group (heads x new tokens) rounded up to 16..64;
# num_splits 0: enough splits of the sequence to give every SM two programs
CACHE_CONFIGS = [
    {"block_m": 0, "block_n": 64, "num_splits": 0, "num_warps": 4, "num_stages": 2},
    {"block_m": 0, "block_n": 32, "num_splits": 0, "num_warps": 4, "num_stages": 3},
    {"block_m": 0, "block_n": 128, "num_splits": 0, "num_warps": 8, "num_stages": 2},
    {"block_m": 0, "block_n": 64, "num_splits": 1, "num_warps": 4, "num_stages": 2},
    {"block_m": 128, "block_n": 64, "num_splits": 1, "num_warps": 8, "num_stages": 2},
    {"block_m": 128, "block_n": 64, "num_splits": 1, "num_warps": 8, "num_stages": 3},
]
# untuned prompts (a tuned config is keyed by its exact shape): the flash-attention shape
PREFILL_CONFIG = CACHE_CONFIGS[-1]


# --- shared steps ------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. PRECISION "upcast" multiplies half inputs as fp32: the CPU
    interpreter (triton 3.9) would multiply bf16 bit patterns."""
    if PRECISION == "upcast":
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b, input_precision=PRECISION)
    return product


@triton.jit
def _softmax_step(acc, m_i, l_i, scores, v, PRECISION: tl.constexpr):
    """Fold one key block into the running (output, max, sum); scores in log2 units, -inf
    where masked. A row with nothing visible yet keeps max -inf and adds nothing."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _normalized(acc, l_i):
    """The softmax-weighted values; rows that saw no key give 0, as the reference's SDPA does."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


# --- attention ---------------------------------------------------------------------------------


@triton.jit
def attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    heads, groups, seq, keys, head_dim, value_dim, qk_scale,
    qs_b, qs_h, qs_s, qs_d, ks_b, ks_h, ks_s, ks_d, vs_b, vs_h, vs_s, vs_d,
    ms_b, ms_h, ms_s, ms_k, os_b, os_h, os_s, os_d,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One query block of one head against every key block it may see."""
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    kv = h // groups
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_base = q_ptr + b.to(tl.int64) * qs_b + h * qs_h
    q = tl.load(q_base + rows[:, None] * qs_s + d[None, :] * qs_d,
                mask=(rows[:, None] < seq) & (d[None, :] < head_dim), other=0.0)  # fmt: skip
    k_base = k_ptr + b.to(tl.int64) * ks_b + kv * ks_h
    v_base = v_ptr + b.to(tl.int64) * vs_b + kv * vs_h
    m_base = mask_ptr + b.to(tl.int64) * ms_b + h * ms_h
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    end = keys
    if IS_CAUSAL:
        end = tl.minimum(keys, start_m + BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[None, :] * ks_s + d[:, None] * ks_d,
                    mask=(cols[None, :] < keys) & (d[:, None] < head_dim), other=0.0)  # fmt: skip
        v = tl.load(v_base + cols[:, None] * vs_s + dv[None, :] * vs_d,
                    mask=(cols[:, None] < keys) & (dv[None, :] < value_dim), other=0.0)  # fmt: skip
        scores = _dot(q, k, PRECISION) * qk_scale
        visible = cols[None, :] < keys
        if IS_CAUSAL:
            visible &= cols[None, :] <= rows[:, None]
        if MASK_KIND > 0:
            in_range = (rows[:, None] < seq) & (cols[None, :] < keys)
            given = tl.load(m_base + rows[:, None] * ms_s + cols[None, :] * ms_k, mask=in_range,
                            other=0)  # fmt: skip
            if MASK_KIND == 1:
                visible &= given != 0
            else:
                scores += given.to(tl.float32) * 1.4426950408889634
        scores = tl.where(visible, scores, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, scores, v, PRECISION)
    out = out_ptr + b.to(tl.int64) * os_b + h * os_h + rows[:, None] * os_s + dv[None, :] * os_d
    tl.store(out, _normalized(acc, l_i).to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < seq) & (dv[None, :] < value_dim))  # fmt: skip


def why_not_attention(node: fx.Node, graph: object, context: object) -> str | None:
    """Declines what the kernel does not cover: non-float or mixed q/k/v dtypes, head counts
    that do not group, a mask that does not broadcast to [B, H, S, Sk] (or comes with
    is_causal, which the reference refuses too)."""
    q, k, v, mask, is_causal, scale = node_arguments(node)
    reason = dtype_reason("q", q) or dtype_reason("k", k) or dtype_reason("v", v)
    if reason is None and not q.dtype == k.dtype == v.dtype:
        reason = "q, k and v differ in dtype"
    if reason is None and (q.dim() != 4 or k.dim() != 4 or v.dim() != 4):
        reason = "q, k, v are not [B, H, S, D]"
    if reason is None and (k.shape[1] == 0 or q.shape[1] % k.shape[1]):
        reason = f"{q.shape[1]} query heads do not group over {k.shape[1]} KV heads"
    if reason is None and (q.shape[3] != k.shape[3] or k.shape[:3] != v.shape[:3]):
        reason = "q and k differ in head dim, or k and v in batch, heads or length"
    if reason is None and mask is not None:
        reason = _mask_reason(mask, q, k, is_causal)
    if reason is None and not isinstance(scale, (int, float)):
        reason = "scale is not a constant"
    return reason


def _mask_reason(mask, q, k, is_causal) -> str | None:
    if is_causal:
        return "both a mask and is_causal"
    if mask.dtype != torch.bool and dtype_reason("mask", mask):
        return dtype_reason("mask", mask)
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        torch.broadcast_shapes(tuple(mask.shape), full)
    except RuntimeError:
        return f"mask {list(mask.shape)} does not broadcast to {list(full)}"
    return None


def _dot_precision(q: torch.Tensor) -> str:
    """fp32 inputs multiply in full precision (the reference's), halves on tensor cores; see
    `_dot` for "upcast", the CPU interpreter's form."""
    if q.dtype == torch.float32:
        return "ieee"
    return "tf32" if q.device.type == "cuda" else "upcast"


@register_lowering("attention", "triton", label="triton/attention", why_not=why_not_attention)
def attention(q, k, v, mask, is_causal, scale, *, config=None):
    """peakc::attention: q [B, H, S, D], k/v [B, Hkv, Sk, D(v)], optional bool/additive mask."""
    config = config or ATTENTION_CONFIGS[0]
    batch, heads, seq, head_dim = q.shape
    keys, value_dim = k.shape[2], v.shape[3]
    out = q.new_empty((batch, seq, heads, value_dim)).transpose(1, 2)
    kind, mask_strides = "float", (0, 0, 0, 0)
    if mask is None:
        kind, mask = None, q
    else:
        mask = mask.expand(batch, heads, seq, keys)
        if mask.dtype == torch.bool:
            kind, mask = "bool", mask.view(torch.uint8)
        mask_strides = mask.stride()
    block_m = config["block_m"]
    attention_kernel[(triton.cdiv(seq, block_m), batch * heads)](
        q, k, v, mask, out, heads, heads // k.shape[1], seq, keys, head_dim, value_dim,
        scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        IS_CAUSAL=bool(is_causal), MASK_KIND=MASK_KINDS[kind],
        PRECISION=_dot_precision(q), BLOCK_M=block_m, BLOCK_N=config["block_n"],
        BLOCK_D=_dot_width(head_dim), BLOCK_DV=_dot_width(value_dim),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out


def _dot_width(n: int) -> int:
    """A head dim rounded up to a power of two tl.dot takes (at least 16)."""
    return max(16, triton.next_power_of_2(n))


attention.kernels = (attention_kernel, _softmax_step, _dot, _normalized)
attention.configs = ATTENTION_CONFIGS


# --- attention_cache -----------------------------------------------------------------------


@triton.jit
def _cache_block(
    k_base, v_base, cols, ks_s, ks_d, vs_s, vs_d, d, head_dim, valid,
    qk_dtype: tl.constexpr, via_dtype: tl.constexpr,
):  # fmt: skip
    """A block of keys [D, N] and values [N, D], cast as the reference casts them."""
    k = tl.load(k_base + cols[None, :] * ks_s + d[:, None] * ks_d,
                mask=valid[None, :] & (d[:, None] < head_dim), other=0.0)  # fmt: skip
    v = tl.load(v_base + cols[:, None] * vs_s + d[None, :] * vs_d,
                mask=valid[:, None] & (d[None, :] < head_dim), other=0.0)  # fmt: skip
    return k.to(via_dtype).to(qk_dtype), v.to(via_dtype).to(qk_dtype)


@triton.jit
def attention_cache_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, part_ptr, stat_ptr,
    kv_heads, groups, seq, head_dim, qk_scale,
    qs_b, qs_h, qs_s, qs_d, ks_b, ks_h, ks_s, ks_d, vs_b, vs_h, vs_s, vs_d,
    kcs_b, kcs_h, kcs_s, kcs_d, vcs_b, vcs_h, vcs_s, vcs_d, ps_b, ps_s, os_b, os_h, os_s, os_d,
    NUM_SPLITS: tl.constexpr, WRITE_CACHE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One block of a KV head's query rows (token-major: row r is token r // groups of head
    kv * groups + r % groups) over this split's share of the cache prefix and new tokens."""
    b = tl.program_id(1) // kv_heads
    kv = tl.program_id(1) % kv_heads
    split = tl.program_id(2)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rows = seq * groups
    token = r // groups
    head = kv * groups + r % groups
    row_ok = r < rows
    pos_base = pos_ptr + b.to(tl.int64) * ps_b
    q = tl.load(q_ptr + b.to(tl.int64) * qs_b + head[:, None] * qs_h + token[:, None] * qs_s
                + d[None, :] * qs_d, mask=row_ok[:, None] & (d[None, :] < head_dim),
                other=0.0)  # fmt: skip
    query_slot = tl.load(pos_base + token * ps_s, mask=row_ok, other=-1)
    first = tl.load(pos_base).to(tl.int32)  # the cache prefix [0, first) is the context
    total = first + seq
    chunk = tl.cdiv(tl.cdiv(total, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_dtype = q_ptr.dtype.element_ty
    cache_dtype = kc_ptr.dtype.element_ty
    kc_base = kc_ptr + b.to(tl.int64) * kcs_b + kv * kcs_h
    vc_base = vc_ptr + b.to(tl.int64) * vcs_b + kv * vcs_h
    cache_end = tl.minimum(hi, first)
    for start in range(lo, cache_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        valid = cols < cache_end
        k, v = _cache_block(kc_base, vc_base, cols, kcs_s, kcs_d, vcs_s, vcs_d, d, head_dim,
                            valid, qk_dtype, cache_dtype)  # fmt: skip
        scores = _dot(q, k, PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, scores, v, PRECISION)
    k_base = k_ptr + b.to(tl.int64) * ks_b + kv * ks_h
    v_base = v_ptr + b.to(tl.int64) * vs_b + kv * vs_h
    new_lo = tl.maximum(lo, first) - first
    new_hi = hi - first
    last_token = tl.minimum((tl.program_id(0) * BLOCK_M + BLOCK_M - 1) // groups, seq - 1)
    # new tokens sit at ascending contiguous slots, so key col is visible to every row of the
    # block when col <= its first token: whole blocks below that need no mask
    first_token = (tl.program_id(0) * BLOCK_M) // groups
    open_hi = tl.maximum(tl.minimum(first_token + 1, new_hi), new_lo)
    open_hi = new_lo + (open_hi - new_lo) // BLOCK_N * BLOCK_N
    for start in range(new_lo, open_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, v = _cache_block(k_base, v_base, cols, ks_s, ks_d, vs_s, vs_d, d, head_dim,
                            cols < new_hi, qk_dtype, cache_dtype)  # fmt: skip
        scores = _dot(q, k, PRECISION) * qk_scale
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, scores, v, PRECISION)
    for start in range(open_hi, tl.minimum(new_hi, last_token + 1), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        valid = cols < new_hi
        k, v = _cache_block(k_base, v_base, cols, ks_s, ks_d, vs_s, vs_d, d, head_dim, valid,
                            qk_dtype, cache_dtype)  # fmt: skip
        key_slot = tl.load(pos_base + cols * ps_s, mask=valid, other=0)
        visible = valid[None, :] & (key_slot[None, :] <= query_slot[:, None])
        scores = _dot(q, k, PRECISION) * qk_scale
        scores = tl.where(visible, scores, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, scores, v, PRECISION)
    if WRITE_CACHE:  # by the first block of rows only: each new token is stored once
        write_hi = tl.where(tl.program_id(0) == 0, new_hi, new_lo)
        for start in range(new_lo, write_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            valid = cols < new_hi
            _store_new_tokens(k_base, v_base, kc_base, vc_base, pos_base, cols, valid, d,
                              head_dim, ks_s, ks_d, vs_s, vs_d, kcs_s, kcs_d, vcs_s, vcs_d,
                              ps_s)  # fmt: skip
    if NUM_SPLITS == 1:
        out = (out_ptr + b.to(tl.int64) * os_b + head[:, None] * os_h + token[:, None] * os_s
               + d[None, :] * os_d)  # fmt: skip
        tl.store(out, _normalized(acc, l_i).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (d[None, :] < head_dim))  # fmt: skip
    else:
        # partials [B * Hkv, splits, rows, BLOCK_D] and stats [B * Hkv, splits, rows, 2]
        slot = (tl.program_id(1).to(tl.int64) * NUM_SPLITS + split) * rows + r
        tl.store(part_ptr + slot[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(stat_ptr + slot * 2, m_i, mask=row_ok)
        tl.store(stat_ptr + slot * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _store_new_tokens(
    k_base, v_base, kc_base, vc_base, pos_base, cols, valid, d, head_dim,
    ks_s, ks_d, vs_s, vs_d, kcs_s, kcs_d, vcs_s, vcs_d, ps_s,
):  # fmt: skip
    """Write new keys and values [N, D] into the caches at their slots, in the caches' dtype."""
    slot = tl.load(pos_base + cols * ps_s, mask=valid, other=0)
    mask = valid[:, None] & (d[None, :] < head_dim)
    k = tl.load(k_base + cols[:, None] * ks_s + d[None, :] * ks_d, mask=mask)
    v = tl.load(v_base + cols[:, None] * vs_s + d[None, :] * vs_d, mask=mask)
    tl.store(kc_base + slot[:, None] * kcs_s + d[None, :] * kcs_d,
             k.to(kc_base.dtype.element_ty), mask=mask)  # fmt: skip
    tl.store(vc_base + slot[:, None] * vcs_s + d[None, :] * vcs_d,
             v.to(vc_base.dtype.element_ty), mask=mask)  # fmt: skip


@triton.jit
def combine_splits_kernel(
    part_ptr, stat_ptr, out_ptr, kv_heads, groups, seq, head_dim, os_b, os_h, os_s, os_d,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One query row: merge the splits' (output, max, sum) into the softmax over all keys."""
    row = tl.program_id(0)
    bkv = tl.program_id(1)
    rows = seq * groups
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    slot = (bkv.to(tl.int64) * NUM_SPLITS + s) * rows + row
    in_split = s < NUM_SPLITS
    m_s = tl.load(stat_ptr + slot * 2, mask=in_split, other=float("-inf"))
    l_s = tl.load(stat_ptr + slot * 2 + 1, mask=in_split, other=0.0)
    acc = tl.load(part_ptr + slot[:, None] * BLOCK_D + d[None, :], mask=in_split[:, None],
                  other=0.0)  # fmt: skip
    m = tl.max(m_s, axis=0)
    weight = tl.exp2(m_s - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(l_s * weight, axis=0)
    merged = tl.sum(acc * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    b = bkv // kv_heads
    head = (bkv % kv_heads) * groups + row % groups
    out = out_ptr + b.to(tl.int64) * os_b + head * os_h + (row // groups) * os_s + d * os_d
    tl.store(out, merged.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def why_not_attention_cache(node: fx.Node, graph: object, context: object) -> str | None:
    """Declines non-float tensors, q/k/v of mixed dtypes, head counts that do not group,
    head dims that differ, a cache that does not match the new tokens' batch and heads."""
    q, k, v, k_cache, v_cache, positions, scale = node_arguments(node)
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        reason = dtype_reason(name, t)
        if reason:
            return reason
    if not q.dtype == k.dtype == v.dtype or k_cache.dtype != v_cache.dtype:
        return "q, k and v (or the two caches) differ in dtype"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads do not group over {k.shape[1]} KV heads"
    if not q.shape[3] == k.shape[3] == v.shape[3] == k_cache.shape[3] == v_cache.shape[3]:
        return "q, k, v and the caches differ in head dim"
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != k.shape[:2]:
        return "the caches do not match the new keys' batch and heads"
    if positions.dtype not in (torch.int32, torch.int64):
        return "positions are not integers"
    if not isinstance(scale, (int, float)):
        return "scale is not a constant"
    return None


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Programs that run at once: the GPU's SM count (1 under the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cache_launch_shape(q, k, k_cache, config: dict) -> tuple[int, int]:
    """(block_m, num_splits) for a launch: the config's, or chosen from the shapes alone (no
    host read of the positions, so a CUDA graph can replay the launch at any context)."""
    rows = q.shape[1] // k.shape[1] * q.shape[2]
    block_m = config["block_m"] or min(64, max(16, triton.next_power_of_2(rows)))
    splits = config["num_splits"]
    if not splits:
        programs = triton.cdiv(rows, block_m) * k.shape[0] * k.shape[1]
        wanted = triton.cdiv(2 * _multiprocessors(q.device), programs)
        splits = max(1, min(wanted, triton.cdiv(k_cache.shape[2] + k.shape[2], config["block_n"])))
    return block_m, splits


@register_lowering(
    "attention_cache", "triton", label="triton/attention_cache", why_not=why_not_attention_cache
)
def attention_cache(q, k, v, k_cache, v_cache, positions, scale, *, config=None,
                    write_cache=False):  # fmt: skip
    """peakc::attention_cache: q [B, Hq, S, D] over the cache prefix and the new k/v
    [B, Hkv, S, D]; output laid out like q. `write_cache` also stores k/v at `positions`."""
    batch, kv_heads, seq, head_dim = k.shape
    config = config or (PREFILL_CONFIG if seq >= 64 else CACHE_CONFIGS[0])
    groups = q.shape[1] // kv_heads
    out = torch.empty_like(q)
    block_m, splits = _cache_launch_shape(q, k, k_cache, config)
    block_d = _dot_width(head_dim)
    rows = groups * seq
    partials = stats = out
    if splits > 1:
        partials = torch.empty(batch * kv_heads * splits * rows * block_d, device=q.device)
        stats = torch.empty(batch * kv_heads * splits * rows * 2, device=q.device)
    attention_cache_kernel[(triton.cdiv(rows, block_m), batch * kv_heads, splits)](
        q, k, v, k_cache, v_cache, positions, out, partials, stats,
        kv_heads, groups, seq, head_dim, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        *positions.stride(), *out.stride(),
        NUM_SPLITS=splits, WRITE_CACHE=write_cache, PRECISION=_dot_precision(q),
        BLOCK_M=block_m, BLOCK_N=config["block_n"], BLOCK_D=block_d,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    if splits > 1:
        combine_splits_kernel[(rows, batch * kv_heads)](
            partials, stats, out, kv_heads, groups, seq, head_dim, *out.stride(),
            NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )  # fmt: skip
    return out


attention_cache.kernels = (
    attention_cache_kernel,
    combine_splits_kernel,
    _cache_block,
    _store_new_tokens,
    _softmax_step,
    _dot,
    _normalized,
)
attention_cache.configs = CACHE_CONFIGS
