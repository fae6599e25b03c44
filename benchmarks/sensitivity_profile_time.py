"""Time of prune's sensitivity profile on a GPU, its probes replayed as CUDA graphs or
interpreted node by node (calibration.variant_losses' `cuda_graphs`), alternating, same run.

Model, windows and perplexity as benchmarks/pruning_quality.py: SmolLM2-135M (GGUF), 32 x 512
calibration windows (seed 0), SparseGPT at 50 %, evaluation on the tutorial/ windows.

    python benchmarks/sensitivity_profile_time.py --gguf FILE --windows windows.safetensors
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from safetensors.torch import load_file

import peakc.passes.calibration as calibration
import peakc.passes.prune.sensitivity as sensitivity
from peakc.data import with_sequence_length
from peakc.ir.capture import capture
from peakc.models.hf import load_hf
from peakc.passes.base import PassContext
from peakc.passes.prune import PruneOptions, PrunePass
from peakc.runtime.evaluate import perplexity


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--windows", required=True, help="from pruning_quality --save-windows")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    source = load_hf(f"gguf:{args.gguf}", args.gguf, gguf=True)
    data = load_file(args.windows)
    graph = capture(source.module, with_sequence_length(source.example_inputs, 512))
    ctx = PassContext(calibration_data=data["calibration"], device="cuda")
    options = PruneOptions(nsamples=32, sparsity=0.5, sparsity_profile="sensitivity")
    rows = []
    for graphs in [True, False] * args.repeats:
        sensitivity.variant_losses = functools.partial(
            calibration.variant_losses, cuda_graphs=graphs
        )
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = PrunePass(options).run(graph.copy(), ctx)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        ppl = perplexity(result.graph, data["evaluation"], "cuda").ppl
        rows.append((graphs, seconds, result.stats["profile_s"], ppl))
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}\n| CUDA graphs | pass s | profile s | eval ppl |")
    print("|---|---|---|---|")
    for graphs, seconds, profile, ppl in rows:
        print(f"| {graphs} | {seconds:.1f} | {profile:.1f} | {ppl:.3f} |")


if __name__ == "__main__":
    main()
