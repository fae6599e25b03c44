"""Pipeline-stage partition (issue 18, Measured): the cost model's cut of an 8B-shaped random
bf16 Llama, each stage's program timed alone on the GPU against its predicted time, beside the
equal-blocks, equal-parameters and measured (balance=measured) cuts, then a 2-stage artifact
run as 2 processes through `peakc launch` (NCCL on GPUs: it proves the path, its speed is not
the point). One call; writes the records as JSON and prints the table last.

    python benchmarks/partition.py [--out benchmarks/results/partition.json] [--layers 32]
    python benchmarks/partition.py --smoke    # a tiny model on the CPU (gloo), in seconds
    python benchmarks/partition.py --table    # RESULTS.md rows from --out

Records: date, device, model, cut ("peakc", "equal-blocks", "equal-params", "measured"),
stages, stage, predicted_ms (the cost model on the stage's own program, target h200),
measured_ms (median of eager runs of that program on the device), imbalance_predicted and
imbalance_measured (slowest stage over the mean, per cut), and one record with cut
"launch-2proc" for the multi-process run (its outputs and greedy tokens checked against the
unpartitioned program). NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so the
launch needs two visible GPUs; with one it is recorded as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import peakc
from peakc.cost_model.hardware import resolve_profile
from peakc.ir.capture import capture
from peakc.ir.graph import Graph
from peakc.ir.stages import split_stages
from peakc.models import kv_cache
from peakc.models.demo import LlamaConfig, LlamaForCausalLM
from peakc.passes.base import PassContext
from peakc.passes.pipeline import Pipeline
from peakc.runtime.generate import Generator, SamplingConfig

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    max_positions=8192,
)
SMOKE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    max_positions=256,
)
CUTS = {"peakc": "predicted", "measured": "measured"}  # cut name -> report entry
BASELINES = ("equal-blocks", "equal-params")


def build_model(shape: dict, layers: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """peakc's demo Llama at `shape` with `layers` layers, random weights, on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**{**shape, "num_layers": layers}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.uniform_(-0.02, 0.02)
    return model.to(dtype).eval()


def capture_decoder(
    model: torch.nn.Module, batch: int, seq: int, name: str, dynamic: bool = False
) -> Graph:
    """The model as a KV-cache decoder at a prefill of batch x seq: static shapes (the stage
    timings), or dynamic batch and length (an artifact that generates)."""
    decoder, layout = kv_cache.wrap_for_generation(model, seq + 16, batch, name)
    device = next(model.parameters()).device
    inputs = [t.to(device) for t in kv_cache.example_inputs(layout, prompt_len=seq)]
    inputs[0] = torch.randint(0, layout.vocab_size, (batch, seq), device=device)
    inputs[1] = torch.arange(seq, device=device).expand(batch, seq).contiguous()
    inputs[2] = kv_cache.empty_cache(layout, batch, device)
    inputs[3] = torch.zeros_like(inputs[2])  # a distinct tensor: export would alias the two
    shapes = kv_cache.dynamic_shapes(layout) if dynamic else None
    graph = capture(decoder, tuple(inputs), name=name, dynamic=shapes)
    graph.info["generation"] = layout.to_dict()
    return graph


def time_ms(graph: Graph, repeats: int) -> float:
    """Median milliseconds of the stage's program run eagerly on its example inputs."""

    def sync() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    graph.run()  # warm-up
    times = []
    for _ in range(repeats):
        started = sync()
        graph.run()
        times.append((sync() - started) * 1e3)
    return statistics.median(times)


def stage_records(graph: Graph, stages: int, ctx: PassContext, base: dict, repeats: int) -> list:
    """Each cut's stages: predicted (cost model on the stage program) and measured ms."""
    spec = f"partition{{stages={stages},microbatches=1,balance=measured}}"
    _, records = Pipeline.parse(spec).run(graph, ctx)
    report = records[-1]["report"]
    cuts = {name: report[key]["boundaries"] for name, key in CUTS.items()}
    cuts.update({name: report["baselines"][name]["boundaries"] for name in BASELINES})
    out = []
    for cut, boundaries in cuts.items():
        rows = []
        for s, stage in enumerate(split_stages(graph, boundaries)):
            rows.append(
                dict(
                    base,
                    cut=cut,
                    stages=stages,
                    stage=s,
                    boundaries=boundaries,
                    predicted_ms=ctx.cost.estimate(stage).total_time * 1e3,
                    measured_ms=time_ms(stage, repeats),
                )
            )
            del stage
        for key in ("predicted_ms", "measured_ms"):
            values = [r[key] for r in rows]
            for r in rows:
                r[f"imbalance_{key.removesuffix('_ms')}"] = max(values) / statistics.mean(values)
        out += rows
    return out


def launch_record(args, base: dict, shape: dict, device: str, dtype, folder: Path) -> dict:
    """A 2-stage artifact of a small model of the same layer shapes, run as 2 processes."""
    record = dict(base, cut="launch-2proc", stages=2, stage="all", predicted_ms=None)
    if device == "cuda" and torch.cuda.device_count() < 2:
        record["skipped"] = (
            "NCCL refuses two ranks on one GPU (ncclInvalidUsage: Duplicate GPU detected); "
            "run on a machine with 2 GPUs for the NCCL launch"
        )
        return record
    model = build_model(shape, args.launch_layers, device, dtype)
    graph = capture_decoder(model, 2, 16, "launch", dynamic=True)
    spec = "partition{stages=2,schedule=1f1b,microbatches=2}"
    artifact = peakc.compile(graph, pipeline=spec, parity=False).save(folder / "stages2")
    prompts = [[1, 2, 3, 4], [5, 6]]
    out, tokens = folder / "out.safetensors", folder / "tokens.json"
    argv = [sys.executable, "-m", "peakc.cli", "launch", str(artifact), "--nproc-per-node=2"]
    argv += [f"--output={out}", f"--tokens-output={tokens}", "--max-new-tokens=8", "--timeout=120"]
    argv += [f"--prompt-ids={' '.join(map(str, p))}" for p in prompts]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    record["measured_ms"] = (time.perf_counter() - started) * 1e3
    record["returncode"] = done.returncode
    if done.returncode != 0:
        record["error"] = [line for line in done.stderr.splitlines() if "peakc: error" in line]
        return record
    from safetensors.torch import load_file

    expected = graph.run()[0].float().cpu()
    logits = load_file(str(out))["output_0"].float()
    record["forward_max_abs_err"] = float((logits - torch.cat([expected] * 2)).abs().max())
    step = Generator(lambda *a: graph.run(*a), graph.info["generation"], device)
    want = step.generate(prompts, SamplingConfig(max_new_tokens=8)).tokens
    record["greedy_tokens_equal"] = json.loads(tokens.read_text()) == want
    record["backend"] = "nccl" if device == "cuda" else "gloo"
    return record


def markdown_table(records: list[dict]) -> str:
    """Per cut and stage count: each stage's predicted / measured ms and the imbalances."""
    rows = [r for r in records if isinstance(r.get("stage"), int)]
    lines = [
        "| stages | cut | stage ms predicted / measured | imbalance predicted | measured |",
        "|---:|---|---|---:|---:|",
    ]
    for stages in sorted({r["stages"] for r in rows}):
        for cut in ("peakc", *BASELINES, "measured"):
            part = sorted((r for r in rows if r["stages"] == stages and r["cut"] == cut),
                          key=lambda r: r["stage"])  # fmt: skip
            if not part:
                continue
            cells = ", ".join(f"{r['predicted_ms']:.2f} / {r['measured_ms']:.2f}" for r in part)
            lines.append(
                f"| {stages} | {cut} | {cells} | {part[0]['imbalance_predicted']:.3f} "
                f"| {part[0]['imbalance_measured']:.3f} |"
            )
    for r in records:
        if r["cut"] == "launch-2proc":
            what = (
                r.get("skipped")
                or r.get("error")
                or (
                    f"{r['backend']}: forward max err {r['forward_max_abs_err']:.3g}, greedy "
                    f"tokens equal: {r['greedy_tokens_equal']}, {r['measured_ms'] / 1e3:.1f} s wall"
                )
            )
            lines.append(f"\n2-process launch: {what}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=root / "results" / "partition.json")
    parser.add_argument("--table", action="store_true", help="print --out as markdown and exit")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--layers", type=int, help="layers of the 8B shape (default 32)")
    parser.add_argument("--stages", default="2,4", help="stage counts to cut into")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--launch-layers", type=int, default=4, help="layers of the launch run")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    if args.smoke and args.out == parser.get_default("out"):
        args.out = Path(tempfile.gettempdir()) / "partition_smoke.json"  # not the results
    shape = SMOKE if args.smoke else LLAMA_8B
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    batch, seq = (2, 16) if args.smoke else (args.batch, args.seq)
    repeats = 3 if args.smoke else args.repeats
    layers = args.layers or shape["num_layers"]
    name = f"llama-8b-shaped ({layers} layers)" if not args.smoke else "smoke llama"
    started = time.perf_counter()
    model = build_model(shape, layers, device, dtype)
    graph = capture_decoder(model, batch, seq, name)
    del model
    print(
        f"built and captured {name} at batch {batch} x {seq}: {time.perf_counter() - started:.1f} s"
    )
    base = dict(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        model=name,
        batch=batch,
        seq=seq,
    )
    ctx = PassContext(target=resolve_profile("cpu" if args.smoke else "h200"), device=device)
    records = []
    for stages in [int(s) for s in args.stages.split(",") if s]:
        records += stage_records(graph, stages, ctx, base, repeats)
        print(f"{stages} stages done: {time.perf_counter() - started:.1f} s")
    del graph
    if device == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as folder:
        launch_layers = min(args.launch_layers, layers)
        args.launch_layers = launch_layers
        records.append(launch_record(args, base, shape, device, dtype, Path(folder)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1, default=str) + "\n")
    print(f"wrote {args.out} ({time.perf_counter() - started:.1f} s)\n")
    print(markdown_table(records))


if __name__ == "__main__":
    main()
