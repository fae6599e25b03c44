"""`peakc bench`: prefill latency and decode tokens/s, for an artifact or a source model.

Both paths run the same loop (prefill the batch, then greedy decode with no early stop) so
the numbers compare: an artifact through its decoder program, a source model through eager
PyTorch (the same KV-cache decoder, uncaptured). Medians and p90 over repeats after warm-up.
Model specs are resolved by the caller (`load_model`: peakc.models.eager_generation_step), so
the runtime does not import the model sources that sit above it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peakc.errors import PeakcError
from peakc.runtime.artifact import load_artifact
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
) -> dict[str, Any]:
    """Bench an artifact folder, or a model spec through `load_model`'s eager step."""
    if batch < 1 or prompt_len < 1 or gen_len < 1 or repeats < 1:
        raise PeakcError("--batch, --prompt-len, --gen-len and --repeats must be positive")
    generator, label = _generator(target, prompt_len + gen_len, batch, device, load_model)
    prefill, decode = time_generation(generator, batch, prompt_len, gen_len, repeats)
    return {
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
) -> tuple[Generator, str]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if Path(target).is_dir():
        artifact = load_artifact(target)
        return Generator.from_artifact(artifact, dev), f"artifact {target}"
    if load_model is None:
        raise PeakcError(
            f"bench: {target} is not an artifact folder; a model spec needs load_model"
        )
    step, layout = load_model(target, length, batch, dev)
    return Generator(step, layout, dev), f"eager {target}"


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
    per target, on its example inputs)."""
    results = []
    for target in targets:
        if Path(target).is_dir() and "generation" not in _manifest(target):
            results.append(bench_forward(target, repeats))
            continue
        for batch in batches:
            results.append(
                bench_target(target, batch, prompt_len, gen_len, repeats, device, load_model)
            )
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
    order = ["prefill", "decode step", "forward"]
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
