"""Decode steps replayed as CUDA graphs: the Generator's cache-owning step for a triton decoder
compiled with cuda_graph=true (CUDA only).

The step keeps one KV cache per batch size (allocated once, so a graph's addresses hold). The
first decode at a batch size in `decode_batches` captures one graph of the decode_step program
plus the cache write, reading ids and positions from static buffers; later steps copy the new
ids and positions into those buffers and replay it, so the host never waits inside a step.

A prefill is replayed from a graph too: launched one step at a time from Python, a 2048-token
prompt of a 1B model spends about twice the GPU's time on the host. The prompt is right-padded
to a bucket (the next power of two, at least PREFILL_MIN tokens) whose padded tokens continue
the slots after each row's last one, so no real token sees them (causal attention) and decode
overwrites their slots before reading them; one graph per (batch, bucket), the last
PREFILL_GRAPHS kept. A bucket that would run past the cache, or a program that cannot be
captured, runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file

from peakc.errors import PeakcError
from peakc.runtime.generate import write_cache

PREFILL_MIN = 64  # the smallest prefill bucket (tokens)
PREFILL_GRAPHS = 4  # prefill graphs kept (each holds its activations' memory)


def prefill_bucket(seq: int, last_slot: int, max_seq_len: int) -> int | None:
    """The padded length a prompt of `seq` tokens whose last slot is `last_slot` replays at,
    or None when padding it would write past the cache."""
    bucket = max(PREFILL_MIN, 1 << (seq - 1).bit_length())
    return bucket if last_slot + bucket - seq < max_seq_len else None


def pad_prompt(
    ids: torch.Tensor, positions: torch.Tensor, static_ids: torch.Tensor, static_pos: torch.Tensor
) -> None:
    """Copy a prompt into a bucket's static buffers: its tokens, then padding tokens at the
    slots after each row's last one (ascending, as the attention kernels expect)."""
    seq = ids.shape[1]
    static_ids[:, :seq].copy_(ids)
    static_ids[:, seq:].zero_()
    static_pos[:, :seq].copy_(positions)
    tail = torch.arange(1, static_pos.shape[1] - seq + 1, device=positions.device)
    static_pos[:, seq:].copy_(positions[:, -1:] + tail)


class GraphedDecoder:
    """`begin(batch)`, then `(ids, positions) -> logits`: prefill eagerly, decode by replay."""

    def __init__(self, program: Any, layout: dict[str, Any]) -> None:
        from peakc.backends.triton.program import load_triton_program

        folder = program.path.parent
        runtime = program.runtime
        self.prefill = program
        self.decode = load_triton_program(folder / f"{runtime['decode_program']}.triton.json", {})
        stored = load_file(str(folder / "weights.safetensors"), device=str(program.device))
        self.weights = [stored[name] for name in program.spec["weight_names"]]
        self.decode_weights = [stored[name] for name in self.decode.spec["weight_names"]]
        self.layout = layout
        self.batches = sorted(runtime.get("decode_batches") or [])
        self.caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, Any]] = {}
        self.prefill_graphs: dict[tuple[int, int], tuple] = {}  # (batch, bucket), oldest first
        self.prefill_eager = False  # set when the prefill program cannot be captured
        self.batch = 0

    def begin(self, batch: int) -> None:
        if self.batches and batch > self.batches[-1]:
            raise PeakcError(
                f"decode batch {batch} is larger than the captured CUDA graphs' "
                f"(decode_batches {self.batches}); compile with triton{{decode_batches=[...]}}"
            )
        if batch not in self.caches:
            layout = self.layout
            shape = (layout["num_layers"], batch, layout["num_kv_heads"])
            shape += (layout["max_seq_len"], layout["head_dim"])
            dtype = getattr(torch, layout["dtype"])
            k = torch.zeros(shape, dtype=dtype, device=self.prefill.device)
            self.caches[batch] = (k, torch.zeros_like(k))
        self.batch = batch

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        k, v = self.caches[self.batch]
        if ids.shape[1] > 1 and not self.prefill_eager:
            logits = self.replay_prefill(ids, positions, k, v)
            if logits is not None:
                return logits
        if ids.shape[1] > 1 or self.batch not in self.batches:
            if ids.shape[1] > 1:
                logits, new_k, new_v = self.prefill(*self.weights, ids, positions, k, v)
            else:
                logits, new_k, new_v = self.decode(*self.decode_weights, ids, positions, k, v)
            write_cache(k, v, new_k, new_v, positions)
            return logits
        if self.batch not in self.graphs:
            self.graphs[self.batch] = self.capture(k, v)
        graph, static_ids, static_positions, logits = self.graphs[self.batch]
        static_ids.copy_(ids)
        static_positions.copy_(positions)
        graph.replay()
        return logits

    def capture(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """One graph of a decode step at the current batch size over its static buffers."""
        device = self.prefill.device
        static_ids = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        static_positions = torch.zeros(self.batch, 1, dtype=torch.long, device=device)

        def step() -> torch.Tensor:
            weights = self.decode_weights
            logits, new_k, new_v = self.decode(*weights, static_ids, static_positions, k, v)
            write_cache(k, v, new_k, new_v, static_positions)
            return logits

        graph, logits = self.graph_of(step, k, v, warmups=2)
        return graph, static_ids, static_positions, logits

    def graph_of(
        self, step: Callable[[], torch.Tensor], k: torch.Tensor, v: torch.Tensor, warmups: int
    ) -> tuple:
        """(graph, its output) of `step`, after `warmups` runs on a side stream (Triton compiles
        and autotunes outside the capture); the cache the runs write is put back."""
        device = self.prefill.device
        saved = (k.clone(), v.clone())
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(warmups):
                    step()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                logits = step()
        finally:
            k.copy_(saved[0])
            v.copy_(saved[1])
        return graph, logits

    def replay_prefill(
        self, ids: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor | None:
        """The prompt's logits [B, S, V] from its bucket's graph (captured on first use), or
        None where the prompt runs eagerly (module docstring)."""
        seq = ids.shape[1]
        bucket = prefill_bucket(seq, int(positions[:, -1].max()), self.layout["max_seq_len"])
        if bucket is None:
            return None
        key = (self.batch, bucket)
        if key not in self.prefill_graphs:
            captured = self.capture_prefill(bucket, k, v)
            if captured is None:
                self.prefill_eager = True
                return None
            if len(self.prefill_graphs) >= PREFILL_GRAPHS:
                del self.prefill_graphs[next(iter(self.prefill_graphs))]
            self.prefill_graphs[key] = captured
        graph, static_ids, static_pos, logits = self.prefill_graphs[key]
        pad_prompt(ids, positions, static_ids, static_pos)
        graph.replay()
        return logits[:, :seq]

    def capture_prefill(self, bucket: int, k: torch.Tensor, v: torch.Tensor) -> tuple | None:
        """One graph of the prefill program at (batch, bucket) plus its cache write, or None
        when the program cannot be captured."""
        device = self.prefill.device
        static_ids = torch.zeros(self.batch, bucket, dtype=torch.long, device=device)
        static_pos = torch.arange(bucket, device=device).expand(self.batch, bucket).contiguous()

        def step() -> torch.Tensor:
            logits, new_k, new_v = self.prefill(*self.weights, static_ids, static_pos, k, v)
            write_cache(k, v, new_k, new_v, static_pos)
            return logits

        try:
            graph, logits = self.graph_of(step, k, v, warmups=1)
        except RuntimeError:  # an op that synchronizes with the host: run eagerly
            torch.cuda.synchronize(device)
            return None
        return graph, static_ids, static_pos, logits
