"""Run an exported ONNX program with onnxruntime, called like an eager artifact program.

One code path on every device: inputs are bound by data pointer (IOBinding), outputs are
allocated by onnxruntime on the session's device and handed to torch through DLPack.
The CUDA execution provider is used when onnxruntime-gpu provides it, the CPU one otherwise.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import torch

from peakc.errors import PeakcError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def available_devices() -> list[str]:
    """'cuda' when onnxruntime has the CUDA execution provider, and always 'cpu'."""
    return (["cuda"] if CUDA in onnxruntime.get_available_providers() else []) + ["cpu"]


def resolve_device(device: str) -> str:
    """'auto' -> the best available device; 'cuda' without onnxruntime-gpu is an error."""
    if device == "auto":
        return available_devices()[0]
    if device not in ("cpu", "cuda"):
        raise PeakcError(f"backend ort: device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and "cuda" not in available_devices():
        raise PeakcError(
            "backend ort: device=cuda needs onnxruntime-gpu (CUDAExecutionProvider is not "
            f"available; onnxruntime {onnxruntime.__version__} has "
            f"{', '.join(onnxruntime.get_available_providers())})"
        )
    return device


class OrtProgram:
    """An InferenceSession called with (*inputs) and returning a tuple of torch tensors.

    ONNX programs hold their weights as initializers, so they take no weight arguments.
    Outputs come back on the device of the first input (copied when the session's differs).
    """

    def __init__(self, path: Path, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.provider = CUDA if self.device == "cuda" else CPU
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=[self.provider]
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            text = str(exc).strip().splitlines()
            raise PeakcError(
                f"{path.name}: onnxruntime cannot load it: {text[0] if text else exc}"
            ) from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise PeakcError(
                f"ONNX program takes {len(self.input_names)} inputs, got {len(inputs)}"
            )
        target = torch.device(self.device)
        back_to = inputs[0].device if inputs else target
        bound = [t.detach().to(target).contiguous() for t in inputs]  # kept alive for the run
        binding = self.session.io_binding()
        for name, t in zip(self.input_names, bound):
            binding.bind_input(
                name,
                self.device,
                _device_id(t),
                _numpy_dtype(t.dtype),
                list(t.shape),
                t.data_ptr(),
            )
        for name in self.output_names:
            binding.bind_output(name, self.device, _device_id_for(target))
        if self.device == "cuda":
            binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        if self.device == "cuda":
            binding.synchronize_outputs()
        outputs = [torch.from_dlpack(v._ortvalue) for v in binding.get_outputs()]
        return tuple(o.to(back_to) for o in outputs)


def _device_id(t: torch.Tensor) -> int:
    return t.device.index or 0 if t.device.type == "cuda" else 0


def _device_id_for(device: torch.device) -> int:
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
