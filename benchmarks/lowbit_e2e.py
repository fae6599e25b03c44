"""Low-bit kernels end to end (issue 17, Speed): the 8B-shaped Llama decoding as peakc's bf16
triton artifact, as GPTQ int4 (groups of 128) and as SparseGPT 2:4 + GPTQ int4, beside the
torch.compile loop on the bf16 model, at batch 1 and 8 and context 1024, in one run.

Each peakc variant is one `peakc.compile` of the model's KV-cache decoder (captured from a host
copy, as benchmarks/triton_backend.py does) through its pipeline to
`triton{cuda_graph=true,tune=true}`, then loaded and decoded greedily by its Generator. The
calibration tokens are random: decode speed depends on the stored layout, not on the weights'
quality (benchmarks/quantization_quality.py measures that). The torch.compile loop is
triton_backend.py's peer, in a child process given the run's time left. Each row's floor is
the bytes one step reads (the variant's stored weights once, an untied input embedding
gathered rather than read, and the KV cache) over the copy bandwidth measured in the same run.

The records are merged into benchmarks/results/lowbit_kernels.json (replacing this run's rows
of the same model, device and kernel; benchmarks/lowbit_kernels.py keeps them): `date`,
`device`, `kernel` ("peakc-bf16", "peakc-int4", "peakc-2:4-int4", "torch-compile-bf16"),
`model`, `batch`, `decode_ms`, `floor_ms`; for peakc also `pipeline`, `compile_s`,
`speedup_vs_bf16` (against peakc-bf16 at the same batch) and how its linears were lowered.

    python benchmarks/lowbit_e2e.py                      # H200: llama-8b, every variant
    python benchmarks/lowbit_e2e.py --variants bf16,int4 --method rtn
    python benchmarks/lowbit_e2e.py --smoke              # a tiny model on the CPU (interpreter)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_backend as tb  # noqa: E402

from peakc.runtime.bench import copy_bandwidth  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "lowbit_kernels.json"
VARIANTS = ("bf16", "int4", "2:4-int4")
TORCH_COMPILE = "torch-compile-bf16"


def pipelines(method: str, group: int, nsamples: int, seq_len: int) -> dict[str, str]:
    """Each variant's pass pipeline: fusion first, so q/k/v and gate/up are compressed as one
    projection each (the same rows as separately: GPTQ and SparseGPT solve rows independently
    under one Hessian; 4 low-bit GEMVs per layer instead of 7); `sparse24` stores 2:4 + int4
    linears in their compressed layout."""
    calib = f"nsamples={nsamples},seq_len={seq_len}"
    quantize = f"quantize{{method={method},bits=4,group_size={group},{calib}}}"
    prune = "sparsegpt" if method == "gptq" else "magnitude"
    return {
        "bf16": "default",
        "int4": f"cleanup,fuse,{quantize}",
        "2:4-int4": f"cleanup,fuse,prune{{method={prune},pattern=2:4,{calib}}},{quantize},sparse24",
    }


def floor_bytes(graph, model, batch: int, context: int) -> int:
    """Bytes one decode step must read from the compiled graph's weights (each stored tensor
    once, at its stored size) and the KV cache; an untied input embedding is gathered."""
    stored = {t.data_ptr(): t.numel() * t.element_size() for t in graph.weights().values()}
    weights = sum(stored.values())  # a tied head is one tensor
    embedding = model.get_input_embeddings().weight
    if not model.config.tie_word_embeddings:
        weights -= embedding.numel() * embedding.element_size()
    return weights + tb.kv_cache_bytes(model, batch, context)


def lowered_linears(report: dict) -> dict:
    """How the decode step's program ran its linears: kernel labels counted, and the ops left
    on their reference with the reason."""
    program = report["programs"].get("decode_step") or next(iter(report["programs"].values()))
    labels: dict[str, int] = {}
    for label in program.get("kernels", []):
        labels[label] = labels.get(label, 0) + 1
    cost = program.get("cost")
    fallbacks = cost.get("fallbacks", []) if isinstance(cost, dict) else []
    return {"kernels": labels, "fallbacks": sorted({f["why"] for f in fallbacks})}


def measured(base: dict, batch: int, ms: float | None, floor_ms: float | None, error) -> dict:
    """One record: `base`'s fields, the batch, the times rounded, the error where one was."""
    record = dict(base, batch=batch, decode_ms=None if ms is None else round(ms, 4))
    record["floor_ms"] = None if floor_ms is None else round(floor_ms, 4)
    if error:
        record["error"] = error
    return record


def bench_variant(variant, pipeline, model, args, calibration, bandwidth, common, emit) -> None:
    """Compile, load and decode one variant; its records emitted as they are measured."""
    import peakc
    from peakc.runtime.generate import Generator

    with tempfile.TemporaryDirectory(prefix=f"peakc-lowbit-{variant.replace(':', '')}-") as work:
        folder = Path(work) / "artifact"
        row = dict(common, kernel=f"peakc-{variant}", pipeline=pipeline)
        built = tb.run_step(
            f"compile {variant}", tb.compile_peakc, model, args, folder, args.device, pipeline,
            calibration,
        )  # fmt: skip
        if "error" in built:
            for batch in args.batches:
                emit(measured(row, batch, None, None, built["error"]))
            return
        row.update(compile_s=built["info"]["compile_s"], **lowered_linears(built["info"]["report"]))
        generator = Generator.from_artifact(peakc.load(folder), args.device)
        for batch in args.batches:
            floor = floor_bytes(built["graph"], model, batch, args.context) / bandwidth * 1e3
            got = tb.run_step(f"decode {variant}", tb.peakc_peer, args, batch, generator)
            emit(measured(row, batch, got.get("decode_ms"), floor, got.get("error")))
        del generator


class Results:
    """lowbit_kernels.json with this run's end-to-end records merged in after every record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.new: list[dict] = []

    def emit(self, record: dict) -> None:
        self.new.append(record)
        self.write()
        shown = ("kernel", "batch", "decode_ms", "floor_ms", "error")
        tb.log(json.dumps({k: record.get(k) for k in shown}))

    def write(self) -> None:
        old = json.loads(self.path.read_text()) if self.path.is_file() else []
        done = {(r["model"], r["device"], r["kernel"]) for r in self.new}
        kept = [r for r in old if (r.get("model"), r.get("device"), r.get("kernel")) not in done]
        speedups([r for r in kept if "model" in r] + self.new)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(kept + self.new, indent=1) + "\n")


def speedups(records: list[dict]) -> None:
    """Each peakc row's speedup over peakc-bf16 on the same model, device and batch, where
    both were measured (a variant run in a later call is compared with the earlier bf16)."""
    bf16 = {
        (r.get("model"), r.get("device"), r.get("batch")): r.get("decode_ms")
        for r in records
        if r.get("kernel") == "peakc-bf16"
    }
    for r in records:
        key = (r.get("model"), r.get("device"), r.get("batch"))
        if str(r.get("kernel")).startswith("peakc-") and r.get("decode_ms") and bf16.get(key):
            r["speedup_vs_bf16"] = round(bf16[key] / r["decode_ms"], 3)


def markdown_table(records: list[dict]) -> str:
    """RESULTS.md rows of the end-to-end records (never typed by hand)."""
    lines = [
        "| date | device | model | kernel | batch | decode ms/token | floor ms | % of floor | "
        "vs peakc bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "model" not in r or "batch" not in r:
            continue
        ms, floor = r.get("decode_ms"), r.get("floor_ms")
        share = f"{100 * floor / ms:.0f} %" if ms and floor else "-"
        speed = f"{r['speedup_vs_bf16']:.2f}x" if r.get("speedup_vs_bf16") else "-"
        shown = ms if ms is not None else r.get("error", "-")
        lines.append(f"| {r.get('date')} | {r.get('device')} | {r['model']} | {r['kernel']} | "
                     f"{r['batch']} | {shown} | {floor} | {share} | {speed} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tb.MODELS, default="llama-8b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=560,
        help="variants start within it; torch.compile gets what is left",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--table", action="store_true", help="print --out's rows and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        parser.error(f"--variants: give some of {', '.join(VARIANTS)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtype, args.target, args.gguf, args.prefill = "bfloat16", "h200", None, 16
    args.device = "cuda"
    if args.smoke:
        args.model, args.target, args.device = "tiny", "cpu", "cpu"  # bf16: the kernels run
        args.batches, args.context, args.steps = [1, 2], 12, 2
        args.group_size, args.nsamples, args.seq_len = 32, 2, 8
        if args.out == OUT:
            args.out = Path(tempfile.gettempdir()) / "lowbit_e2e_smoke.json"
    elif not torch.cuda.is_available():
        parser.error("the benchmark runs on a CUDA GPU (--smoke runs a tiny model on the CPU)")
    clock = tb.Phases(args.budget_s)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    common = dict(date=datetime.date.today().isoformat(), device=name, model=args.model)
    results = Results(args.out)
    with clock.phase("model and copy bandwidth"):
        bandwidth = copy_bandwidth(args.device)
        model = tb.build_model(args, args.device)
    common["copy_TBps"] = round(bandwidth / 1e12, 3)
    calibration = tb.prompt_ids(model.config.vocab_size, args.nsamples, args.seq_len, "cpu")
    specs = pipelines(args.method, args.group_size, args.nsamples, args.seq_len)
    for variant in variants:
        if clock.left() < 120:  # a variant compiles for minutes on the 8B: stop between them
            for batch in args.batches:
                base = dict(common, kernel=f"peakc-{variant}")
                results.emit(measured(base, batch, None, None, "not run: --budget-s spent"))
            continue
        with clock.phase(f"peakc {variant}"):
            bench_variant(variant, specs[variant], model, args, calibration, bandwidth, common,
                          results.emit)  # fmt: skip
    floors = {b: tb.step_bytes(model, b, args.context) / bandwidth * 1e3 for b in args.batches}
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if not (args.no_torch_compile or args.smoke):  # no CUDA graphs on the CPU
        with clock.phase("torch.compile"):
            for row in tb.run_peer_process("torch-compile", args, clock.left() - 10):
                batch, base = row["batch"], dict(common, kernel=TORCH_COMPILE)
                results.emit(measured(base, batch, row.get("decode_ms"), floors[batch],
                                      row.get("error")))  # fmt: skip
    results.write()
    print(markdown_table(results.new))
    tb.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
