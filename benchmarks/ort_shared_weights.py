"""Memory of an ort generation artifact's sessions with and without shared weights.

For share_weights=true and false, each in a fresh process: load the artifact (checksums),
create the decoder's OrtProgram (prefill session) and every static decode session, and
measure the memory they took: on CUDA the device memory (torch.cuda.mem_get_info, free
before minus free after), on the CPU the process's resident set (VmRSS). Then greedy-generate
a few tokens at batch 1 and 2 (the static programs decode them); the tokens of both runs must
be equal. Without --artifact, a model is compiled first: --config NAME, a random
Llama of benchmarks/ort_backend.py's CONFIGS (fp16 on CUDA, with cuda_graph), or else a demo
Llama with a large random embedding.

    python benchmarks/ort_shared_weights.py --device cpu --out results.json
    python benchmarks/ort_shared_weights.py --device cuda --config llama-1b --out results.json
    python benchmarks/ort_shared_weights.py --device cuda --config llama-1b --out int4.json \
        --pipeline 'quantize{method=rtn,bits=4,group_size=32},fuse'
    python benchmarks/ort_shared_weights.py --device cuda --artifact /path/to/ort-artifact
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = {1: [[5, 17, 99, 3]], 2: [[5, 17, 99, 3], [42, 7]]}


def build_demo(folder: Path, device: str, vocab: int, batches: str) -> Path:
    """A generation artifact of a demo Llama whose embedding and head hold most weights."""
    import peakc
    from peakc.models import kv_cache
    from peakc.models.demo import demo_llama

    model, _ = demo_llama(0, vocab_size=vocab)
    decoder, layout = kv_cache.wrap_for_generation(model, 32, 2, "demo:llama")
    compiled = peakc.compile(
        decoder,
        kv_cache.example_inputs(layout),
        backend=f"ort{{device={device},decode_batches={batches}}}",
        dynamic=kv_cache.dynamic_shapes(layout),
        generation=layout.to_dict(),
    )
    return compiled.save(folder / "artifact")


def build_config(folder: Path, name: str, device: str, batches: str, pipeline: str) -> Path:
    """A generation artifact of one of ort_backend.py's random Llama configs."""
    import peakc
    from peakc.models import load_source_for_task

    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from ort_backend import make_hf_folder

    dtype = "float16" if device == "cuda" else "float32"
    make_hf_folder(name, folder / "hf", device, getattr(torch, dtype))  # the model is dropped
    max_batch = max(int(b) for b in batches.split("+"))
    source = load_source_for_task(f"hf:{folder / 'hf'}", "generate", 64, max_batch, dtype)
    graph = ",cuda_graph=true" if device == "cuda" else ""
    compiled = peakc.compile(
        source,
        pipeline=pipeline,
        backend=f"ort{{device={device},decode_batches={batches}{graph}}}",
        parity=False,
    )
    return compiled.save(folder / "artifact")


def release_build_memory() -> None:
    """Give back what building took on the GPU (the measurements run in other processes)."""
    import gc

    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        sys.modules["torch"].cuda.empty_cache()


def device_used(device: str) -> int:
    """Bytes in use: the GPU's (all processes) or this process's resident set."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(directory: Path, device: str, share: bool) -> dict:
    """Load the decoder with every decode session, generate; memory and tokens."""
    import torch

    import peakc
    from peakc.backends.ort.session import OrtProgram
    from peakc.runtime.generate import Generator, SamplingConfig

    if device == "cuda":
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the CUDA context exists before the baseline
    artifact = peakc.load(directory)
    info = artifact.manifest["programs"]["decoder"]
    runtime = {**info.get("runtime", {}), "device": device, "share_weights": str(share)}
    before = device_used(device)
    start = time.perf_counter()
    program = OrtProgram(directory / info["file"], **runtime)
    for batch in sorted(program.decode_programs):
        program.decode_session(batch)
    load_s = time.perf_counter() - start
    after = device_used(device)
    artifact._programs["decoder"] = program  # the Generator takes this program
    generator = Generator.from_artifact(artifact, device)
    config = SamplingConfig(max_new_tokens=8)
    tokens = {b: generator.generate(p, config).tokens for b, p in PROMPTS.items()}
    shared = program.shared_weights.report() if program.shared_weights else None
    return {
        "share_weights": share,
        "sessions": 1 + len(program.decode_sessions),
        "memory_bytes": after - before,
        "load_s": round(load_s, 2),
        "shared_weights": shared,
        "tokens": {str(b): t for b, t in tokens.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an ort generation artifact")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", help="a random Llama of ort_backend.py (e.g. llama-1b)")
    parser.add_argument("--pipeline", default="default", help="with --config (int4: ort_backend's)")
    parser.add_argument("--vocab", type=int, default=131072, help="demo model's vocabulary")
    parser.add_argument("--decode-batches", default="[1,2]")
    parser.add_argument("--out", type=Path, default=Path("ort_shared_weights.json"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--share", default="true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.device, args.share == "true")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.artifact:
            directory = args.artifact
        elif args.config:
            directory = build_config(
                Path(tmp), args.config, args.device, args.decode_batches, args.pipeline
            )
        else:
            directory = build_demo(Path(tmp), args.device, args.vocab, args.decode_batches)
        release_build_memory()
        data = sum(p.stat().st_size for p in directory.glob("*.onnx.data"))
        rows = []
        for share in ("true", "false"):
            command = [sys.executable, __file__, "--measure", str(directory)]
            command += ["--device", args.device, "--share", share]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"share_weights={share} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {"device": args.device, "external_data_bytes": data, "runs": rows}
    results["tokens_equal"] = rows[0]["tokens"] == rows[1]["tokens"]
    args.out.write_text(json.dumps(results, indent=2))
    print(f"external data: {data / 2**20:.1f} MiB; tokens equal: {results['tokens_equal']}")
    print(f"{'share_weights':>14} {'sessions':>8} {'memory MiB':>11} {'load s':>7}  shared")
    for row in rows:
        shared = row["shared_weights"]
        note = (
            f"{shared['bytes'] / 2**20:.1f} MiB x {shared['sessions']} sessions" if shared else ""
        )
        print(
            f"{str(row['share_weights']):>14} {row['sessions']:>8} "
            f"{row['memory_bytes'] / 2**20:>11.1f} {row['load_s']:>7}  {note}"
        )


if __name__ == "__main__":
    main()
