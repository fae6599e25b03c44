"""Run an exported ONNX program with onnxruntime, called like an eager artifact program.

One code path on every device: inputs are bound by data pointer (IOBinding), outputs are
allocated by onnxruntime on the session's device and handed to torch through DLPack.
The CUDA execution provider is used when onnxruntime-gpu provides it, the CPU one otherwise.
A program whose GroupQueryAttention cache was rewritten to shared buffers (shared_cache.py)
is still called with the original inputs (the cache layers are copied into buffers for the
call); the Generator instead uses `cache_owning_step()`, which keeps the buffers across steps.
Decode can run on static programs (static_decode.py: one per batch size, every node on the
CUDA provider): `decode_session(batch)` loads one on first use. With cuda_graph, those sessions
are created with enable_cuda_graph and their fixed-address runs (decode_binding.py) are captured
and replayed; the main (dynamic, prefill) session never uses CUDA graphs.
All sessions of a program take the weights the programs hold alike from one OrtValue each on
the device (shared_weights.py; by default on CUDA only, see resolve_share_weights).
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import torch

from peakc.backends.ort.decode_binding import SharedCacheStep
from peakc.backends.ort.io_binding import bind_presents, bind_tensor, device_index, host_int32
from peakc.backends.ort.shared_cache import read_layout
from peakc.backends.ort.shared_weights import (
    SharedWeights,
    common_initializers,
    load_shared_weights,
)
from peakc.errors import PeakcError
from peakc.runtime.artifact import register_program_format

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


def parse_flag(option: str, value: str | bool, auto: bool = False) -> bool | None:
    """A true/false backend option (1/0 too; "auto" -> None where `auto` allows it); anything
    else is a one-line error naming the option."""
    text = str(value).strip().lower()
    if auto and text == "auto":
        return None
    if text not in ("true", "false", "1", "0"):
        choices = "auto, true or false" if auto else "true or false"
        raise PeakcError(f"backend ort: {option} must be {choices}; got '{value}'")
    return text in ("true", "1")


def resolve_cuda_graph(cuda_graph: str | bool, device: str) -> bool:
    """cuda_graph=true|false (decode steps on the static decode programs as CUDA graphs);
    true on the CPU is an error."""
    flag = parse_flag("cuda_graph", cuda_graph)
    if flag and device != "cuda":
        raise PeakcError("backend ort: cuda_graph=true needs device=cuda")
    return bool(flag)


def resolve_share_weights(share_weights: str | bool, device: str) -> bool:
    """share_weights=auto|true|false: whether the sessions of a program share one copy of the
    weights on the device. auto shares on CUDA, where each session would copy them to the GPU,
    not on the CPU, where onnxruntime maps the external data file itself (its sessions share
    the file's pages) and shared values only keep the pages that prepacking read resident."""
    flag = parse_flag("share_weights", share_weights, auto=True)
    return device == "cuda" if flag is None else flag


class OrtProgram:
    """An InferenceSession called with (*inputs) and returning a tuple of torch tensors.

    ONNX programs hold their weights as initializers, so they take no weight arguments.
    Outputs come back on the device of the first input (copied when the session's differs).
    """

    def __init__(
        self,
        path: Path,
        device: str = "auto",
        cuda_graph: str | bool = "false",
        decode_programs: dict[str, str] | None = None,
        share_weights: str | bool = "auto",
    ) -> None:
        self.path = Path(path)
        self.device = resolve_device(device)
        self.provider = CUDA if self.device == "cuda" else CPU
        self.cuda_graph = resolve_cuda_graph(cuda_graph, self.device)
        self.decode_programs = {int(b): name for b, name in (decode_programs or {}).items()}
        self.decode_sessions: dict[int, onnxruntime.InferenceSession] = {}
        self.shared_weights = None  # SharedWeights: one OrtValue per weight for all sessions
        if resolve_share_weights(share_weights, self.device):
            self.shared_weights = self.load_shared_weights()
        self.session = load_session(self.path, self.provider, self.shared_weights)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.shared_cache = read_layout(self.session.get_modelmeta().custom_metadata_map)
        self.call_inputs = self.shared_cache.original_inputs if self.shared_cache else []
        presents = {b.present for b in self.shared_cache.buffers} if self.shared_cache else ()
        self.call_outputs = [n for n in self.output_names if n not in presents]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        expected = self.call_inputs or self.input_names
        if len(inputs) != len(expected):
            raise PeakcError(f"ONNX program takes {len(expected)} inputs, got {len(inputs)}")
        target = torch.device(self.device)
        back_to = inputs[0].device if inputs else target
        named = {n: t.detach().to(target).contiguous() for n, t in zip(expected, inputs)}
        buffers: dict[str, torch.Tensor] = {}
        if self.shared_cache is not None:
            named, buffers = self.shared_inputs(named)
        binding = self.session.io_binding()
        for name in self.input_names:
            bind_tensor(binding.bind_input, name, named[name])
        for name in self.call_outputs:
            binding.bind_output(name, self.device, device_index(target))
        if self.shared_cache is not None:
            bind_presents(binding, self.shared_cache, buffers)
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()  # torch's writes before ORT's stream reads
        self.session.run_with_iobinding(binding)
        outputs = [torch.from_dlpack(v._ortvalue) for v in binding.get_outputs()]
        return tuple(o.to(back_to) for o in outputs[: len(self.call_outputs)])

    def shared_inputs(
        self, named: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The rewritten program's inputs for a call with the original ones: each cache layer
        copied into its own past/present buffer, the total length from the positions."""
        layout = self.shared_cache
        buffers = {}
        for buffer in layout.buffers:
            source = named[buffer.source]
            layer = source if buffer.index is None else source[buffer.index]
            buffers[buffer.past] = layer.clone().contiguous()
        total = int(named[layout.positions].max()) + 1
        named = {**named, **buffers, layout.total_length: host_int32(total)}
        return named, buffers

    def decode_session(self, batch: int) -> onnxruntime.InferenceSession | None:
        """The static decode program's session for `batch` (CUDA graphs with cuda_graph), or
        None when the artifact has none (the dynamic session decodes; not with cuda_graph)."""
        if batch not in self.decode_programs:
            if self.cuda_graph:
                raise PeakcError(
                    f"{self.path.name}: cuda_graph decode at batch {batch} needs a static decode "
                    f"program; the artifact has batches {sorted(self.decode_programs)} "
                    "(compile with ort{decode_batches=...})"
                )
            return None
        if batch not in self.decode_sessions:
            path = self.path.parent / self.decode_programs[batch]
            provider = (CUDA, {"enable_cuda_graph": "1"}) if self.cuda_graph else self.provider
            self.decode_sessions[batch] = load_session(path, provider, self.shared_weights)
        return self.decode_sessions[batch]

    def load_shared_weights(self) -> SharedWeights:
        """The weights every program (this one and its static decode programs) holds alike,
        read once onto the session device (device 0 on CUDA, where the sessions run)."""
        paths = [self.path] + [self.path.parent / n for n in self.decode_programs.values()]
        initializers = common_initializers(paths)
        return load_shared_weights(self.path.parent, initializers, self.device, 0)

    def cache_owning_step(self, layout: dict):
        """A Generator step keeping the KV cache in shared buffers, or None (no shared cache)."""
        if self.shared_cache is None:
            return None
        return SharedCacheStep(self, layout)


def load_session(
    path: Path, provider, shared: SharedWeights | None = None
) -> onnxruntime.InferenceSession:
    """An InferenceSession on one provider, using the `shared` weights' values in place of its
    own copies; load failures as a one-line PeakcError."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # the CPU threads the runtime commands set (--threads, runtime/threads.py), not ONNX
    # Runtime's own default of every core
    options.intra_op_num_threads = torch.get_num_threads()
    if shared is not None:
        shared.add_to(options)
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=[provider])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        text = str(exc).strip().splitlines()
        raise PeakcError(
            f"{path.name}: onnxruntime cannot load it: {text[0] if text else exc}"
        ) from exc


def load_onnx_program(path: Path, runtime: dict) -> OrtProgram:
    """An artifact's ONNX program, with its manifest entry's runtime options (device, ...)."""
    return OrtProgram(path, **runtime)


register_program_format("onnx", load_onnx_program)
