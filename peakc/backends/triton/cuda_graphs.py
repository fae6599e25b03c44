"""Decode steps replayed as CUDA graphs: the Generator's cache-owning step for a triton decoder
compiled with cuda_graph=true (CUDA only).

The step keeps one KV cache per batch size (allocated once, so a graph's addresses hold). A
prefill runs the decoder program and writes its keys and values into the cache. The first
decode at a batch size in `decode_batches` captures one graph of the decode_step program plus
the cache write, reading ids and positions from static buffers; later steps copy the new ids
and positions into those buffers and replay it, so the host never waits inside a step.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file

from peakc.errors import PeakcError
from peakc.runtime.generate import write_cache


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
        saved = (k.clone(), v.clone())  # warm-up steps write slot 0; the cache is put back

        def step() -> torch.Tensor:
            weights = self.decode_weights
            logits, new_k, new_v = self.decode(*weights, static_ids, static_positions, k, v)
            write_cache(k, v, new_k, new_v, static_positions)
            return logits

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # Triton compiles and autotunes outside the capture
                step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            logits = step()
        k.copy_(saved[0])
        v.copy_(saved[1])
        return graph, static_ids, static_positions, logits
