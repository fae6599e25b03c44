"""GPU benchmark of the ort backend (issue 8): peakc's ONNX export vs torch.onnx + the ORT
transformers optimizer vs eager PyTorch, on random Llama configs.

    python benchmarks/ort_backend.py                # smollm2-135m, llama-1b, llama-8b on CUDA
    python benchmarks/ort_backend.py --tiny         # a tiny config on CPU (a smoke run)

Measures prefill latency (batch 1, --prompt-len tokens), decode tokens/s at batch 1 and 8
(peakc ort and eager: KV-cache decoder; the torch.onnx peer has no cache, so only its
prefill is timed) and the contrib/fused op counts of both ONNX models. Prints a table last
and writes JSON to --out. Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import torch

import peakc
from peakc.models.demo import demo_llama
from peakc.models.kv_cache import dynamic_shapes, example_inputs, wrap_for_generation
from peakc.runtime.generate import Generator, SamplingConfig

CONFIGS = {
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_positions=256,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        max_positions=2048,
    ),
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        max_positions=2048,
    ),
    "llama-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        max_positions=2048,
    ),
}


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Contrib (com.microsoft) and fused-norm node counts of an ONNX model."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == "com.microsoft" or "LayerNormalization" in node.op_type:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def generation_rates(generator: Generator, vocab: int, args, device: str) -> dict[str, float]:
    out = {}
    prompt = torch.randint(0, vocab, (args.prompt_len,)).tolist()
    prefill = SamplingConfig(max_new_tokens=1)
    out["prefill_ms"] = 1e3 * timed(
        lambda: generator.generate([prompt], prefill), args.repeats, device
    )
    for batch in (1, 8):
        config = SamplingConfig(max_new_tokens=args.gen_len)
        results = []
        for _ in range(args.repeats):
            r = generator.generate([prompt] * batch, config)
            results.append(r.decode_steps * batch / r.decode_seconds)
        out[f"decode_tok_s_b{batch}"] = statistics.median(results)
    return out


def bench_config(name: str, args, device: str, workdir: Path) -> dict:
    dtype = torch.float32 if device == "cpu" else torch.float16
    model, _ = demo_llama(0, **CONFIGS[name])
    model = model.to(dtype)
    max_len = args.prompt_len + args.gen_len + 1
    decoder, layout = wrap_for_generation(model, max_len, 8, name)
    decoder = decoder.to(device)
    row: dict = {"config": name, "device": device, "dtype": str(dtype)}

    # peakc ort: capture the KV-cache decoder, fuse, export with contrib ops.
    start = time.perf_counter()
    compiled = peakc.compile(
        decoder.cpu(),
        example_inputs(layout),
        backend="ort",
        dynamic=dynamic_shapes(layout),
        generation=layout.to_dict(),
        source=name,
        parity=False,
    )
    artifact = peakc.load(compiled.save(workdir / f"{name}-ort"))
    row["peakc_compile_s"] = time.perf_counter() - start
    row["peakc_ops"] = compiled.contents.report["ort"]["contrib_ops"]
    row["peakc_provider"] = compiled.contents.report["ort"]["provider"]
    row["peakc"] = generation_rates(
        Generator.from_artifact(artifact, device), layout.vocab_size, args, device
    )

    # eager PyTorch on the same decoder.
    decoder = decoder.to(device)

    def eager_step(ids, positions, k, v):
        with torch.no_grad():
            return decoder(ids, positions, k, v)

    row["eager"] = generation_rates(
        Generator(eager_step, layout.to_dict(), device), layout.vocab_size, args, device
    )

    # peer: torch.onnx export of the plain forward + onnxruntime.transformers optimizer.
    row["peer"] = torch_onnx_peer(model.cpu(), name, args, device, workdir)
    return row


def torch_onnx_peer(model, name: str, args, device: str, workdir: Path) -> dict:
    import onnxruntime
    from onnxruntime.transformers.optimizer import optimize_model

    path = workdir / f"{name}-peer.onnx"
    ids = torch.randint(0, 100, (1, args.prompt_len))
    torch.onnx.export(
        model, (ids,), str(path), dynamo=True, input_names=["input_ids"], external_data=True
    )
    cfg = CONFIGS[name]
    optimized = optimize_model(
        str(path),
        model_type="gpt2",
        num_heads=cfg["num_heads"],
        hidden_size=cfg["hidden_size"],
        use_gpu=device == "cuda",
        opt_level=1 if device == "cpu" else 2,
    )
    if device == "cuda":
        optimized.convert_float_to_float16(keep_io_types=True)
    optimized_path = workdir / f"{name}-peer-opt.onnx"
    optimized.save_model_to_file(str(optimized_path), use_external_data_format=True)
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    session = onnxruntime.InferenceSession(str(optimized_path), providers=[provider])
    feed = {"input_ids": ids.numpy()}
    return {
        "ops": op_counts(onnx.load(str(optimized_path), load_external_data=False)),
        "prefill_ms": 1e3 * timed(lambda: session.run(None, feed), args.repeats, device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU")
    parser.add_argument("--configs", default="smollm2-135m,llama-1b,llama-8b")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="ort_backend.json")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    names = ["tiny"] if args.tiny else args.configs.split(",")
    if args.tiny:
        args.prompt_len, args.gen_len, args.repeats = 16, 8, 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(bench_config(name, args, device, Path(tmp)))
            Path(args.out).write_text(json.dumps(rows, indent=2, default=str))
    print(
        f"\n{'config':<14}{'who':<8}{'prefill ms':>12}{'dec b1 tok/s':>14}{'dec b8 tok/s':>14}  ops"
    )
    for row in rows:
        for who in ("peakc", "eager", "peer"):
            r = row[who]
            ops = row["peakc_ops"] if who == "peakc" else r.get("ops", "")
            print(
                f"{row['config']:<14}{who:<8}{r['prefill_ms']:>12.2f}"
                f"{r.get('decode_tok_s_b1', float('nan')):>14.1f}"
                f"{r.get('decode_tok_s_b8', float('nan')):>14.1f}  {ops}"
            )
    print(f"(device {device}; peakc provider {rows[0]['peakc_provider']}; wrote {args.out})")


if __name__ == "__main__":
    main()
