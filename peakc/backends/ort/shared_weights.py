"""Weights loaded once per device for every session of an ONNX program.

Every ONNX program of an artifact (the dynamic decoder and its static decode programs) keeps
its initializers in one external data file. Those that all programs hold with the same name,
dtype, shape and place in that file are read once (numpy memmap at the recorded offset) into
OrtValues on the session device and handed to each session through
`SessionOptions.add_initializer`; onnxruntime then uses the value in place instead of loading
its own copy (it copies only a value that lies on another device than the one it plans).

Left to each session: initializers stored inside a model (small constants, values created by
constant folding), dtypes other than floats and bytes (index and shape constants, which
onnxruntime may plan on the host) and anything a program lacks or holds differently.
The data file's checksum is verified by `load_artifact` before any session exists; here each
initializer must also lie inside the file with the size its dtype and shape give.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from peakc.errors import PeakcError

# ONNX element type -> the numpy dtype its bytes are read as (bfloat16 as its raw 16 bits)
SHAREABLE_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.BFLOAT16: np.uint16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.UINT8: np.uint8,  # MatMulNBits' packed weights and zero points
    onnx.TensorProto.INT8: np.int8,
}
NUMPY_NATIVE = {t for t in SHAREABLE_TYPES if t != onnx.TensorProto.BFLOAT16}
TORCH_TYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT8: torch.int8,
}


@dataclass(frozen=True)
class ExternalInitializer:
    """An initializer whose data lies in an external data file, as the model records it."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    location: str
    offset: int
    length: int

    @property
    def nbytes(self) -> int:
        """The size its dtype and shape give."""
        itemsize = np.dtype(SHAREABLE_TYPES[self.data_type]).itemsize
        return math.prod(self.dims) * itemsize


@dataclass
class SharedWeights:
    """OrtValues given to every session of one program; they must outlive those sessions."""

    device: str
    values: dict[str, onnxruntime.OrtValue]
    nbytes: int
    sessions: int = 0  # sessions created with them
    # the memory under each value, in order (the mapped file on the CPU, a torch copy on CUDA)
    memory: list[np.ndarray | torch.Tensor] = field(default_factory=list, repr=False)

    def add_to(self, options: onnxruntime.SessionOptions) -> None:
        """Make a session created with `options` use the shared values."""
        for name, value in self.values.items():
            options.add_initializer(name, value)
        self.sessions += 1

    def report(self) -> dict[str, Any]:
        """Bytes of weights on the device, how many initializers, shared by how many sessions."""
        return {
            "device": self.device,
            "initializers": len(self.values),
            "bytes": self.nbytes,
            "sessions": self.sessions,
        }


def external_initializers(path: Path) -> dict[str, ExternalInitializer]:
    """The initializers of an ONNX file kept in external data, of a shareable dtype (reads the
    model's protobuf only, not the data)."""
    model = onnx.load(str(path), load_external_data=False)
    found = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if tensor.data_type not in SHAREABLE_TYPES:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        init = ExternalInitializer(
            name=tensor.name,
            data_type=tensor.data_type,
            dims=tuple(tensor.dims),
            location=info.get("location", ""),
            offset=int(info.get("offset", 0)),
            length=int(info.get("length", -1)),
        )
        found[tensor.name] = init
    return found


def embedded_bytes(path: Path) -> int:
    """Bytes of initializer data stored inside an ONNX file (not in external data)."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(
        len(t.raw_data)
        for t in model.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL
    )


def common_initializers(paths: list[Path]) -> list[ExternalInitializer]:
    """The external initializers that every program holds identically (name, dtype, shape,
    file, offset and length), in the first program's order; empty ones are left out."""
    tables = [external_initializers(p) for p in paths]
    first, rest = tables[0], tables[1:]
    return [
        init
        for name, init in first.items()
        if init.nbytes > 0 and all(table.get(name) == init for table in rest)
    ]


def load_shared_weights(
    folder: Path, initializers: list[ExternalInitializer], device: str, index: int = 0
) -> SharedWeights:
    """Read each initializer once from its data file into an OrtValue on `device` ('cpu':
    the memory-mapped file itself, no copy; 'cuda': one copy on GPU `index`)."""
    name = device if device == "cpu" else f"{device}:{index}"
    shared = SharedWeights(device=name, values={}, nbytes=0)
    for init in initializers:
        array = read_initializer(folder, init)
        shared.values[init.name] = ort_value(array, init, device, index, shared.memory)
        shared.nbytes += init.nbytes
    return shared


def read_initializer(folder: Path, init: ExternalInitializer) -> np.ndarray:
    """The initializer's data as a read-only memmap; refuses a location outside `folder`, a
    recorded length that its dtype and shape do not give, and data past the file's end."""
    file = folder / init.location
    if not init.location or file.resolve().parent != folder.resolve():
        raise PeakcError(
            f"initializer {init.name}: external data location '{init.location}' is not a file "
            f"in {folder}"
        )
    if not file.is_file():
        raise PeakcError(f"{file.name} is missing (external data of initializer {init.name})")
    if init.length not in (-1, init.nbytes):
        raise PeakcError(
            f"{file.name}: initializer {init.name} records {init.length} bytes, its dtype and "
            f"shape {list(init.dims)} give {init.nbytes}"
        )
    size = file.stat().st_size
    if init.offset < 0 or init.offset + init.nbytes > size:
        raise PeakcError(
            f"{file.name}: initializer {init.name} at bytes {init.offset}..."
            f"{init.offset + init.nbytes} lies past the file's end ({size} bytes)"
        )
    dtype = SHAREABLE_TYPES[init.data_type]
    return np.memmap(file, dtype=dtype, mode="r", offset=init.offset, shape=init.dims)


def ort_value(
    array: np.ndarray, init: ExternalInitializer, device: str, index: int, keep: list
) -> onnxruntime.OrtValue:
    """An OrtValue of the initializer's element type: on the CPU over `array` itself, on CUDA
    over one copy on GPU `index` held in torch memory; the memory is appended to `keep`. ORT
    takes a shared initializer only over memory the caller owns, so the CUDA copy comes in
    through DLPack."""
    OrtValue = onnxruntime.OrtValue
    if device == "cpu":
        keep.append(array)
        if init.data_type in NUMPY_NATIVE:
            return OrtValue.ortvalue_from_numpy(array)
        return OrtValue.ortvalue_from_numpy_with_onnx_type(array, init.data_type)
    with warnings.catch_warnings():  # the memmap is read-only; it is only read, then copied
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(np.ascontiguousarray(array).view(np.uint8))
    tensor = raw.to(f"cuda:{index}").view(TORCH_TYPES[init.data_type]).view(list(init.dims))
    keep.append(tensor)
    return OrtValue.from_dlpack(tensor.__dlpack__())
