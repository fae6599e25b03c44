"""`peakc estimate` and `peakc calibrate`: the cost model's commands (parsing and output)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from peakc.errors import PeakcError

if TYPE_CHECKING:
    from peakc.cost_model.estimate import Estimate


def add_estimate_commands(sub: argparse._SubParsersAction) -> None:
    """Register `estimate` and `calibrate` on the main parser."""
    p = sub.add_parser("estimate", help="estimate time and memory of a model on a hardware profile")
    p.add_argument(
        "model",
        help="demo:NAME | hf:PATH | gguf:FILE | py:MODULE:FUNC | artifact:DIR | a triton "
        "artifact's DIR (its program's prefill and decode step)",
    )
    p.add_argument("--pipeline", default="", help="pass spec to run before estimating")
    p.add_argument("--target", default="h100-sxm", help="hardware profile name or JSON file")
    p.add_argument("--batch", type=int, default=None, help="sequences (default: the example's)")
    p.add_argument(
        "--seq",
        type=int,
        default=None,
        help="prompt length for prefill, context length for decode (default: the example's)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="context length for decode (default: --seq; a triton artifact: its cache length)",
    )
    p.add_argument(
        "--phase",
        choices=("prefill", "decode"),
        default="prefill",
        help="which phase the per-block and top-node tables show",
    )
    p.add_argument(
        "--runtime",
        choices=("eager", "graph"),
        default="eager",
        help="eager: PyTorch issuing each kernel from the host, as peakc's eager and ort "
        "backends run (default); graph: device time of the kernels replayed back to back "
        "(a CUDA graph)",
    )
    p.add_argument("--top", type=int, default=10, help="rows in the top-node table")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="write a roofline chart of the nodes")
    p.add_argument("--plugin", action="append", default=[], help="Python file registering passes")

    p = sub.add_parser("calibrate", help="measure a hardware profile on this machine")
    p.add_argument("-o", "--output", required=True, help="profile JSON file to write")
    p.add_argument("--quick", action="store_true", help="small sweeps (under a minute)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--disk-dir", default=None, help="folder for the disk read test")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds


def cmd_estimate(args: argparse.Namespace) -> int:
    from peakc.cost_model.estimate import estimate
    from peakc.cost_model.hardware import resolve_profile
    from peakc.cost_model.phases import estimate_decode, estimate_prefill
    from peakc.models import load_source

    profile = resolve_profile(args.target)
    if _triton_artifact(args.model) is not None:
        return _estimate_triton_artifact(args, profile)
    prepare = _pipeline_runner(args.pipeline, profile) if args.pipeline else None
    source = load_source(args.model)
    results: dict[str, Estimate] = {}
    example = source.example_inputs
    token_model = (
        source.module is not None
        and len(example) == 1
        and not example[0].is_floating_point()
        and example[0].dim() == 2
    )
    if token_model:
        batch = args.batch or example[0].shape[0]
        seq = args.seq or example[0].shape[1]
        lengths = {"prefill": seq, "decode": args.context or seq}
        for phase, run in (("prefill", estimate_prefill), ("decode", estimate_decode)):
            results[phase] = run(
                source.module, example, profile, batch, lengths[phase], prepare,
                runtime=args.runtime,
            )  # fmt: skip
    else:
        if args.batch or args.seq or args.context:
            why = (
                "is a captured graph with fixed shapes"
                if source.graph is not None
                else "does not take token ids (batch, seq)"
            )
            raise PeakcError(
                f"model '{args.model}' {why}: --batch/--seq/--context cannot re-shape it; "
                "estimate it at its example shape instead"
            )
        if source.graph is not None:
            graph = source.graph
        else:
            from peakc.ir.capture import capture

            graph = capture(source.module, example, name=args.model)
        graph = prepare(graph) if prepare else graph
        results["graph"] = estimate(graph, profile, runtime=args.runtime)
    shown = results.get(args.phase) or next(iter(results.values()))
    if args.plot:
        from peakc.cost_model.roofline_plot import plot_roofline

        plot_roofline(shown, profile, args.plot)
    if args.json:
        data = {k: v.to_dict(args.top) for k, v in results.items()}
        header = {"model": args.model, "target": profile.name, "runtime": args.runtime}
        print(json.dumps({**header, **data}, indent=2))
        return 0
    _print_tables(args.model, shown, results, args.top)
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _triton_artifact(model: str) -> Path | None:
    """The folder when `model` (DIR or artifact:DIR) is a triton artifact: its stored program
    is priced as it is, with no source model (other artifacts are read back as graphs)."""
    folder = Path(model.removeprefix("artifact:"))
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return folder if isinstance(manifest, dict) and manifest.get("backend") == "triton" else None


def _estimate_triton_artifact(args: argparse.Namespace, profile) -> int:
    """`peakc estimate DIR` for a triton artifact: each program's launches (fusion groups as
    one kernel, GEMMs, fallbacks) priced on --target, at the shapes it was compiled for or, for
    a generation decoder, at --batch, --seq (prefill) and --context (decode)."""
    from peakc.backends.triton.cost import predict_artifact

    if args.pipeline or args.plot:
        raise PeakcError(
            f"artifact {args.model}: a triton program is priced as compiled; --pipeline and "
            "--plot apply to model sources"
        )
    folder = _triton_artifact(args.model)
    prediction = predict_artifact(folder, profile, args.batch, args.seq, args.context)
    if args.json:
        print(json.dumps(prediction, indent=2))
        return 0
    print(
        f"{args.model}: triton program on {profile.name} (compiled for "
        f"{prediction['compiled_for']}): device time, kernels back to back"
    )
    for phase, row in prediction["phases"].items():
        print(
            f"  {phase:<8} {fmt_time(row['predicted_ms'] / 1e3):>10}  {row['shape']}; "
            f"{row['kernels']} kernels, fallbacks {row['fallback_share']:.0%} of the time"
        )
    for note in prediction.get("notes", []):
        print(f"  note: {note}")
    return 0


def _pipeline_runner(spec: str, profile):
    """The graph preparation `estimate` runs: the pipeline, verified after every pass."""
    from peakc.passes.base import PassContext
    from peakc.passes.pipeline import Pipeline

    pipeline = Pipeline.parse(spec)  # spec errors before any work
    ctx = PassContext(target=profile)
    pipeline.check(ctx)  # unmet requirements (calibration data) before loading the model

    def run(graph):
        return pipeline.run(graph, ctx)[0]

    return run


def _print_tables(model: str, shown: Estimate, results: dict[str, Estimate], top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    where = f"batch {shown.batch}, seq {shown.seq}" if shown.batch else "example shape"
    blocks = Table(
        title=f"{model} on {shown.target}, {shown.runtime} runtime: {shown.phase} "
        f"({where}), per block"
    )
    for col in ("block", "time", "share", "GFLOP", "MB moved", "kernels"):
        blocks.add_column(col, justify="left" if col == "block" else "right")
    total = shown.total_time or 1.0
    for b in shown.blocks:
        blocks.add_row(
            b.name,
            fmt_time(b.time),
            f"{100 * b.time / total:.1f}%",
            f"{b.flops / 1e9:.3f}",
            f"{b.bytes / 1e6:.2f}",
            str(b.kernels),
        )
    console.print(blocks)
    nodes = Table(title=f"top {top} nodes")
    for col in ("node", "op", "module", "shape", "time", "device", "GFLOP", "MB", "bound"):
        nodes.add_column(col)
    for n in shown.top_nodes(top):
        nodes.add_row(
            n.name,
            n.op,
            n.module,
            n.shape,
            fmt_time(n.time),
            fmt_time(n.device_time),
            f"{n.flops / 1e9:.3f}",
            f"{n.bytes / 1e6:.2f}",
            n.bound,
        )
    console.print(nodes)
    for phase, est in results.items():
        m = est.memory
        fits = "fits" if m.fits_device else "does NOT fit"
        console.print(
            f"[bold]{phase}[/bold]: {fmt_time(est.total_time)} ({est.runtime}; device "
            f"{fmt_time(est.device_time)}), {est.total_flops / 1e9:.2f} GFLOP,"
            f" {est.total_bytes / 1e6:.1f} MB moved, {est.kernels} kernels; memory: weights "
            f"{m.weights / 1e6:.1f} MB, peak activations {m.peak_activations / 1e6:.2f} MB, "
            f"KV cache {m.kv_cache / 1e6:.2f} MB ({fits} device memory "
            f"{m.device_capacity / 2**30:.0f} GiB)",
            highlight=False,
        )
        for note in est.notes:
            console.print(f"  note: {note}", markup=False)


def fmt_time(seconds: float) -> str:
    """A duration in s, ms or us, whichever reads best."""
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def cmd_calibrate(args: argparse.Namespace) -> int:
    from peakc.cost_model.calibrate import calibrate, write_profile

    profile = calibrate(
        args.device,
        quick=args.quick,
        tiny=args.tiny,
        disk_dir=args.disk_dir,
        progress=sys.stderr.isatty() or not args.tiny,
    )
    write_profile(profile, args.output)
    peaks = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in profile.peak_flops.items())
    print(
        f"{profile.name}: {peaks}; memory {profile.memory_bandwidth / 1e9:.1f} GB/s; "
        f"launch {profile.launch_overhead * 1e6:.1f} us"
    )
    print(f"wrote {args.output}")
    return 0


ESTIMATE_COMMANDS = {"estimate": cmd_estimate, "calibrate": cmd_calibrate}
