"""ort backend: export the transformed graph to ONNX, check it, run it once for parity.

resolve the device -> export (contrib ops, cleanup, IR version, checker) -> parity on the
example inputs against the graph -> static decode programs -> artifact contents (weights in
one external data file that every ONNX program of the artifact references)
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import onnxruntime
import torch

from peakc.backends.base import Backend, lowering_report, program_name, register_backend
from peakc.backends.ort.export import EXTERNAL_DATA_SUFFIX, OnnxExport, export_onnx
from peakc.backends.ort.matmul_nbits import MatMulNBitsContext
from peakc.backends.ort.session import (
    OrtProgram,
    resolve_cuda_graph,
    resolve_device,
    resolve_share_weights,
)
from peakc.backends.ort.shared_weights import common_initializers, embedded_bytes
from peakc.backends.ort.static_decode import decode_program_name, specialize_decode
from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.passes.base import PassContext
from peakc.passes.instruments import relative_error
from peakc.runtime.artifact import ArtifactContents, program_signature

IN_MEMORY_BYTES = 2**31  # a smaller external data file is held as bytes until saved, not moved
# on the norm-wise relative error ‖ort − graph‖ / ‖graph‖, as the pipeline's parity checks
PARITY_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class OrtOptions:
    """Options of the ort backend (`ort{device=cuda,cuda_graph=true,decode_batches=[1,8]}`)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # decode steps on the static decode programs replayed as CUDA graphs (needs device=cuda)
    cuda_graph: bool = False
    # static decode programs (static_decode.py): auto = 1..max_batch with cuda_graph, none
    # without; none; or the batch sizes, e.g. [1,8]
    decode_batches: Literal["auto", "none"] | list[int] = "auto"
    # the sessions of a program take the weights from one OrtValue each on the device
    # (shared_weights.py; auto: on CUDA only); false: a copy per session
    share_weights: Literal["auto"] | bool = "auto"
    # rotary and packed QKV inside GroupQueryAttention (gqa_fold.py)
    fold_rotary: bool = True
    # the compile-time parity bound: auto = PARITY_TOL for the output's dtype, or a number
    parity_tol: Literal["auto"] | float = "auto"


@register_backend
class OrtBackend(Backend):
    """ONNX Runtime: contrib ops, GroupQueryAttention over a shared KV cache, MatMulNBits,
    static decode programs and CUDA graphs; checked for parity at compile time."""

    name: ClassVar[str] = "ort"
    Options: ClassVar[type] = OrtOptions

    def __init__(self, options: OrtOptions | None = None) -> None:
        super().__init__(options)
        o = self.options  # as the runtime entry and the resolvers below spell them
        self.device = o.device
        self.cuda_graph = _flag(o.cuda_graph)
        self.share_weights = _flag(o.share_weights)
        self.fold_rotary = o.fold_rotary
        self.parity_tol = None if o.parity_tol == "auto" else float(o.parity_tol)
        batches = o.decode_batches
        self.decode_batches = batches if isinstance(batches, str) else "+".join(map(str, batches))

    def validate(self) -> None:
        self.check_runtime_options("auto, none")

    def lower(self, graph: Graph, ctx: PassContext, pipeline: str) -> ArtifactContents:
        device = resolve_device(self.device)
        cuda_graph = resolve_cuda_graph(self.cuda_graph, device)
        share = resolve_share_weights(self.share_weights, device)
        program = program_name(graph)
        folder = Path(tempfile.mkdtemp(prefix="peakc-ort-"))
        path = folder / f"{program}.onnx"
        try:
            with ctx.progress(f"export {path.name}", 1):  # lines of the CLI's progress display
                exported = export_onnx(graph, path, device, self.fold_rotary)
            with ctx.progress(f"parity of {path.name} ({device})", 1):
                session = OrtProgram(path, device, "false", share_weights=share)
                parity = check_parity(graph, session, self.parity_tol)
                del session  # its weights leave the device before the decode programs are made
            batches = resolve_decode_batches(self.decode_batches, graph, cuda_graph, exported)
            extra: dict[str, Any] = {}
            decode_programs = {}
            for batch in batches:  # each references the decoder's external data file
                name = decode_program_name(program, batch)
                with ctx.progress(f"export {name} (batch {batch})", 1):
                    specialize_decode(path, batch, folder / name)
                decode_programs[str(batch)] = name
                extra[name] = (folder / name).read_bytes()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # no half-written export left in /tmp
            raise
        info = program_signature(graph, weights=[], format="onnx")
        info.runtime = {
            "device": self.device,
            "cuda_graph": self.cuda_graph,
            "share_weights": self.share_weights,
        }
        if decode_programs:
            info.runtime["decode_programs"] = decode_programs
        data_file = folder / (path.name + EXTERNAL_DATA_SUFFIX)
        weights = weights_report(data_file, [path] + [folder / n for n in decode_programs.values()])
        in_memory = data_file.stat().st_size < IN_MEMORY_BYTES
        extra[data_file.name] = data_file.read_bytes() if in_memory else data_file
        data = path.read_bytes()
        if in_memory:
            shutil.rmtree(folder, ignore_errors=True)
        else:  # only the large data file stays in the folder, until it is saved (moved out)
            for name in [path.name, *decode_programs.values()]:
                (folder / name).unlink()
        ops = lowering_report(
            graph, self.name, MatMulNBitsContext(device), unlowered="reference (exported)"
        )
        contents = ArtifactContents(
            backend=self.name,
            pipeline=pipeline,
            source=graph.info.get("name", "model"),
            weights={},
            example_inputs=graph.example_inputs,
            programs={program: (data, info)},
            report={
                "ops": ops,
                "ort": {
                    **ort_report(exported, device, parity, cuda_graph),
                    "parity_tol": "auto" if self.parity_tol is None else self.parity_tol,
                    "static_decode_batches": batches,
                    "weights": weights,
                },
            },
            extra_files=extra,
        )
        if not in_memory:  # the folder goes with the contents, saved or not (or at exit)
            weakref.finalize(contents, shutil.rmtree, folder, True)
        return contents


def _flag(value: bool | str) -> str:
    """A typed option as the artifact's runtime entry spells it ("true", "false", "auto")."""
    return value if isinstance(value, str) else ("true" if value else "false")


def resolve_decode_batches(
    value: str, graph: Graph, cuda_graph: bool, exported: OnnxExport
) -> list[int]:
    """The batch sizes that get a static decode program: 'auto' is 1..max_batch when decode
    runs as CUDA graphs (a graph needs static shapes) and none otherwise."""
    generation = graph.info.get("generation")
    if value == "none" or (value == "auto" and not cuda_graph):
        return []
    if generation is None or exported.shared_cache is None:
        if value == "auto":
            return []
        raise PeakcError(
            "backend ort: decode_batches needs a --task generate decoder whose attention is "
            "GroupQueryAttention over a shared cache"
        )
    max_batch = int(generation["max_batch"])
    if value == "auto":
        return list(range(1, max_batch + 1))
    try:
        batches = sorted({int(b) for b in value.split("+") if b.strip()})
    except ValueError:
        raise PeakcError(
            f"backend ort: decode_batches must be auto, none or sizes like 1+8; got '{value}'"
        ) from None
    if not batches or batches[0] < 1 or batches[-1] > max_batch:
        raise PeakcError(
            f"backend ort: decode_batches '{value}' must lie in 1..{max_batch} (max_batch)"
        )
    return batches


def weights_report(data_file: Path, programs: list[Path]) -> dict[str, Any]:
    """The external data file's size and the initializers in it that every program holds alike
    (what a loaded program's sessions share, shared_weights.py)."""
    common = common_initializers(programs)
    return {
        "external_data_file": data_file.name,
        "external_data_bytes": data_file.stat().st_size,
        "programs": len(programs),
        "shareable_initializers": len(common),
        "shareable_bytes": sum(init.nbytes for init in common),
        "embedded_bytes": {p.name: embedded_bytes(p) for p in programs},  # constants inside
    }


def check_parity(
    graph: Graph, session: OrtProgram, tolerance: float | None = None
) -> dict[str, float]:
    """The ONNX program against the graph on the example inputs: the worst output's norm-wise
    relative error (bounded by `tolerance`, else PARITY_TOL for the output's dtype, as the
    pipeline's parity checks do) and its worst element relative to the output's largest
    magnitude (reported)."""
    with torch.no_grad():
        expected = graph.run(*graph.example_inputs)
        actual = session(*graph.example_inputs)
    worst = {"norm": 0.0, "max_element": 0.0}
    for i, (want, got) in enumerate(zip(expected, actual)):
        if want.shape != got.shape:
            raise PeakcError(
                f"ort backend: output_{i} has shape {list(got.shape)}, expected {list(want.shape)}"
            )
        got = got.to(want.device)
        error = relative_error(got, want)
        scale = want.double().abs().max().clamp_min(1e-12)
        element = float((got.double() - want.double()).abs().max() / scale)
        tol = PARITY_TOL.get(want.dtype, 0.0) if tolerance is None else tolerance
        if error > tol:
            raise PeakcError(
                f"ort backend: output_{i} differs from the graph by {error:.2e} relative "
                f"(norm-wise; tolerance {tol:.0e} for {want.dtype}; ort{{parity_tol=...}} sets it)"
            )
        worst["norm"] = max(worst["norm"], error)
        worst["max_element"] = max(worst["max_element"], element)
    return worst


def gqa_fold_report(exported: OnnxExport) -> dict[str, Any]:
    """How many GroupQueryAttention nodes took their rotary / packed QKV, and why not."""
    fold = exported.gqa_fold
    if fold is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "rotary_folded": fold.rotary_folded,
        "packed_qkv": fold.packed_qkv,
        "not_folded": fold.not_folded,
        "transposes_cancelled": fold.transposes_cancelled,
    }


def ort_report(
    exported: OnnxExport, device: str, parity: dict[str, float], cuda_graph: bool
) -> dict[str, Any]:
    shared = exported.shared_cache
    return {
        "onnxruntime": onnxruntime.__version__,
        "provider": "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider",
        "ir_version": exported.ir_version,
        "opset": exported.opset,
        "external_data": exported.external_data,
        "contrib_ops": exported.contrib_ops,
        "reference_ops": exported.reference_ops,
        "nodes_before_cleanup": exported.nodes_before_cleanup,
        "nodes_after_cleanup": exported.nodes_after_cleanup,
        "parity_rel_error": parity["norm"],  # ‖ort − graph‖ / ‖graph‖, worst output
        "parity_max_element_rel_error": parity["max_element"],  # / the output's max |value|
        "shared_kv_buffers": len(shared.buffers) if shared else 0,
        "gqa_fold": gqa_fold_report(exported),
        "cuda_graph_decode": cuda_graph,
        "matmul_nbits": {
            "rewritten": exported.matmul_nbits.rewritten,
            "reordered_act_order": exported.matmul_nbits.reordered,
            "not_rewritten": exported.matmul_nbits.not_rewritten,
        },
    }
