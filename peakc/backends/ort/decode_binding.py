"""The Generator's step for an ONNX decoder whose KV cache is shared past/present buffers.

One [batch, kv_heads, max_len, head_dim] buffer per layer and K/V, bound as both past and
present of its GroupQueryAttention (the op writes the new tokens in place: no cache copy,
no scatter). Prefill binds the prompt's ids/positions as given. Decode (one token per
sequence) binds once per batch size: ids, positions, logits and the other outputs live in
fixed buffers that each step updates in place, and total_sequence_length is the cache
length (a constant; GroupQueryAttention reads the real lengths from seqlens_k, on the device).
Decode runs on the batch's static decode program when the artifact has one (static_decode.py),
else on the dynamic program. With cuda_graph the static program's session captures the first
run after its warm-up and replays it (graph id = batch size): every bound address and the host
total length stay fixed. The same code runs on the CPU provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from peakc.backends.ort.io_binding import (
    bind_presents,
    bind_tensor,
    device_index,
    host_int32,
    run_options,
)
from peakc.errors import PeakcError

ORT_DTYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
}


@dataclass
class DecodeBinding:
    """One batch size's fixed-address decode run: the IOBinding and the tensors it points to."""

    session: Any
    binding: Any
    ids: torch.Tensor
    positions: torch.Tensor
    outputs: dict[str, torch.Tensor]
    total: torch.Tensor
    runs: int = 0


class CacheSharingProgram(Protocol):
    """What the step uses of the OrtProgram (session.py) that creates it."""

    device: str
    session: Any  # the dynamic (prefill) InferenceSession
    shared_cache: Any  # its SharedCacheLayout
    cuda_graph: bool
    call_outputs: list[str]

    def decode_session(self, batch: int) -> Any: ...


class SharedCacheStep:
    """`begin(batch)` then `step(ids, positions) -> logits`: the cache stays in the buffers."""

    def __init__(self, program: CacheSharingProgram, layout: dict[str, Any]) -> None:
        self.program = program
        self.cache = program.shared_cache
        self.layout = layout
        self.device = torch.device(program.device)
        self.max_len = int(layout["max_seq_len"])
        self.buffers: dict[str, torch.Tensor] = {}
        self.decode: dict[int, DecodeBinding] = {}
        self.batch = 0
        inputs = {i.name: i for i in program.session.get_inputs()}
        self.cache_dtype = ORT_DTYPES[inputs[self.cache.buffers[0].past].type]

    @property
    def cuda_graph(self) -> bool:
        return self.program.cuda_graph

    def begin(self, batch: int) -> None:
        """Buffers for `batch` sequences (kept, with their decode binding, while it is equal)."""
        if batch == self.batch:
            return
        shape = (batch, self.layout["num_kv_heads"], self.max_len, self.layout["head_dim"])
        self.buffers = {
            b.past: torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            for b in self.cache.buffers
        }
        self.decode.clear()
        self.batch = batch

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] != self.batch:
            raise PeakcError(f"decoder step: batch {ids.shape[0]}, buffers for {self.batch}")
        if ids.shape[1] == 1:
            return self.decode_step(ids, positions)
        return self.prefill(ids, positions)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A one-off binding; the total length is the prompt width (GQA's first prompt)."""
        session = self.program.session
        binding = session.io_binding()
        ids, positions = ids.to(self.device).contiguous(), positions.to(self.device).contiguous()
        total = host_int32(int(positions.max()) + 1)
        self.bind_inputs(binding.bind_input, ids, positions, total)
        for name in self.program.call_outputs:
            binding.bind_output(name, self.program.device, device_index(self.device))
        bind_presents(binding, self.cache, self.buffers)
        self.sync()
        session.run_with_iobinding(binding)
        return torch.from_dlpack(binding.get_outputs()[0]._ortvalue)

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Update the fixed inputs in place and run the batch's binding (a CUDA graph replay
        after the first runs when cuda_graph is on)."""
        run = self.decode.get(self.batch) or self.bind_decode()
        run.ids.copy_(ids)
        run.positions.copy_(positions)
        self.sync()
        options = run_options(self.batch) if self.cuda_graph else None
        run.session.run_with_iobinding(run.binding, options)
        run.runs += 1
        return run.outputs[self.program.call_outputs[0]]

    def bind_decode(self) -> DecodeBinding:
        session = self.program.decode_session(self.batch) or self.program.session
        binding = session.io_binding()
        ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        positions = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        total = host_int32(self.max_len)
        self.bind_inputs(binding.bind_input, ids, positions, total, session)
        outputs = {}
        produced = {o.name for o in session.get_outputs()}  # static programs: logits only
        for name in [n for n in self.program.call_outputs if n in produced]:
            outputs[name] = self.output_buffer(name, session)
            bind_tensor(binding.bind_output, name, outputs[name])
        bind_presents(binding, self.cache, self.buffers)
        run = DecodeBinding(session, binding, ids, positions, outputs, total)
        self.decode[self.batch] = run
        return run

    def bind_inputs(self, bind, ids, positions, total, session=None) -> None:
        """ids/positions by the program's original input order, cache buffers, total length."""
        given = {self.cache.original_inputs[0]: ids, self.cache.positions: positions}
        session = session or self.program.session
        for name in [i.name for i in session.get_inputs()]:
            if name in given:
                bind_tensor(bind, name, given[name])
            elif name == self.cache.total_length:
                bind_tensor(bind, name, total)
            elif name in self.buffers:
                bind_tensor(bind, name, self.buffers[name])
            else:
                raise PeakcError(f"decoder step: no value for ONNX input '{name}'")

    def output_buffer(self, name: str, session) -> torch.Tensor:
        """A fixed buffer for a decode output: its symbolic dims resolved (batch, seq=1)."""
        info = {o.name: o for o in session.get_outputs()}[name]
        batch_dim, seq_dim = self.program.session.get_inputs()[0].shape[:2]  # input_ids
        sizes = {batch_dim: self.batch, seq_dim: 1}
        shape = []
        for dim in info.shape:
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in sizes:
                shape.append(sizes[dim])
            else:
                raise PeakcError(f"decoder step: output '{name}' has an unknown dim '{dim}'")
        return torch.empty(shape, dtype=ORT_DTYPES[info.type], device=self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # torch's writes before ORT's stream
