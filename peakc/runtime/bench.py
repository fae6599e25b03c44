"""`peakc bench`: prefill latency and decode tokens/s, for an artifact or a source model.

Both paths run the same loop (prefill the batch, then greedy decode with no early stop) so
the numbers compare: an artifact through its decoder program, a source model through eager
PyTorch (the same KV-cache decoder, uncaptured). Medians and p90 over repeats after warm-up.
Model specs are resolved by the caller (`load_model`: peakc.models.eager_generation_step), so
the runtime does not import the model sources that sit above it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peakc.errors import PeakcError
from peakc.runtime.artifact import LoadedArtifact, load_artifact
from peakc.runtime.generate import Generator, SamplingConfig

# (model spec, max_seq_len, max_batch, device) -> (step function, KV-cache layout)
ModelStepLoader = Callable[[str, int, int, torch.device], tuple[Callable, dict[str, Any]]]


def bench_target(
    target: str,
    batch: int,
    prompt_len: int,
    gen_len: int,
    repeats: int = 5,
    device: str | None = None,
    load_model: ModelStepLoader | None = None,
    floor: bool = False,
) -> dict[str, Any]:
    """Bench an artifact folder, or a model spec through `load_model`'s eager step; with
    `floor`, an artifact's `floor_bytes` too (`decode_floor_bytes`)."""
    if batch < 1 or prompt_len < 1 or gen_len < 1 or repeats < 1:
        raise PeakcError("--batch, --prompt-len, --gen-len and --repeats must be positive")
    generator, label, artifact = _generator(target, prompt_len + gen_len, batch, device, load_model)
    prefill, decode = time_generation(generator, batch, prompt_len, gen_len, repeats)
    result = {
        "target": label,
        "device": str(generator.device),
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
        "prefill_ms": {"median": _ms(statistics.median(prefill)), "p90": _ms(_p90(prefill))},
        "decode_ms_per_step": {"median": _ms(statistics.median(decode)), "p90": _ms(_p90(decode))},
        "decode_tokens_per_s": round(batch / statistics.median(decode), 2),
    }
    if floor and artifact is not None:  # at the mean context of the timed decode steps
        result["floor_bytes"] = decode_floor_bytes(artifact, batch, prompt_len + gen_len // 2)
    return result


def time_generation(
    generator: Generator, batch: int, prompt_len: int, gen_len: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Prefill seconds and decode seconds per step for each repeat, after one warm-up, on a
    fixed batch of random prompts (greedy, no early stop)."""
    vocab = generator.layout["vocab_size"]
    prompts = torch.randint(
        0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)
    ).tolist()
    config = SamplingConfig(max_new_tokens=gen_len)
    generator.generate(prompts, config)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        result = generator.generate(prompts, config)
        prefill.append(result.prefill_seconds)
        decode.append(result.decode_seconds / max(result.decode_steps, 1))
    return prefill, decode


def format_bench(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"{result['target']} on {result['device']}{_threads_note(result)}: "
            f"batch {result['batch']}, "
            f"prompt {result['prompt_len']}, generate {result['gen_len']} "
            f"({result['repeats']} repeats)",
            f"  prefill      median {result['prefill_ms']['median']:.2f} ms   "
            f"p90 {result['prefill_ms']['p90']:.2f} ms",
            f"  decode step  median {result['decode_ms_per_step']['median']:.3f} ms   "
            f"p90 {result['decode_ms_per_step']['p90']:.3f} ms",
            f"  decode       {result['decode_tokens_per_s']:.1f} tokens/s",
        ]
    )


def _threads_note(result: dict[str, Any]) -> str:
    from peakc.runtime.threads import cpu_threads

    threads = result.get("threads")
    return "" if threads is None else f" ({cpu_threads(threads)})"


def _generator(
    target: str, length: int, batch: int, device: str | None, load_model: ModelStepLoader | None
) -> tuple[Generator, str, LoadedArtifact | None]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if Path(target).is_dir():
        artifact = load_artifact(target)
        return Generator.from_artifact(artifact, dev), f"artifact {target}", artifact
    if load_model is None:
        raise PeakcError(
            f"bench: {target} is not an artifact folder; a model spec needs load_model"
        )
    step, layout = load_model(target, length, batch, dev)
    return Generator(step, layout, dev), f"eager {target}", None


# --- the floor: bytes a decode step must read over the device's copy bandwidth --------------


def copy_bandwidth(device: str | torch.device) -> float:
    """Bytes per second a copy on the device moves (read + write), the median of 10 copies of
    1 GiB (a 64 MiB memcpy on the CPU): what the decode floor divides by, measured in the run
    it compares with."""
    device = torch.device(device)
    size = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages
    times = []
    for _ in range(10):
        _wait(device)
        start = time.perf_counter()
        dst.copy_(src)
        _wait(device)
        times.append(time.perf_counter() - start)
    return 2 * size / statistics.median(times)


def decode_floor_bytes(artifact: LoadedArtifact, batch: int, context: int) -> dict[str, int] | None:
    """Bytes one decode step of `batch` sequences must read: every weight its program reads,
    once (a tied or shared weight is one tensor), but not a table it only gathers rows from (the
    input embedding), plus the keys and values of `context` tokens per sequence. None for an
    artifact without a decoder, or an ONNX one without the onnx package to read it."""
    layout = artifact.manifest.get("generation")
    if layout is None:
        return None
    weights = _decode_weights(artifact)
    if weights is None:
        return None
    read = sum(size for size, gathered in weights.values() if not gathered)
    width = torch.empty((), dtype=getattr(torch, layout["dtype"])).element_size()
    per_token = 2 * layout["num_layers"] * layout["num_kv_heads"] * layout["head_dim"] * width
    kv = batch * context * per_token
    return {"weights": read, "kv_cache": kv, "total": read + kv, "context": context}


def _decode_weights(artifact: LoadedArtifact) -> dict[Any, tuple[int, bool]] | None:
    """Per weight of the decode program: (bytes, read only as an embedding table)."""
    programs = artifact.manifest["programs"]
    name = "decode_step" if "decode_step" in programs else artifact.default_program
    info = programs[name]
    format = info.get("format", "torch.export")
    if format == "onnx":
        return _onnx_weights(artifact.directory / info["file"])
    if format == "triton":
        tables = _triton_tables(json.loads((artifact.directory / info["file"]).read_text()))
    else:  # the program's graph module: its leading inputs are the weights
        inputs = [n for n in artifact.program(name).graph.nodes if n.op == "placeholder"]
        tables = {
            weight
            for weight, node in zip(info["weights"], inputs)
            if node.users and all(_gathers(user, node) for user in node.users)
        }
    return {
        name: (artifact.weights[name].numel() * artifact.weights[name].element_size(),
               name in tables)
        for name in info["weights"]
    }  # fmt: skip


def _gathers(user: Any, table: Any) -> bool:
    return str(user.target) == "aten.embedding.default" and user.args[0] is table


def _triton_tables(spec: dict[str, Any]) -> set[str]:
    """The weights a triton program reads only as `aten.embedding`'s table."""
    uses: dict[int, list[bool]] = {}  # value id -> per use, whether it is an embedding table
    for step in spec["steps"]:
        table = step.get("op") == "aten.embedding.default"
        for position, arg in enumerate(step.get("args", [])):
            for value in _value_ids([arg]):
                uses.setdefault(value, []).append(table and position == 0)
        for value in _value_ids(list(step.get("kwargs", {}).values())):
            uses.setdefault(value, []).append(False)
    return {
        name
        for value, name in zip(spec["weights"], spec["weight_names"])
        if uses.get(value) and all(uses[value])
    }


def _value_ids(args: list[Any]) -> list[int]:
    """The value ids a triton step's JSON args refer to ({"value": id}, nested)."""
    found = []
    for arg in args:
        if isinstance(arg, dict) and set(arg) == {"value"}:
            found.append(int(arg["value"]))
        elif isinstance(arg, dict):
            found += _value_ids(list(arg.values()))
        elif isinstance(arg, list):
            found += _value_ids(arg)
    return found


def _onnx_weights(path: Path) -> dict[Any, tuple[int, bool]] | None:
    """An ONNX program's initializers, each stored tensor once (by its place in the external
    data file): (bytes, read only as Gather's data)."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    uses: dict[str, list[bool]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            uses.setdefault(name, []).append(node.op_type == "Gather" and position == 0)
    weights = {}
    for tensor in model.graph.initializer:
        external = {entry.key: entry.value for entry in tensor.external_data}
        if "length" in external:
            key, size = (external["location"], external.get("offset", "0")), int(external["length"])
        else:
            width = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            key, size = tensor.name, width * math.prod(tensor.dims)
        gathered = bool(uses.get(tensor.name)) and all(uses[tensor.name])
        weights[key] = (size, gathered and weights.get(key, (0, True))[1])
    return weights


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def bench_many(
    targets: list[str],
    batches: list[int],
    prompt_len: int,
    gen_len: int,
    repeats: int = 5,
    device: str | None = None,
    load_model: ModelStepLoader | None = None,
) -> list[dict[str, Any]]:
    """Every target at every batch (`peakc bench A B`): generation artifacts and model specs
    through the generation loop, other artifacts through their forward program (timed once
    per target, on its example inputs). A generation artifact's decode rows get the floor:
    `floor_bytes` over the device's copy bandwidth measured here (`floor_ms`)."""
    results = []
    for target in targets:
        if Path(target).is_dir() and "generation" not in _manifest(target):
            results.append(bench_forward(target, repeats))
            continue
        for batch in batches:
            results.append(
                bench_target(
                    target, batch, prompt_len, gen_len, repeats, device, load_model, floor=True
                )
            )
    bandwidths: dict[str, float] = {}
    for result in results:
        if result.get("floor_bytes") is None:
            continue
        where = result["device"]
        if where not in bandwidths:
            bandwidths[where] = copy_bandwidth(where)
        result["copy_bytes_per_s"] = round(bandwidths[where])
        result["floor_ms"] = _ms(result["floor_bytes"]["total"] / bandwidths[where])
    return results


def bench_forward(directory: str, repeats: int = 5) -> dict[str, Any]:
    """Median and p90 of an artifact's forward program on its stored example inputs, after
    one warm-up."""
    if repeats < 1:
        raise PeakcError("--repeats must be positive")
    artifact = load_artifact(directory)
    inputs = artifact.example_inputs
    seconds = []
    with torch.no_grad():
        artifact(*inputs)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            outputs = artifact(*inputs)
            _synchronize(outputs)
            seconds.append(time.perf_counter() - started)
    return {
        "target": f"artifact {directory}",
        "device": str(inputs[0].device) if inputs else "cpu",
        "batch": int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1,
        "repeats": repeats,
        "forward_ms": {"median": _ms(statistics.median(seconds)), "p90": _ms(_p90(seconds))},
    }


def format_side_by_side(results: list[dict[str, Any]]) -> str:
    """One column per target, one row per phase and batch (median ms; p90 in parentheses).
    A target with no such phase shows '-'."""
    columns = list(dict.fromkeys(r["target"] for r in results))
    cells: dict[str, dict[str, str]] = {}
    for r in results:
        for phase, key in (("prefill", "prefill_ms"), ("decode step", "decode_ms_per_step"),
                           ("forward", "forward_ms")):  # fmt: skip
            if key in r:
                row = f"{phase}, batch {r['batch']} (ms)"
                cells.setdefault(row, {})[r["target"]] = (
                    f"{r[key]['median']:.3f} ({r[key]['p90']:.3f})"
                )
        if "floor_ms" in r:
            share = r["floor_ms"] / r["decode_ms_per_step"]["median"]
            row = f"decode floor, batch {r['batch']} (ms)"
            cells.setdefault(row, {})[r["target"]] = f"{r['floor_ms']:.3f} ({share:.0%})"
    order = ["prefill", "decode step", "decode floor", "forward"]
    rows = sorted(cells, key=lambda row: (order.index(row.split(",")[0]), int(row.split()[-2])))
    first = max([len("phase"), *map(len, rows)])
    widths = [max(len(c), *(len(cells[row].get(c, "-")) for row in rows)) for c in columns]
    lines = ["  ".join(["phase".ljust(first), *(c.rjust(w) for c, w in zip(columns, widths))])]
    for row in rows:
        values = [cells[row].get(c, "-").rjust(w) for c, w in zip(columns, widths)]
        lines.append("  ".join([row.ljust(first), *values]))
    devices = ", ".join(sorted({r["device"] for r in results}))
    shapes = {(r["prompt_len"], r["gen_len"]) for r in results if "prompt_len" in r}
    note = "; ".join(f"prompt {p}, generate {g}" for p, g in sorted(shapes))
    lines.append(f"median (p90) over {results[0]['repeats']} repeats on {devices}"
                 + (f"; {note}" if note else ""))  # fmt: skip
    floors = [r for r in results if "floor_ms" in r]
    if floors:
        contexts = sorted({r["floor_bytes"]["context"] for r in floors})
        speeds = sorted({round(r["copy_bytes_per_s"] / 1e9, 1) for r in floors})
        lines.append(
            "decode floor: bytes a decode step must read (each weight once, gathered embedding "
            f"rows left out, the KV cache at context {'/'.join(map(str, contexts))}) over a "
            f"copy's {'/'.join(map(str, speeds))} GB/s (read + write) measured in this run; "
            "(%): the floor's share of the measured decode step"
        )
    return "\n".join(lines)


def _manifest(directory: str) -> dict[str, Any]:
    try:
        manifest = json.loads((Path(directory) / "manifest.json").read_text())
    except (OSError, ValueError):
        raise PeakcError(f"bench: {directory} has no readable manifest.json") from None
    return manifest if isinstance(manifest, dict) else {}


def _synchronize(outputs: Any) -> None:
    """Wait for a CUDA program's kernels, so the time is the program's, not its launch."""
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in outputs):
        torch.cuda.synchronize()
