"""Per-shape kernel configs chosen by measurement on the device at compile time (tune=true).

The program runs once per input set (its example inputs, and for a decode step each decode
batch of the CUDA graphs); at each kernel step every config the launcher offers (`fn.configs`)
is timed on that step's arguments (its device time, from CUDA-graph replays), and the fastest
is kept under the arguments' shape key. The artifact stores them with the device key (GPU, driver,
torch, triton); a load on another key uses the defaults and says so (program.py).
"""

from __future__ import annotations

from typing import Any

import torch

from peakc.backends.triton.program import TritonProgram, resolve, shape_key

REPEATS = 20
GRAPH_LAUNCHES = 10  # launches per timed replay


def time_config(fn: Any, args: tuple, config: dict[str, Any]) -> float:
    """Median device milliseconds of one launch with `config`; infinite for a config the
    launcher refuses for these arguments (a tile that does not divide them).

    The launches are replayed from a CUDA graph, as the decode step runs them: timed eagerly, a
    config that launches two kernels (a split attention and its merge) pays the host's launch
    overhead twice and loses to a one-kernel config the GPU runs several times slower."""
    try:
        fn(*args, config=config)
    except ValueError:
        return float("inf")
    replay = _graphed(fn, args, config)
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if replay is None:
            fn(*args, config=config)
        else:
            replay.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (1 if replay is None else GRAPH_LAUNCHES))
    return sorted(times)[len(times) // 2]


def _graphed(fn: Any, args: tuple, config: dict[str, Any]) -> torch.cuda.CUDAGraph | None:
    """GRAPH_LAUNCHES launches captured in one graph, or None where a launcher cannot be
    captured (it synchronizes with the host): those configs are timed eagerly."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            fn(*args, config=config)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_LAUNCHES):
                fn(*args, config=config)
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return graph


def decode_inputs(example: tuple, batch: int) -> tuple:
    """A decode step's inputs for `batch` sequences: one token each at half the cache's length.

    A decode graph replays at every context, and the long ones take the time: tuned at an
    empty cache, attention over the cache would keep one program per KV head (nothing to
    split), which walks a long context alone (28 us instead of 3 per layer at 1024 tokens)."""
    ids, positions, k_cache, v_cache = example
    shape = (k_cache.shape[0], batch, *k_cache.shape[2:])
    context = k_cache.shape[3] // 2
    return (
        ids.new_zeros(batch, 1),
        positions.new_full((batch, 1), context),
        k_cache.new_zeros(shape),
        v_cache.new_zeros(shape),
    )


def tune_program(
    program: TritonProgram, weights: list[Any], input_sets: list[tuple]
) -> dict[str, dict[str, Any]]:
    """{kernel index: {shape key: fastest config}} over every input set."""
    chosen: dict[str, dict[str, Any]] = {}
    for inputs in input_sets:
        for kernel, configs in tune_run(program, [*weights, *inputs]).items():
            chosen.setdefault(kernel, {}).update(configs)
    return chosen


def tune_run(program: TritonProgram, values: list[Any]) -> dict[str, dict[str, Any]]:
    """One run of the program: the fastest config per kernel step offering several."""
    spec = program.spec
    env: list[Any] = [None] * spec["values"]
    for value_id, tensor in zip(spec["weights"] + spec["inputs"], values):
        env[value_id] = tensor.to(program.device)
    chosen: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for step in program.steps:
            configs = getattr(step.fn, "configs", None) or []
            if step.kernel is not None and len(configs) > 1:
                args = resolve(step.args, env)
                best = min(configs, key=lambda c: time_config(step.fn, args, c))
                chosen.setdefault(str(step.kernel), {})[shape_key(args)] = best
            program.run_step(step, env)
    return chosen
