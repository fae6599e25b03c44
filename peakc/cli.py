"""The `peakc` command line: compile, run, passes, inspect."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

from peakc.cli_estimate import ESTIMATE_COMMANDS, add_estimate_commands
from peakc.cli_options import add_options_commands, cmd_backends, cmd_passes
from peakc.errors import PeakcError
from peakc.runtime.stage_options import add_worker_arguments, worker_arguments
from peakc.runtime.threads import cpu_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peakc", description="Ahead-of-time LLM graph compiler")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="capture a model, run a pipeline, write an artifact")
    p.add_argument("model", help="demo:NAME | hf:PATH | gguf:FILE | py:MODULE:FUNC | artifact:DIR")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--pipeline", default="default", help="pass spec or named pipeline")
    p.add_argument(
        "--backend",
        default="eager",
        help="backend spec; several (triton,ort) lower one pipeline run into DIR/<backend> each",
    )
    p.add_argument("--target", default="cpu", help="hardware profile name or JSON file")
    p.add_argument("--plugin", action="append", default=[], help="Python file registering passes")
    p.add_argument("--dump-ir", metavar="DIR", help="write numbered IR dumps here")
    p.add_argument("--no-parity", action="store_true", help="skip the per-pass output check")
    p.add_argument("--explain-fusion", action="store_true", help="print fusion near-misses")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--task", default="forward", help="forward (default) or generate (KV cache)")
    p.add_argument("--max-seq-len", type=int, default=512, help="KV cache length (generate)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch (generate)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="weights: auto (the source's own: bfloat16 for a bf16 or quantized checkpoint, "
        "float32 for the demos), float32, bfloat16 or float16",
    )
    p.add_argument("--calib-data", metavar="PATH", help="text file or folder for calibration")
    p.add_argument("--seq-len", type=int, help="capture at this sequence length (calibration)")

    p = sub.add_parser("generate", help="generate text from an artifact compiled for generation")
    p.add_argument("artifact")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", action="append", help="text; repeat for a batch")
    given.add_argument(
        "--prompt-ids",
        action="append",
        help="token ids like '1 2 3' (for artifacts without a tokenizer); repeat for a batch",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    _add_threads_argument(p)

    p = sub.add_parser("bench", help="prefill latency and decode tokens/s of an artifact or model")
    p.add_argument(
        "target",
        nargs="+",
        help="artifact directory, or a model spec (hf:, gguf:, demo:); several: side by side",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="one or more batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    _add_threads_argument(p)

    p = sub.add_parser("run", help="load an artifact and run it")
    p.add_argument("artifact")
    p.add_argument("--input", help="safetensors file of inputs (input_0, input_1, ...)")
    p.add_argument("--output", help="write outputs to this safetensors file")
    p.add_argument("--plugin", action="append", default=[])
    _add_threads_argument(p)

    add_options_commands(sub)  # passes, backends

    p = sub.add_parser(
        "launch", help="run a partitioned artifact's stages on N processes (torchrun)"
    )
    p.add_argument("artifact")
    p.add_argument("--nproc-per-node", type=int, required=True, help="processes on this host")
    p.add_argument("--nnodes", default="1", help="hosts (torchrun's MIN:MAX form allowed)")
    p.add_argument("--node-rank", type=int, help="this host's rank (multi-host)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous (multi-host)")
    p.add_argument("--rdzv-id", default="peakc", help="job id shared by every host")
    add_worker_arguments(p)

    p = sub.add_parser("inspect", help="show an artifact's manifest and report")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")

    add_estimate_commands(sub)  # estimate, calibrate

    p = sub.add_parser("eval", help="perplexity of a model or artifact on a text file or folder")
    p.add_argument("model", help="a model spec (demo:NAME, hf:PATH, ...) or an artifact folder")
    p.add_argument("--ppl", metavar="PATH", required=True, help="text file or folder")
    p.add_argument("--seq-len", type=int, help="window length (default: the captured length)")
    p.add_argument("--max-windows", type=int, default=0, help="evaluate at most this many")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--plugin", action="append", default=[])
    _add_threads_argument(p)
    return parser


def _add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: one per physical core this process may use)",
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command: errors are one line (a traceback with --debug), and Ctrl-C exits
    with 130 and one line whenever it comes, while torch and friends are imported too."""
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        if not debug:
            warnings.filterwarnings("ignore")
        for plugin in getattr(args, "plugin", []):
            from peakc.passes.base import load_plugin

            load_plugin(plugin)
        return COMMANDS[args.command](args)
    except PeakcError as exc:
        if debug:
            raise
        print(f"peakc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("peakc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `peakc ... | head` stopped reading: nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except Exception as exc:  # an internal error still gets one line without --debug
        if debug:
            raise
        text = str(exc).strip().splitlines()
        print(
            f"peakc: internal error: {type(exc).__name__}: {text[0] if text else ''} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def cmd_compile(args: argparse.Namespace) -> int:
    from rich.console import Console

    import peakc
    from peakc.cli_progress import ProgressBars, print_compile_summary
    from peakc.models import load_source_for_task
    from peakc.passes.pipeline import Pipeline

    console = Console(stderr=True)
    output = Path(args.output)
    _check_compile_args(args, output)
    pipeline = Pipeline.parse(args.pipeline)  # spec errors before any work
    with ProgressBars(console) as bars:
        with bars.phase("load", args.model):
            source = load_source_for_task(
                args.model,
                args.task,
                args.max_seq_len,
                args.max_batch,
                args.dtype,
                bfloat16_runs=_bfloat16_runs(args.backend),
            )
        with bars.phase("calibration data", args.calib_data) if args.calib_data else nullcontext():
            calibration = _calibration_text(args, source)
        compiled = peakc.compile(
            source,
            pipeline=pipeline,
            backend=args.backend,
            target=args.target,
            dump_ir=args.dump_ir,
            parity=not args.no_parity,
            reproducer_dir=Path(f"{output}.reproducer"),
            source=args.model,
            instruments=[bars],
            timing=bars.seconds,
            calibration_data=calibration,
        )
        written = compiled.save(output, force=args.force)
    report = _first_report(compiled)
    print_compile_summary(console, report)
    if isinstance(written, dict):
        shared = report["one_pipeline"]
        console.print(
            f"one pipeline run (graph {shared['fingerprint']}) lowered by "
            f"{', '.join(written)}: " + ", ".join(str(path) for path in written.values()),
            markup=False,
        )
    if args.explain_fusion:
        misses = report.get("fusion_near_misses", [])
        console.print(f"fusion near-misses: {len(misses)}")
        for miss in misses:
            console.print(f"  {miss}", markup=False)
    if source.dtype is not None:
        console.print(_dtype_note(args.dtype, source), markup=False)
    print(f"wrote {output}")
    return 0


def _check_compile_args(args: argparse.Namespace, output: Path) -> None:
    """Inputs that would fail (or destroy something) only after minutes of work: refused first."""
    from peakc.api import check_artifact_set
    from peakc.backends.base import get_backends
    from peakc.runtime.artifact import check_replaceable

    several = len(get_backends(args.backend)) > 1  # unknown, twice or bad options: named now
    (check_artifact_set if several else check_replaceable)(output, args.force)
    _check_output_writable(output)
    if not args.pipeline.strip():
        raise PeakcError("--pipeline is empty: name 'none' to run no passes")
    if args.seq_len is not None and args.seq_len < 1:
        raise PeakcError(f"--seq-len must be at least 1, got {args.seq_len}")


def _first_report(compiled) -> dict:
    """The report the compile summary shows: the artifact's, or with several backends the
    first one's (the passes and their costs are the same in each)."""
    artifacts = getattr(compiled, "artifacts", None)
    return next(iter(artifacts.values())).contents.report if artifacts else compiled.contents.report


def _bfloat16_runs(backend: str) -> bool:
    """Whether the backends can run bfloat16 here: ONNX Runtime's CPU provider has no bfloat16
    MatMul, so an ort artifact needs the CUDA provider for it."""
    from peakc.passes.spec import parse_items

    if "ort" not in [item.name for item in parse_items(backend, "backend")]:
        return True
    try:
        import onnxruntime
    except ImportError:
        return True  # the backend's own error says onnxruntime is missing
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _dtype_note(requested: str, source) -> str:
    """Which dtype the weights have, and why, for the compile output."""
    if requested != "auto":
        return f"weights: {source.dtype} (--dtype {requested})"
    native = source.native_dtype
    if native == "bfloat16" and source.dtype == "float32":
        return (
            "weights: float32 (auto; the source is bfloat16, which ONNX Runtime's CPU provider "
            "cannot run)"
        )
    return f"weights: {source.dtype} (auto: the source's own dtype)"


def _check_output_writable(output: Path) -> None:
    """The artifact is staged beside `output`: the first existing folder above it must be a
    folder this user may write in."""
    parent = output.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PeakcError(f"cannot write {output}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PeakcError(f"cannot write {output}: no permission to write in {parent}")


def cmd_run(args: argparse.Namespace) -> int:
    import peakc
    from peakc.runtime.threads import apply_threads

    threads = apply_threads(args.threads)
    artifact = peakc.load(args.artifact)
    inputs = artifact.example_inputs
    if args.input:
        inputs = _read_inputs(Path(args.input))
    outputs = artifact(*inputs)
    for i, out in enumerate(outputs):
        flat = out.float().flatten()
        print(
            f"output_{i}: {str(out.dtype).removeprefix('torch.')}{list(out.shape)} "
            f"mean={flat.mean():.6g} std={flat.std():.6g} "
            f"first={[round(v, 5) for v in flat[:4].tolist()]}"
        )
    print(f"threads: {threads}")
    if args.output:
        from safetensors.torch import save_file

        save_file({f"output_{i}": o.contiguous() for i, o in enumerate(outputs)}, args.output)
        print(f"wrote {args.output}")
    return 0


def _read_inputs(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise PeakcError(f"input file not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PeakcError(f"input file {path} is not a safetensors file: {exc}") from exc
    names = sorted(tensors, key=lambda k: int(k.rsplit("_", 1)[-1]) if k[-1].isdigit() else 0)
    return tuple(tensors[n] for n in names)


def cmd_inspect(args: argparse.Namespace) -> int:
    # the manifest and checksums only (no torch: inspect starts at once); running the
    # artifact is `peakc run`, which also checks its ops are registered
    from peakc.runtime.manifest import read_manifest, verify_files

    directory = Path(args.artifact)
    m = read_manifest(directory)
    verify_files(directory, m)
    report = json.loads((directory / "report.json").read_text())
    if args.json:
        print(json.dumps({"manifest": m, "report": report}, indent=2))
        return 0
    print(f"artifact   {directory}")
    print(f"source     {m['source']}")
    versions = f"format {m['format_version']}, torch {m['torch_version']}"
    print(f"peakc      {m['peakc_version']} ({versions})")
    print(f"backend    {m['backend']}")
    print(f"pipeline   {m['pipeline'] or '(none)'}")
    for name, prog in m["programs"].items():
        ins = ", ".join(f"{i['name']}:{i['dtype']}{i['shape']}" for i in prog["inputs"])
        outs = ", ".join(f"{o.get('dtype', '?')}{o.get('shape', '')}" for o in prog["outputs"])
        print(f"program    {name}: ({ins}) -> ({outs}), {len(prog['weights'])} weights")
    print(f"files      {len(m['files'])}, checksums verified")
    print()
    print((directory / "report.md").read_text())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import peakc
    from peakc.runtime.generate import Generator, SamplingConfig
    from peakc.runtime.threads import apply_threads

    if args.chat and args.prompt_ids:
        raise PeakcError("--chat applies to --prompt text, not to --prompt-ids")
    threads = apply_threads(args.threads)
    artifact = peakc.load(args.artifact)
    generator = Generator.from_artifact(artifact, args.device)
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    config.validate()
    if args.prompt_ids:
        return _generate_ids(generator, config, args.prompt_ids, threads)
    if generator.tokenizer is None:
        raise PeakcError(
            f"{args.artifact} has no tokenizer: give token ids with --prompt-ids '1 2 3'"
        )
    if args.chat and not getattr(generator.tokenizer, "chat_template", None):
        raise PeakcError(f"{args.artifact}'s tokenizer has no chat template: drop --chat")
    prompts = generator.chat_prompts(args.prompt) if args.chat else args.prompt
    single = len(args.prompt) == 1
    if single and not args.chat:  # a continuation follows its prompt; a chat answer stands alone
        print(args.prompt[0], end="", flush=True)

    def on_text(index: int, text: str) -> None:
        if single:
            print(text, end="", flush=True)

    texts = generator.generate_text(prompts, config, on_text)
    result = generator.last_result
    if single:
        print()
    else:
        for prompt, text in zip(args.prompt, texts):
            print(f"--- {prompt}\n{text}" if args.chat else f"--- {prompt}{text}")
    _print_rate(result, generator.device, threads)
    return 0


def _generate_ids(generator, config, prompts: list[str], threads: int) -> int:
    """--prompt-ids: token ids in, each prompt's new ids printed on a line."""
    batch = []
    for text in prompts:
        try:
            ids = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            ids = []
        if not ids:
            raise PeakcError(f"--prompt-ids '{text}' is not a list of token ids like '1 2 3'")
        batch.append(ids)
    result = generator.generate(batch, config)
    for tokens in result.tokens:
        print(" ".join(str(t) for t in tokens))
    _print_rate(result, generator.device, threads)
    return 0


def _print_rate(result, device, threads: int) -> None:
    rate = result.new_tokens / max(result.prefill_seconds + result.decode_seconds, 1e-9)
    print(
        f"[{result.new_tokens} tokens, prefill {result.prefill_seconds * 1e3:.1f} ms, "
        f"{rate:.1f} tokens/s on {device}, {cpu_threads(threads)}]",
        file=sys.stderr,
    )


def _calibration_text(args: argparse.Namespace, source):
    """Apply --seq-len to the source's example inputs; tokenize --calib-data if given."""
    from peakc.data import source_token_text

    if args.seq_len:
        _set_sequence_length(source, args.seq_len)
    return source_token_text(args.calib_data, source) if args.calib_data else None


def _set_sequence_length(source, seq_len: int) -> None:
    from peakc.data import with_sequence_length
    from peakc.models import max_sequence_length

    if source.graph is not None:
        _check_captured_length(source.spec, source.example_inputs, seq_len)
        return
    limit = max_sequence_length(source.module)
    if limit is not None and seq_len > limit:
        raise PeakcError(f"--seq-len {seq_len} exceeds {source.spec}'s limit of {limit} positions")
    source.example_inputs = with_sequence_length(source.example_inputs, seq_len)


def _check_captured_length(spec: str, example_inputs, seq_len: int) -> None:
    """A captured program (a graph, an artifact) runs at the length it was captured at."""
    captured = example_inputs[0].shape[-1]
    if captured != seq_len:
        raise PeakcError(f"{spec} was captured at sequence length {captured}, not {seq_len}")


def cmd_eval(args: argparse.Namespace) -> int:
    from peakc.api import use_cuda_kernels
    from peakc.data import consecutive_windows, source_token_text
    from peakc.ir.capture import capture
    from peakc.models import artifact_source, load_source
    from peakc.runtime.artifact import load_artifact
    from peakc.runtime.evaluate import perplexity
    from peakc.runtime.threads import apply_threads

    if args.seq_len is not None and args.seq_len < 2:
        raise PeakcError(f"--seq-len must be at least 2 (a token and the next), got {args.seq_len}")
    threads = apply_threads(args.threads)
    use_cuda_kernels()  # as `peakc bench`: compressed linears of eager programs on the kernels
    spec = args.model if ":" in args.model else f"artifact:{args.model}"
    kind, _, rest = spec.partition(":")
    if kind == "artifact":  # loaded (and its checksums verified) once
        artifact = load_artifact(rest)
        if "generation" in artifact.manifest:  # a decoder over a KV cache: windows are prefills
            return _eval_decoder_artifact(args, spec, artifact, threads)
        info = artifact.manifest["programs"][artifact.default_program]
        if info.get("format") in ("onnx", "triton"):  # no Graph to read back: it runs itself
            return _eval_onnx_artifact(args, spec, artifact, info, threads)
        source = artifact_source(spec, artifact)
    else:
        source = load_source(spec)
    if args.seq_len:
        _set_sequence_length(source, args.seq_len)
    text = source_token_text(args.ppl, source)
    graph = source.graph or capture(source.module, source.example_inputs, name=spec)
    seq_len = source.example_inputs[0].shape[-1]
    windows = consecutive_windows(text, seq_len, limit=args.max_windows)
    result = perplexity(graph, windows, args.device)
    _print_perplexity(spec, result, args.ppl, text, threads)
    return 0


def _eval_decoder_artifact(args: argparse.Namespace, spec: str, artifact, threads: int) -> int:
    """A --task generate artifact: each window is a prefill from an empty cache, as long as
    the cache unless --seq-len says otherwise."""
    from peakc.data import consecutive_windows, load_token_text, load_tokenizer
    from peakc.runtime.evaluate import prefill_perplexity
    from peakc.runtime.generate import Generator

    layout = artifact.manifest["generation"]
    seq_len = args.seq_len or layout["max_seq_len"]
    if seq_len > layout["max_seq_len"]:
        raise PeakcError(
            f"--seq-len {seq_len} exceeds {spec}'s KV cache of {layout['max_seq_len']} tokens"
        )
    tokenizer = load_tokenizer(artifact.directory / "tokenizer", layout["vocab_size"])
    text = load_token_text(args.ppl, tokenizer)
    windows = consecutive_windows(text, seq_len, limit=args.max_windows)
    generator = Generator.from_artifact(artifact, args.device)
    result = prefill_perplexity(generator.prefill_logits, windows)
    _print_perplexity(spec, result, args.ppl, text, threads)
    return 0


def _eval_onnx_artifact(
    args: argparse.Namespace, spec: str, artifact, info: dict, threads: int
) -> int:
    from peakc.data import consecutive_windows, load_token_text, load_tokenizer
    from peakc.runtime.evaluate import artifact_perplexity

    example = artifact.example_inputs
    if args.seq_len:
        _check_captured_length(spec, example, args.seq_len)
    seq_len = example[0].shape[-1]
    vocab = info["outputs"][0]["shape"][-1]  # from the signature: no forward pass to learn it
    if not isinstance(vocab, int):
        raise PeakcError(f"eval: {spec}'s first output has no fixed last dim (expected logits)")
    tokenizer = load_tokenizer(artifact.directory / "tokenizer", vocab)
    text = load_token_text(args.ppl, tokenizer)
    windows = consecutive_windows(text, seq_len, limit=args.max_windows)
    _print_perplexity(spec, artifact_perplexity(artifact, windows), args.ppl, text, threads)
    return 0


def _print_perplexity(spec: str, result, path, text, threads: int) -> None:
    print(
        f"{spec}: perplexity {result.ppl:.4f} (nll {result.nll:.4f}) over {result.windows} "
        f"windows of {result.seq_len} tokens from {path} ({text.tokenizer} tokenizer, "
        f"{cpu_threads(threads)})"
    )


def cmd_launch(args: argparse.Namespace) -> int:
    """torchrun (torch.distributed.run) with one stage process per rank of the artifact."""
    from peakc.runtime.pipeline import launch, launch_arguments, read_plan

    _, plan = read_plan(Path(args.artifact))  # unpartitioned: an error before torchrun
    if args.nnodes == "1" and args.nproc_per_node != plan["world_size"]:
        raise PeakcError(
            f"artifact {args.artifact} has stages for {plan['world_size']} processes: "
            f"--nproc-per-node {args.nproc_per_node} does not match"
        )
    launch(
        launch_arguments(
            args.artifact,
            args.nproc_per_node,
            worker_arguments(args),
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            rdzv_endpoint=args.rdzv_endpoint,
            rdzv_id=args.rdzv_id,
        )
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from peakc.api import use_cuda_kernels
    from peakc.models import eager_generation_step
    from peakc.runtime.bench import bench_many, bench_target, format_bench, format_side_by_side
    from peakc.runtime.threads import apply_threads

    threads = apply_threads(args.threads)
    use_cuda_kernels()  # eager artifacts' linear_wq and 2:4 ops on the Triton kernels (CUDA)
    if len(args.target) > 1 or len(args.batch) > 1:  # side by side, per phase and batch
        results = bench_many(
            args.target,
            args.batch,
            args.prompt_len,
            args.gen_len,
            args.repeats,
            args.device,
            load_model=eager_generation_step,
        )
        for result in results:
            result["threads"] = threads
        print(json.dumps(results, indent=2) if args.json else format_side_by_side(results))
        return 0
    result = bench_target(
        args.target[0],
        args.batch[0],
        args.prompt_len,
        args.gen_len,
        args.repeats,
        args.device,
        load_model=eager_generation_step,
    )
    result["threads"] = threads
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


COMMANDS = {
    "compile": cmd_compile,
    "run": cmd_run,
    "passes": cmd_passes,
    "backends": cmd_backends,
    "inspect": cmd_inspect,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "launch": cmd_launch,
    "eval": cmd_eval,
}

COMMANDS.update(ESTIMATE_COMMANDS)


def console() -> None:
    """The `peakc` command (and `python -m peakc.cli`): main's status as the exit code."""
    status = main()
    if status == 130:
        # Interrupted, and main has cleaned up. A Ctrl-C that landed while an extension module
        # ran Python code during its import leaves CPython's "unhandled KeyboardInterrupt"
        # flag set even though main caught it, and the interpreter would then kill itself with
        # SIGINT at exit instead of returning 130.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    console()
