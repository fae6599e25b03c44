"""Model sources: `demo:NAME`, `hf:PATH`, `gguf:PATH`, `py:MODULE:FUNCTION`, `artifact:DIR`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peakc.errors import PeakcError

SOURCE_KINDS = ("demo", "hf", "gguf", "py", "artifact")


@dataclass
class ModelSource:
    """A model ready to capture, or an already-captured graph (artifact:DIR)."""

    spec: str
    module: torch.nn.Module | None
    example_inputs: tuple[torch.Tensor, ...]
    graph: Any = None  # peakc.ir.Graph when the source is an artifact
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    dynamic: dict | None = None  # capture's dynamic-shape spec (generation)
    generation: dict | None = None  # the KV-cache layout, for a decoder program
    native_dtype: str | None = None  # the checkpoint's own dtype, where it differs from loading's
    dtype: str | None = None  # the weights' dtype once --dtype is applied (None: an artifact)


TASKS = ("forward", "generate")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_source_for_task(
    spec: str,
    task: str = "forward",
    max_seq_len: int = 512,
    max_batch: int = 8,
    dtype: str = "float32",
    bfloat16_runs: bool = True,
) -> ModelSource:
    """Load a source for `task`: `generate` wraps a causal LM with an explicit KV cache.

    `dtype` casts the model's floating-point weights (float32, bfloat16, float16), or `auto`
    keeps the source's own: a checkpoint's declared dtype (bfloat16 for a quantized GGUF),
    else the module's. `bfloat16_runs=False` (a backend that cannot run bfloat16 here) makes
    auto keep a bfloat16 source in float32. `source.dtype` records the outcome.
    """
    if task not in TASKS:
        raise PeakcError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    if dtype not in DTYPES and dtype != "auto":
        raise PeakcError(f"unknown --dtype '{dtype}' (known: auto, {', '.join(DTYPES)})")
    source = load_source(spec)
    if dtype == "auto" and source.module is not None:
        dtype = source.native_dtype or _module_dtype(source.module)
        if dtype == "bfloat16" and not bfloat16_runs:
            dtype = "float32"
    if source.module is None:
        if dtype not in ("auto", "float32"):
            raise PeakcError(f"model '{spec}': --dtype applies to model sources, not artifacts")
    else:
        if dtype in DTYPES:
            source.module.to(DTYPES[dtype])
            source.example_inputs = tuple(
                t.to(DTYPES[dtype]) if t.is_floating_point() else t for t in source.example_inputs
            )
        source.dtype = dtype
    if task == "forward":
        return source
    if source.module is None:
        raise PeakcError(f"model '{spec}': --task generate needs a model source, not an artifact")
    from peakc.models import kv_cache

    if max_seq_len < 2 or max_batch < 1:
        raise PeakcError(
            f"--max-seq-len must be >= 2 and --max-batch >= 1 (got {max_seq_len}, {max_batch})"
        )
    causal_lm = getattr(source.module, "hf_model", source.module)
    decoder, layout = kv_cache.wrap_for_generation(causal_lm, max_seq_len, max_batch, spec)
    source.module = decoder
    source.example_inputs = kv_cache.example_inputs(layout)
    source.dynamic = kv_cache.dynamic_shapes(layout)
    source.generation = layout.to_dict()
    return source


def eager_generation_step(
    spec: str, max_seq_len: int, max_batch: int, device: torch.device
) -> tuple[Callable, dict]:
    """The model's KV-cache decoder, uncaptured, on `device` as a Generator step (no grad), and
    its cache layout: what `peakc bench MODEL` times against an artifact."""
    source = load_source_for_task(spec, "generate", max_seq_len=max_seq_len, max_batch=max_batch)
    decoder = source.module.to(device)

    def step(ids, positions, k_cache, v_cache):
        with torch.no_grad():
            return decoder(ids, positions, k_cache, v_cache)

    return step, source.generation


def load_source(spec: str) -> ModelSource:
    """Resolve a model spec into a module and example inputs; errors name the spec."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        raise PeakcError(
            f"model '{spec}': expected KIND:VALUE with KIND one of {', '.join(SOURCE_KINDS)}"
        )
    if kind == "demo":
        from peakc.models.demo import DEMOS

        if rest not in DEMOS:
            raise PeakcError(f"model '{spec}': unknown demo (known: {', '.join(DEMOS)})")
        module, inputs = DEMOS[rest]()
        return ModelSource(spec, module, inputs)
    if kind in ("hf", "gguf"):
        from peakc.models import hf

        return hf.load_hf(spec, rest, gguf=kind == "gguf")
    if kind == "py":
        return _load_python(spec, rest)
    from peakc.runtime.artifact import load_artifact

    return artifact_source(spec, load_artifact(rest))


def _module_dtype(module: torch.nn.Module) -> str:
    """The dtype of a module's first floating-point parameter (float32 when it has none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    return "float32"


def max_sequence_length(module: torch.nn.Module | None) -> int | None:
    """The longest sequence the model's positions cover (a transformers config's
    max_position_embeddings, the demo Llama's max_positions), or None when it does not say."""
    model = getattr(module, "hf_model", module)
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "max_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def artifact_source(spec: str, artifact) -> ModelSource:
    """A loaded artifact as a source: its forward program read back as a Graph."""
    graph = artifact.to_graph()
    return ModelSource(spec, None, graph.example_inputs, graph=graph)


def _load_python(spec: str, rest: str) -> ModelSource:
    target, sep, func_name = rest.rpartition(":")
    if not sep or not target or not func_name:
        raise PeakcError(f"model '{spec}': expected py:MODULE:FUNCTION or py:FILE.py:FUNCTION")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise PeakcError(f"model '{spec}': file not found: {path}")
        name = f"peakc_model_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            raise PeakcError(f"model '{spec}': {path} failed to import: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise PeakcError(f"model '{spec}': cannot import module '{target}': {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise PeakcError(f"model '{spec}': '{target}' has no function '{func_name}'")
    try:
        result = func()
    except Exception as exc:  # the user's code: name where it raised, not a bare exception
        where = _innermost_frame(exc, getattr(module, "__file__", None)) or f"{func_name}()"
        raise PeakcError(
            f"model '{spec}': {func_name}() raised {type(exc).__name__} at {where}: "
            f"{_first_line(exc)}"
        ) from exc
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], torch.nn.Module)
    ):
        raise PeakcError(f"model '{spec}': {func_name}() must return (nn.Module, example_inputs)")
    model, inputs = result
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return ModelSource(spec, model, inputs)


def _innermost_frame(exc: BaseException, filename: str | None) -> str | None:
    """`FILE:LINE in FUNCTION` of the deepest traceback frame in `filename` (the source's own
    file), or of the deepest frame at all when the file is unknown."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if filename is not None:
        frames = [f for f in frames if Path(f.filename).resolve() == Path(filename).resolve()]
    if not frames:
        return None
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "(no message)"
