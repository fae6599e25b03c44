"""Torch tensors bound to onnxruntime IOBindings by pointer, and the small values around them.

Shared by the program's own calls (session.py) and the Generator's cache-owning step
(decode_binding.py), so neither imports the other for them.
"""

from __future__ import annotations

import onnxruntime
import torch

from peakc.errors import PeakcError


def host_int32(value: int) -> torch.Tensor:
    """An int32 scalar in host memory (GroupQueryAttention reads total_sequence_length there)."""
    return torch.tensor(value, dtype=torch.int32)


def bind_tensor(bind, name: str, t: torch.Tensor) -> None:
    """Bind a torch tensor by pointer (input or output; host tensors as CPU memory). `bind` is
    an IOBinding's bind_input or bind_output; bfloat16, which numpy lacks, goes in as an
    OrtValue over the same memory (DLPack)."""
    if t.dtype == torch.bfloat16:
        binding = bind.__self__
        by_value = {
            "bind_input": binding.bind_ortvalue_input,
            "bind_output": binding.bind_ortvalue_output,
        }[bind.__name__]
        by_value(name, onnxruntime.OrtValue.from_dlpack(t.__dlpack__()))
        return
    device = "cuda" if t.device.type == "cuda" else "cpu"
    bind(name, device, device_index(t.device), _numpy_dtype(t.dtype), list(t.shape), t.data_ptr())


def device_index(device: torch.device) -> int:
    """The device id onnxruntime binds for a torch device (0 for the CPU)."""
    return device.index or 0 if device.type == "cuda" else 0


def _numpy_dtype(dtype: torch.dtype):
    import numpy as np

    table = {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.int64: np.int64,
        torch.int32: np.int32,
        torch.bool: np.bool_,
    }
    if dtype not in table:
        raise PeakcError(f"ONNX program: inputs of dtype {dtype} are not supported")
    return table[dtype]


def bind_presents(binding, cache, buffers: dict[str, torch.Tensor]) -> None:
    """Each shared buffer as its layer's present output too: GroupQueryAttention writes the new
    tokens into the past buffer in place."""
    for buffer in cache.buffers:
        bind_tensor(binding.bind_output, buffer.present, buffers[buffer.past])


def run_options(graph_id: int) -> onnxruntime.RunOptions:
    """Run options naming the CUDA graph to capture/replay; -1 runs without a graph."""
    options = onnxruntime.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options
