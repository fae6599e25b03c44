"""`peakc bench`: prefill latency and decode tokens/s, for an artifact or a source model.

Both paths run the same loop (prefill the batch, then greedy decode with no early stop) so
the numbers compare: an artifact through its decoder program, a source model through eager
PyTorch (the same KV-cache decoder, uncaptured). Medians and p90 over repeats after warm-up.
Model specs are resolved by the caller (`load_model`: peakc.models.eager_generation_step), so
the runtime does not import the model sources that sit above it.
"""

from __future__ import annotations

import statistics
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
