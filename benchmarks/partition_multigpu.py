"""Pipeline partition on several GPUs (issue 19): an 8B-shaped (and a 32B-shaped) random bf16
Llama cut into 2 and 4 stages by peakc's cut, the equal-blocks cut and the equal-parameters
cut, run as one process per GPU on torch.distributed.pipelining (NCCL), beside one GPU doing
the same work in the same call. One command per machine; it launches the ranks itself:

    python benchmarks/partition_multigpu.py --gpus 4     # stages 2 and 4; 8b and 32b shapes
    python benchmarks/partition_multigpu.py --gpus 2     # stages 2
    python benchmarks/partition_multigpu.py --gpus 4 --models 8b --stages 4   # a part of it
    python benchmarks/partition_multigpu.py --dry-run    # 2 gloo CPU processes, tiny model
    python benchmarks/partition_multigpu.py --table      # RESULTS.md rows from --out

Per stage count the ranks are started by torchrun through `peakc.runtime.pipeline.launch`
(the launcher behind `peakc launch`), with NCCL's NVLink multicast off in every process
(NO_MULTICAST). Each rank builds the random model on its own GPU, captures it as a KV-cache
decoder at one microbatch (batch x seq), and rank 0's partition pass gives the three cuts
(its own and its report's two baselines). Per cut, each rank keeps its stage of
`split_stages` (what the backend writes as a stage artifact) and runs it through
`PipelineRun`, the runtime `peakc launch` uses, with the programs held in memory instead of
written to disk (an 8B artifact per cut would be 16 GB to write and read; the run must fit
one call):

- prefill: `--microbatches` microbatches of batch x seq tokens under GPipe and 1F1B;
  tokens/s over the whole batch (median of `--repeats` runs);
- generate: `--gen-batch` prompts of `--prompt-len` tokens, `--new-tokens` greedy tokens
  down the stages (send/recv per decode step); decode tokens/s;
- per stage: its program timed alone on its GPU on one microbatch (`measured_ms`) against
  the partition pass's prediction for that cut (`predicted_ms`, transfer included); measured
  imbalance (slowest over mean stage) and bubble (1 - busy stage time / (stages x wall));
- one GPU: rank 0 runs the whole model on the same microbatches and prompts (cut "one-gpu").

Records (a list, merged into --out by (device, gpus, model): a 2-GPU and a 4-GPU machine
write to one file): date, device, gpus, model, workload ("prefill" | "generate"), cut,
schedule, stages, tokens_per_s, imbalance, predicted_ms and measured_ms (lists, one entry per
stage), imbalance_predicted, boundaries, processes (the launch's world size; one-GPU records
are measured in each launch), speedup (over that launch's one GPU); prefill records add
bubble_measured and bubble_predicted, generate records tokens_equal_one_gpu (greedy tokens
through the stages equal to the whole model's).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from peakc.cost_model.hardware import resolve_profile
from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.ir.stages import split_stages
from peakc.passes.base import PassContext
from peakc.passes.pipeline import Pipeline
from peakc.runtime.artifact import program_signature
from peakc.runtime.generate import Generator, SamplingConfig
from peakc.runtime.pipeline import PipelineRun, StageProgram, launch

ROOT = Path(__file__).resolve().parent
NO_MULTICAST = {  # the device notes: NVLink multicast stays off in every process
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
SCHEDULES = ("gpipe", "1f1b")
ONE_GPU = "one-gpu"


def single_gpu_bench() -> Any:
    """benchmarks/partition.py (issue 18's benchmark) as a module: its model shapes, model
    building, decoder capture, stage timing and baseline names."""
    spec = importlib.util.spec_from_file_location("partition_bench", ROOT / "partition.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = single_gpu_bench()
MODELS = {
    "8b": BENCH.LLAMA_8B,
    # hidden 5120, 64 layers, FFN 25600, GQA 40/8 (the 32B shape; Qwen3-32B's vocab)
    "32b": dict(
        vocab_size=151936,
        hidden_size=5120,
        intermediate_size=25600,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
        max_positions=8192,
    ),
    "tiny": BENCH.SMOKE,
}
CUT_NAMES = ("peakc", *BENCH.BASELINES)


# --- driver: one torchrun per stage count ----------------------------------------------------


def launch_ranks(args: argparse.Namespace, stages: int, part: Path) -> None:
    """torchrun with `stages` processes running this file's worker; rank 0 writes `part`."""
    os.environ.update(NO_MULTICAST)  # torchrun's children inherit the environment
    worker = [str(Path(__file__).resolve()), "--worker", f"--part={part}"]
    for name in ("models", "batch", "seq", "microbatches", "repeats", "gen_batch",
                 "prompt_len", "new_tokens", "timeout", "gpus"):  # fmt: skip
        worker.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    if args.dry_run:
        worker.append("--dry-run")
    launch([f"--nproc-per-node={stages}", "--nnodes=1", "--standalone", *worker])


def merge_records(path: Path, new: list[dict]) -> list[dict]:
    """`path`'s records with those of the same device, gpus and model replaced by `new`."""
    old = json.loads(path.read_text()) if path.exists() else []
    done = {(r["device"], r["gpus"], r["model"]) for r in new}
    return [r for r in old if (r["device"], r["gpus"], r["model"]) not in done] + new


def drive(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    counts = [int(s) for s in args.stages.split(",") if s]
    if not counts or min(counts) < 2 or max(counts) > args.gpus:
        raise SystemExit(f"partition_multigpu: --stages {args.stages} must lie in 2..--gpus")
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for stages in counts:
            part = Path(folder) / f"stages{stages}.json"
            launch_ranks(args, stages, part)
            records += json.loads(part.read_text())
            print(f"{stages} stages done: {time.perf_counter() - started:.1f} s", flush=True)
    records = merge_records(args.out, records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {args.out} ({time.perf_counter() - started:.1f} s)\n")
    print(markdown_table(records))


# --- worker: one process per stage -----------------------------------------------------------


class InMemoryRun(PipelineRun):
    """PipelineRun over stage programs held in memory (the Graphs of `split_stages`) in an
    already joined process group: its forward (the pipelining schedules) and generate (the
    per-step send/recv) run unchanged, only loading from an artifact folder is skipped."""

    def __init__(
        self,
        stages: list[Graph],
        layout: dict[str, Any],
        schedule: str,
        microbatches: int,
        device: torch.device,
    ) -> None:
        self.directory = Path("<in memory>")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.ranks = list(range(len(stages)))
        names = [f"stage_{s}" for s in range(len(stages))]
        self.manifest = {
            "programs": {n: asdict(program_signature(g, [])) for n, g in zip(names, stages)},
            "generation": layout,
        }
        self.plan = {
            "world_size": len(stages),
            "schedule": schedule,
            "microbatches": microbatches,
            "stages": [{"program": n, "rank": s} for s, n in enumerate(names)],
        }
        mine = stages[self.rank]
        self.stages = {
            self.rank: StageProgram(
                index=self.rank,
                program=mine.gm,  # weights are the module's own attributes
                weights=[],
                signature=self.manifest["programs"][names[self.rank]],
                layers=list(mine.info["stage"]["layers"]),
            )
        }


def median_seconds(run, device: torch.device, repeats: int, everyone: bool = True) -> float:
    """Median wall seconds of `run()` over `repeats` runs after a warm-up; the clock is read
    once this rank's device is done and (`everyone`) every rank has reached it."""

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if everyone:
            dist.barrier()
        return time.perf_counter()

    run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return statistics.median(times)


def prefill_batch(graph: Graph, microbatches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The captured microbatch's ids and positions repeated `microbatches` times."""
    ids, positions = graph.example_inputs[:2]
    return torch.cat([ids] * microbatches), torch.cat([positions] * microbatches)


def random_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.gen_batch, args.prompt_len), generator=generator)
    return ids.tolist()


def one_gpu_records(graph: Graph, args, base: dict, device: torch.device) -> list[dict]:
    """Rank 0 runs the whole model on the same microbatches and prompts (others wait)."""
    if dist.get_rank() != 0:
        dist.barrier()
        return []

    def prefill() -> None:
        for _ in range(args.microbatches):
            graph.run()

    seconds = median_seconds(prefill, device, args.repeats, everyone=False)
    tokens = args.microbatches * args.batch * args.seq
    step = Generator(lambda *a: graph.run(*a), graph.info["generation"], device)
    prompts = random_prompts(args, graph.info["generation"]["vocab_size"])
    config = SamplingConfig(max_new_tokens=args.new_tokens)
    step.generate(prompts, config)  # warm-up
    result = step.generate(prompts, config)
    dist.barrier()
    common = dict(base, cut=ONE_GPU, stages=1, imbalance=1.0, predicted_ms=[], measured_ms=[])
    return [
        dict(common, workload="prefill", schedule="none", tokens_per_s=tokens / seconds),
        dict(
            common,
            workload="generate",
            schedule="none",
            tokens_per_s=args.gen_batch * result.decode_steps / result.decode_seconds,
            tokens=result.tokens,
        ),
    ]


def partition_cuts(graph: Graph, ctx: PassContext, stages: int, microbatches: int) -> dict:
    """Rank 0's partition pass: per cut its boundaries and per-stage predicted ms, and the
    predicted bubble; broadcast so every rank splits the same way."""
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        spec = f"partition{{stages={stages},microbatches={microbatches},schedule=1f1b}}"
        _, records = Pipeline.parse(spec).run(graph, ctx)
        report = records[-1]["report"]
        rows = {"peakc": report["predicted"], **report["baselines"]}
        payload[0] = {
            "bubble": report["bubble_fraction"],
            "cuts": {
                name: {
                    "boundaries": rows[name]["boundaries"],
                    "predicted_ms": [s["predicted_ms"] for s in rows[name]["stages"]],
                    "imbalance": rows[name]["imbalance"],
                }
                for name in CUT_NAMES
            },
        }
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def cut_records(
    graph: Graph, cut: dict, args, base: dict, device: torch.device, reference: list | None
) -> list[dict]:
    """One cut: its stage timed alone on every rank, prefill under each schedule, and greedy
    generation through the stages, its tokens checked against one GPU's `reference` (records
    on rank 0)."""
    stages = split_stages(graph, cut["boundaries"])
    mine = stages[dist.get_rank()]
    measured = [None] * dist.get_world_size()
    dist.all_gather_object(measured, BENCH.time_ms(mine, args.repeats))
    layout = graph.info["generation"]
    inputs = prefill_batch(graph, args.microbatches) if dist.get_rank() == 0 else ()
    common = dict(
        base,
        stages=len(stages),
        boundaries=cut["boundaries"],
        predicted_ms=cut["predicted_ms"],
        measured_ms=measured,
        imbalance=max(measured) / statistics.mean(measured),
        imbalance_predicted=cut["imbalance"],
    )
    out = []
    for schedule in SCHEDULES:
        run = InMemoryRun(stages, layout, schedule, args.microbatches, device)
        seconds = median_seconds(partial(run.forward, *inputs), device, args.repeats)
        busy = args.microbatches * sum(measured) / 1e3
        out.append(
            dict(
                common,
                workload="prefill",
                schedule=schedule,
                tokens_per_s=args.microbatches * args.batch * args.seq / seconds,
                bubble_measured=1 - busy / (len(stages) * seconds),
            )
        )
    run = InMemoryRun(stages, layout, "1f1b", args.microbatches, device)
    prompts = random_prompts(args, layout["vocab_size"])
    config = SamplingConfig(max_new_tokens=args.new_tokens)
    run.generate(prompts, config)  # warm-up
    result = run.generate(prompts, config)
    if result is not None:
        decode = args.gen_batch * result.decode_steps / result.decode_seconds
        out.append(
            dict(
                common,
                workload="generate",
                schedule="send-recv",
                tokens_per_s=decode,
                tokens_equal_one_gpu=result.tokens == reference,
            )
        )
    del stages, mine
    return out if dist.get_rank() == 0 else []


def model_records(name: str, args, device: torch.device, ctx: PassContext) -> list[dict]:
    """Every cut of one model shape at this stage count, and one GPU on the same work."""
    shape = MODELS[name]
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    started = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: a 32B model in fp32 would not fit
    try:
        model = BENCH.build_model(shape, shape["num_layers"], str(device), dtype)
    finally:
        torch.set_default_dtype(default)
    label = f"llama-{name}-shaped"
    graph = BENCH.capture_decoder(model, args.batch, args.seq, label, dynamic=True)
    del model
    log(f"{label}: built and captured in {time.perf_counter() - started:.1f} s")
    base = dict(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        gpus=args.gpus,
        processes=dist.get_world_size(),
        model=label,
        batch=args.batch,
        seq=args.seq,
        microbatches=args.microbatches,
        gen_batch=args.gen_batch,
        new_tokens=args.new_tokens,
    )
    records = one_gpu_records(graph, args, base, device)
    plan = partition_cuts(graph, ctx, dist.get_world_size(), args.microbatches)
    reference = next((r.pop("tokens") for r in records if r["workload"] == "generate"), None)
    for cut, entry in plan["cuts"].items():
        rows = cut_records(graph, entry, args, dict(base, cut=cut), device, reference)
        records += [
            dict(r, bubble_predicted=plan["bubble"]) if r["workload"] == "prefill" else r
            for r in rows
        ]
        log(f"{label}: cut {cut} {entry['boundaries']} done: {time.perf_counter() - started:.1f} s")
    single = {r["workload"]: r["tokens_per_s"] for r in records if r["cut"] == ONE_GPU}
    for r in records:
        r["speedup"] = r["tokens_per_s"] / single[r["workload"]] if single else None
    return records


def log(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def work(args: argparse.Namespace) -> None:
    """One rank: join the group, then every model shape at this stage count."""
    for key, value in NO_MULTICAST.items():
        if os.environ.get(key) != value:
            raise SystemExit(f"partition_multigpu: {key} must be {value} in every rank")
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu" if args.dry_run else f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo" if args.dry_run else "nccl",
        timeout=datetime.timedelta(seconds=args.timeout),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        ctx = PassContext(
            target=resolve_profile("cpu" if args.dry_run else "h200"), device=str(device)
        )
        records = []
        for name in args.models.split(","):
            records += model_records(name, args, device, ctx)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if dist.get_rank() == 0:
            args.part.write_text(json.dumps(records, default=str))
    finally:
        dist.destroy_process_group()


# --- table -----------------------------------------------------------------------------------


def markdown_table(records: list[dict]) -> str:
    """Per machine, model, stage count and cut: tokens/s, speedup and balance."""
    lines = [
        "| device | model | stages | cut | workload | schedule | tokens/s | × one GPU "
        "| stage ms predicted / measured | imbalance pred. / meas. | bubble pred. / meas. "
        "| greedy = one GPU |",
        "|---|---|---:|---|---|---|---:|---:|---|---|---|---|",
    ]
    for r in records:
        stage_ms = ", ".join(
            f"{p:.1f} / {m:.1f}" for p, m in zip(r["predicted_ms"], r["measured_ms"])
        )
        imbalance = f"{r['imbalance_predicted']:.3f} / {r['imbalance']:.3f}" if stage_ms else ""
        bubble = (
            f"{r['bubble_predicted']:.2f} / {r['bubble_measured']:.2f}"
            if "bubble_measured" in r
            else ""
        )
        speedup = f"{r['speedup']:.2f}" if r.get("speedup") else ""
        stages = r["stages"] if r["cut"] != ONE_GPU else f"1 (beside {r['processes']})"
        lines.append(
            f"| {r['device']} ×{r['gpus']} | {r['model']} | {stages} | {r['cut']} "
            f"| {r['workload']} | {r['schedule']} | {r['tokens_per_s']:.0f} | {speedup} "
            f"| {stage_ms} | {imbalance} | {bubble} | {r.get('tokens_equal_one_gpu', '')} |"
        )
    return "\n".join(lines)


SETTINGS = dict(  # the GPU run's defaults, and the dry run's tiny ones
    models=("8b,32b", "tiny"),
    gpus=(4, 2),
    batch=(8, 2),
    seq=(512, 16),
    microbatches=(8, 4),
    repeats=(5, 2),
    gen_batch=(8, 2),
    prompt_len=(128, 4),
    new_tokens=(64, 4),
    timeout=(600.0, 120.0),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="default: results/partition_multigpu.json")
    parser.add_argument("--table", action="store_true", help="print --out as markdown and exit")
    parser.add_argument("--dry-run", action="store_true", help="2 gloo CPU processes, tiny model")
    parser.add_argument("--gpus", type=int, help="GPUs of this machine, 2 or 4 (default 4)")
    parser.add_argument("--models", help="model shapes: 8b, 32b (default 8b,32b)")
    parser.add_argument("--batch", type=int, help="sequences per microbatch (default 8)")
    parser.add_argument("--seq", type=int, help="prefill tokens per sequence (default 512)")
    parser.add_argument("--microbatches", type=int, help="microbatches per batch (default 8)")
    parser.add_argument("--repeats", type=int, help="timed runs, median taken (default 5)")
    parser.add_argument("--gen-batch", type=int, help="prompts generated at once (default 8)")
    parser.add_argument("--prompt-len", type=int, help="tokens per prompt (default 128)")
    parser.add_argument("--new-tokens", type=int, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--timeout", type=float, help="collective timeout, s (default 600)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stages", help="stage counts, one launch each (default 2,4 up to --gpus)")
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, values in SETTINGS.items():
        if getattr(args, key) is None:
            setattr(args, key, values[1] if args.dry_run else values[0])
    if args.stages is None:
        args.stages = ",".join(str(s) for s in (2, 4) if s <= args.gpus)
    if args.out is None:
        folder = Path(tempfile.gettempdir()) if args.dry_run else ROOT / "results"
        name = "partition_multigpu_dry_run.json" if args.dry_run else "partition_multigpu.json"
        args.out = folder / name  # a dry run never touches the committed results
    if args.gen_batch > args.batch:
        parser.error("--gen-batch must be <= --batch (the decoder is captured for --batch)")
    if args.prompt_len + args.new_tokens > args.seq + 16:
        parser.error("--prompt-len + --new-tokens must fit the cache of --seq + 16 tokens")
    return args


def main() -> None:
    args = parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
    elif args.worker:
        work(args)
    else:
        try:
            drive(args)
        except PeakcError as exc:  # a rank failed: its own error is above
            raise SystemExit(f"partition_multigpu: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
