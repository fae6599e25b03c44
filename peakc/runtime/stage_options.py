"""The options of a pipeline-stage process, shared by `peakc launch` and the worker.

Plain Python (no torch), so the CLI's parser builds at once.
"""

from __future__ import annotations

import argparse

DEFAULT_TIMEOUT_S = 300.0


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """What each process does: batch inference and/or generation, and its limits."""
    p.add_argument("--inputs", help="safetensors of the first stage's inputs (input_0, ...)")
    p.add_argument("--output", help="write the batch's outputs here (safetensors, last rank)")
    p.add_argument("--prompt-ids", action="append", help="token ids '1 2 3'; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--tokens-output", help="write generated token ids here (JSON, rank 0)")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds a collective may wait before every rank fails",
    )
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available")


def worker_arguments(args: argparse.Namespace) -> list[str]:
    """The worker options in `args` (from add_worker_arguments) as a command line again."""
    out = []
    for name in ("inputs", "output", "tokens_output", "device"):
        if getattr(args, name):
            out.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    for prompt in args.prompt_ids or []:
        out.append(f"--prompt-ids={prompt}")
    out += [f"--max-new-tokens={args.max_new_tokens}", f"--timeout={args.timeout}"]
    return out
