"""Run a partitioned artifact's stages across processes, GPUs and hosts.

An artifact compiled with the `partition` pass holds one program and one weights file per
stage, and a manifest entry `partition` (cut, schedule, microbatches, world size, per stage
its program, weights file and rank). Each process, started by torchrun (`peakc launch`),
loads only its own stages (`load_stage`: a rank reads and checks its files alone), joins the
process group (gloo on CPU, NCCL on GPUs; collectives time out instead of hanging) and:

- batch inference: `PipelineRun.forward` runs the stages as `PipelineStage`s under
  torch.distributed.pipelining's schedule (GPipe, 1F1B, interleaved 1F1B), the batch split
  into the plan's microbatches; a decoder's stages start from an empty cache (a prefill).
- generation: `PipelineRun.generate` keeps each stage's KV cache on its own rank. The
  schedules run whole batches of microbatches and keep no state between calls, which does not
  fit one-token decode steps, so each step is sent down the stages with plain
  torch.distributed send/recv: rank 0 samples (the `Generator`), broadcasts each step's
  header and positions, and gets the logits back from the last stage.

Bad configurations fail on every rank with one line: a world size other than the artifact's
(before any collective), a stage file missing or changed on one rank (the ranks agree on
their load errors before running), a peer that never answers (the group's timeout).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from peakc.errors import PeakcError
from peakc.runtime.artifact import program_loader, read_example_inputs
from peakc.runtime.generate import GenerationResult, Generator, SamplingConfig, write_cache
from peakc.runtime.manifest import read_manifest, sha256_file
from peakc.runtime.stage_options import DEFAULT_TIMEOUT_S, add_worker_arguments

PLAN_KEY = "partition"
BEGIN, STEP, STOP = 1, 2, 0  # generation commands rank 0 broadcasts


def read_plan(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, partition plan) of an artifact; an unpartitioned one is an error."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    plan = manifest.get(PLAN_KEY)
    if not plan:
        raise PeakcError(
            f"artifact {directory} has no pipeline stages: compile it with a pipeline that "
            "ends in partition{stages=N}"
        )
    return manifest, plan


def check_world_size(plan: dict[str, Any], world_size: int, directory: str | Path) -> None:
    """The artifact was cut for `plan["world_size"]` processes: any other count is refused."""
    if world_size != plan["world_size"]:
        raise PeakcError(
            f"artifact {directory} has {len(plan['stages'])} stages for "
            f"{plan['world_size']} processes, but {world_size} were started "
            f"(use --nproc-per-node and --nnodes for {plan['world_size']} in total)"
        )


@dataclass
class StageProgram:
    """One stage loaded alone: its program, weights, calling convention and cached layers."""

    index: int
    program: Any
    weights: list[torch.Tensor]
    signature: dict[str, Any]  # the manifest's program entry (inputs, outputs, dynamic dims)
    layers: list[int]  # [first, last] cached layer, or [] for a stage without attention

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.program(*self.weights, *inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    @property
    def cached_layers(self) -> int:
        return self.layers[1] - self.layers[0] + 1 if self.layers else 0

    def carried_inputs(self) -> list[dict[str, Any]]:
        """Inputs that come from the previous stage (the stage's own caches come last)."""
        inputs = self.signature["inputs"]
        return inputs[: len(inputs) - 2] if self.layers else inputs

    def carried_outputs(self) -> list[dict[str, Any]]:
        """Outputs for the next stage (or the model's outputs); the new keys and values stay."""
        outputs = self.signature["outputs"]
        return outputs[: len(outputs) - 2] if self.layers else outputs


def meta_tensors(specs: Sequence[dict[str, Any]], sizes: dict[str, int]) -> tuple:
    """Shape-only tensors of the signatures: what a PipelineStage sends and receives."""
    return tuple(
        torch.empty(resolve_shape(spec, sizes), dtype=getattr(torch, spec["dtype"]), device="meta")
        for spec in specs
    )


def load_stage(directory: str | Path, index: int, device: str | torch.device) -> StageProgram:
    """Stage `index` of a partitioned artifact, checking only its own files (its program and
    weights file against the manifest's checksums): the other stages' files may be absent."""
    directory = Path(directory)
    manifest, plan = read_plan(directory)
    if not 0 <= index < len(plan["stages"]):
        raise PeakcError(f"artifact {directory} has no stage {index}")
    entry = plan["stages"][index]
    signature = manifest["programs"][entry["program"]]
    for rel in (signature["file"], entry["weights"]):
        path = directory / rel
        if not path.is_file():
            raise PeakcError(f"artifact {directory}: stage {index}'s file {rel} is missing")
        if sha256_file(path) != manifest["files"].get(rel):
            raise PeakcError(f"artifact {directory}: stage {index}'s file {rel} was changed")
    import peakc.ir.ops  # noqa: F401  (the programs call peakc ops)

    load = program_loader(signature.get("format", "torch.export"), manifest["backend"], directory)
    program = load(directory / signature["file"], signature.get("runtime", {}))
    tensors = load_file(str(directory / entry["weights"]), device=str(device))
    return StageProgram(
        index=index,
        program=_on_device(program, torch.device(device)),
        weights=[tensors[name] for name in signature["weights"]],
        signature=signature,
        layers=list(entry.get("layers") or []),
    )


def _on_device(program: Any, device: torch.device) -> Any:
    from peakc.runtime.generate import place_on_device

    return place_on_device(program, device)


def resolve_shape(spec: dict[str, Any], sizes: dict[str, int]) -> list[int]:
    """A signature's shape with its named dims ("batch", "seq") replaced by their sizes."""
    shape = []
    for dim in spec["shape"]:
        if isinstance(dim, str) and dim not in sizes:
            raise PeakcError(f"tensor '{spec['name']}': dimension '{dim}' has no known size")
        shape.append(sizes[dim] if isinstance(dim, str) else int(dim))
    return shape


def named_sizes(specs: Sequence[dict[str, Any]], tensors: Sequence[torch.Tensor]) -> dict[str, int]:
    """The sizes of the named dims, read from tensors matching their signatures."""
    sizes: dict[str, int] = {}
    for spec, t in zip(specs, tensors):
        for dim, size in zip(spec["shape"], t.shape):
            if isinstance(dim, str):
                sizes[dim] = int(size)
    return sizes


class StageModule(torch.nn.Module):
    """A stage as the nn.Module a PipelineStage runs: a decoder's stage gets empty caches of
    its layers for each microbatch (a prefill) and passes on only the carried values."""

    def __init__(self, stage: StageProgram, layout: dict[str, Any] | None) -> None:
        super().__init__()
        self.stage = stage
        self.layout = layout

    def forward(self, *args: torch.Tensor) -> Any:
        if not self.stage.layers:
            out = self.stage(*args)
        else:
            k, v = empty_stage_cache(self.stage, self.layout, args)
            out = self.stage(*args, k, v)[:-2]
        return out[0] if len(out) == 1 else out


def empty_stage_cache(
    stage: StageProgram, layout: dict[str, Any], carried: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero keys and values for the stage's layers, batch taken from the carried inputs."""
    sizes = named_sizes(stage.carried_inputs(), carried)
    spec = stage.signature["inputs"][-1]
    shape = resolve_shape(spec, {**sizes, "batch": sizes.get("batch", layout["max_batch"])})
    dtype = getattr(torch, spec["dtype"])
    k = torch.zeros(shape, dtype=dtype, device=carried[0].device)
    return k, torch.zeros_like(k)


class PipelineRun:
    """This process's part of a partitioned artifact: its stages and the process group.

    Started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in the environment).
    """

    def __init__(
        self,
        directory: str | Path,
        device: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.directory = Path(directory)
        self.manifest, self.plan = read_plan(self.directory)
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise PeakcError("pipeline stages run under torchrun: use `peakc launch`")
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        check_world_size(self.plan, self.world, self.directory)
        self.device = torch.device(device or _default_device())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
        )
        self.ranks = [s["rank"] for s in self.plan["stages"]]
        error = None
        try:
            self.stages = {
                s: load_stage(self.directory, s, self.device)
                for s, rank in enumerate(self.ranks)
                if rank == self.rank
            }
        except PeakcError as exc:
            error = str(exc)
        try:
            self.agree(error)
        except PeakcError:  # every rank raises here, with nothing left in flight
            self.close(barrier=False)
            raise

    @property
    def layout(self) -> dict[str, Any] | None:
        return self.manifest.get("generation")

    def agree(self, error: str | None) -> None:
        """Every rank learns every rank's error and raises the first: none waits alone."""
        errors: list[str | None] = [None] * self.world
        dist.all_gather_object(errors, error)
        for rank, message in enumerate(errors):
            if message:
                raise PeakcError(f"rank {rank}: {message}")

    def close(self, barrier: bool = True) -> None:
        """Leave the process group before the interpreter exits (gloo's threads abort a process
        that exits with its group alive). `barrier`: first wait until every rank is done, so no
        rank tears its group down while a peer still receives from it; off after an error,
        where a peer may never arrive."""
        if not dist.is_initialized():
            return
        if barrier:
            dist.barrier()
        dist.destroy_process_group()

    # --- batch inference ---------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The whole batch through the schedule (first stage's rank gives the inputs: the
        batch is split into the plan's microbatches); the outputs on the last stage's rank."""
        from torch.distributed.pipelining import PipelineStage

        count = len(self.ranks)
        args = [t.to(self.device) for t in inputs] if 0 in self.stages else []
        sizes = self.microbatch_sizes(args)
        pipe_stages = [
            PipelineStage(
                StageModule(stage, self.layout),
                index,
                count,
                self.device,
                input_args=meta_tensors(stage.carried_inputs(), sizes),
                output_args=meta_tensors(stage.carried_outputs(), sizes),
            )
            for index, stage in sorted(self.stages.items())
        ]
        schedule = build_schedule(self.plan["schedule"], pipe_stages, self.plan["microbatches"])
        with torch.no_grad():
            out = schedule.eval(*args)
        if count - 1 not in self.stages:
            return None
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def microbatch_sizes(self, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
        """The named dims' sizes of one microbatch, read from the inputs on the first stage's
        rank and broadcast, so every stage knows the shapes it receives and sends."""
        first = self.stage_signature(0)
        names = sorted((first.get("dynamic") or {}).get("dims", {}))
        values = [0] * len(names)
        if inputs:
            sizes = named_sizes(first["inputs"], inputs)
            if "batch" in sizes:
                sizes["batch"] //= self.plan["microbatches"]
            values = [sizes[name] for name in names]
        header = torch.tensor(values or [0], dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=self.ranks[0])
        return dict(zip(names, header.tolist()))

    def example_batch(self) -> tuple[torch.Tensor, ...]:
        """The artifact's example inputs repeated once per microbatch (the first stage's)."""
        first = self.stages[0]
        inputs = read_example_inputs(self.directory, self.manifest)
        repeat = self.plan["microbatches"]
        return tuple(torch.cat([t] * repeat) for t in inputs[: len(first.carried_inputs())])

    # --- generation ------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], config: SamplingConfig
    ) -> GenerationResult | None:
        """Rank 0 generates (its Generator's steps run down the stages); the other ranks serve
        steps until rank 0 is done. The result on rank 0, None elsewhere."""
        if self.layout is None:
            raise PeakcError(f"artifact {self.directory} was not compiled with --task generate")
        if self.rank != 0:
            self.serve()
            return None
        step = PipelineDecodeStep(self)
        try:
            return Generator(step, self.layout, self.device).generate(prompts, config)
        finally:
            self.command(STOP, 0, 0)

    def command(self, cmd: int, batch: int, seq: int) -> tuple[int, int, int]:
        header = torch.tensor([cmd, batch, seq], dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        return tuple(int(x) for x in header.tolist())

    def serve(self) -> None:
        """Follow rank 0's commands: allocate caches, run steps, stop."""
        caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        while True:
            cmd, batch, seq = self.command(STOP, 0, 0)
            if cmd == STOP:
                return
            if cmd == BEGIN:
                caches = self.allocate_caches(batch)
                continue
            positions = torch.empty(batch, seq, dtype=torch.int64, device=self.device)
            dist.broadcast(positions, src=0)
            self.run_step(None, positions, caches)

    def allocate_caches(self, batch: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        layout = self.layout
        dtype = getattr(torch, layout["dtype"])
        caches = {}
        for index, stage in self.stages.items():
            if stage.layers:
                shape = (
                    stage.cached_layers,
                    batch,
                    layout["num_kv_heads"],
                    layout["max_seq_len"],
                    layout["head_dim"],
                )
                k = torch.zeros(shape, dtype=dtype, device=self.device)
                caches[index] = (k, torch.zeros_like(k))
        return caches

    def run_step(
        self,
        ids: torch.Tensor | None,
        positions: torch.Tensor,
        caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor | None:
        """One decoder step down the stages this rank holds; returns the logits on rank 0."""
        batch, seq = positions.shape
        sizes = {"batch": batch, "seq": seq}
        last = len(self.ranks) - 1
        carried: tuple[torch.Tensor, ...] = ()
        for index, owner in enumerate(self.ranks):
            if owner != self.rank:
                continue
            stage = self.stages[index]
            if index == 0:
                carried = (ids, positions)
            elif self.ranks[index - 1] != self.rank:
                carried = self.receive(stage.carried_inputs(), sizes, self.ranks[index - 1])
            if stage.layers:
                k, v = caches[index]
                *carried, new_k, new_v = stage(*carried, k, v)
                write_cache(k, v, new_k, new_v, positions)
            else:
                carried = stage(*carried)
            carried = tuple(carried)
            if index < last and self.ranks[index + 1] != self.rank:
                self.send(carried, self.ranks[index + 1])
            if index == last and self.rank != 0:
                self.send(carried[:1], 0)
        if self.rank != 0:
            return None
        if self.ranks[last] == 0:
            return carried[0]
        logits = self.stage_signature(last)["outputs"][:1]
        return self.receive(logits, sizes, self.ranks[last])[0]

    def stage_signature(self, index: int) -> dict[str, Any]:
        return self.manifest["programs"][self.plan["stages"][index]["program"]]

    def send(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        for t in tensors:
            dist.send(t.contiguous(), dst=dst)

    def receive(
        self, specs: Sequence[dict[str, Any]], sizes: dict[str, int], src: int
    ) -> tuple[torch.Tensor, ...]:
        out = []
        for spec in specs:
            t = torch.empty(
                resolve_shape(spec, sizes), dtype=getattr(torch, spec["dtype"]), device=self.device
            )
            dist.recv(t, src=src)
            out.append(t)
        return tuple(out)


class PipelineDecodeStep:
    """The Generator's step on rank 0 (a CacheOwningStep): each call is broadcast to the other
    ranks and runs down the stages; each rank keeps the caches of its own stages."""

    def __init__(self, run: PipelineRun) -> None:
        self.run = run
        self.caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, batch: int) -> None:
        self.run.command(BEGIN, batch, 0)
        self.caches = self.run.allocate_caches(batch)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch, seq = positions.shape
        self.run.command(STEP, batch, seq)
        positions = positions.contiguous()
        dist.broadcast(positions, src=0)
        return self.run.run_step(ids, positions, self.caches)


def build_schedule(name: str, stages: list[Any], microbatches: int) -> Any:
    """torch.distributed.pipelining's schedule for the plan (inference: `eval`, no loss)."""
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    if name == "interleaved":
        return ScheduleInterleaved1F1B(stages, microbatches)
    schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return schedule(stages[0], microbatches)


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


# --- torchrun ------------------------------------------------------------------------------


def launch_arguments(
    directory: str | Path,
    nproc_per_node: int,
    worker_args: Sequence[str] = (),
    nnodes: str = "1",
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "peakc",
) -> list[str]:
    """torchrun's command line (after `torchrun`) that runs this module's worker on every
    process: standalone on one host, else a c10d rendezvous at `rdzv_endpoint`."""
    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if rdzv_endpoint:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
        if node_rank is not None:
            args.append(f"--node-rank={node_rank}")
    elif nnodes != "1":
        raise PeakcError("launch: --nnodes above 1 needs --rdzv-endpoint HOST:PORT")
    else:
        args.append("--standalone")
    return [*args, "--module", "peakc.runtime.pipeline", str(directory), *worker_args]


def launch(arguments: Sequence[str]) -> None:
    """Run torchrun (torch.distributed.run, its elastic launcher) with these arguments; a
    failed worker is one line naming its rank (the worker printed its own error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(arguments)))
    except ChildFailedError as exc:
        ranks = sorted(exc.failures)  # global rank -> ProcessFailure
        codes = sorted({f.exitcode for f in exc.failures.values()})
        raise PeakcError(
            f"launch: rank(s) {', '.join(map(str, ranks))} failed (exit code "
            f"{', '.join(map(str, codes))}); their errors are above"
        ) from None


# --- worker --------------------------------------------------------------------------------


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peakc-stage", description="one pipeline-stage process")
    add_worker_arguments(p)
    p.add_argument("artifact")
    return p


def run_worker(args: argparse.Namespace) -> None:
    """Batch inference (`--output` or no prompts) and/or generation (`--prompt-ids`)."""
    run = PipelineRun(args.artifact, args.device, args.timeout)
    finished = False
    try:
        if args.output or not args.prompt_ids:
            inputs: tuple[torch.Tensor, ...] = ()  # only the first stage's rank reads them
            if 0 in run.stages and args.inputs:
                named = load_file(args.inputs)
                inputs = tuple(t for _, t in sorted(named.items(), key=_input_index))
            elif 0 in run.stages:
                inputs = run.example_batch()
            outputs = run.forward(*inputs)
            if outputs is not None:
                named = {f"output_{i}": t.contiguous().cpu() for i, t in enumerate(outputs)}
                if args.output:
                    save_file(named, args.output)
                print(f"rank {run.rank}: outputs {[list(t.shape) for t in outputs]}")
        if args.prompt_ids:
            prompts = [[int(x) for x in p.replace(",", " ").split()] for p in args.prompt_ids]
            config = SamplingConfig(max_new_tokens=args.max_new_tokens)
            result = run.generate(prompts, config)
            if result is not None:
                text = json.dumps(result.tokens)
                print(text)
                if args.tokens_output:
                    Path(args.tokens_output).write_text(text)
        finished = True
    finally:
        run.close(barrier=finished)


def _input_index(item: tuple[str, torch.Tensor]) -> int:
    return int(item[0].rsplit("_", 1)[1])


def main(argv: Sequence[str] | None = None) -> int:
    args = worker_parser().parse_args(argv)
    rank = os.environ.get("RANK", "?")
    faulthandler.enable()  # a rank killed by a signal shows where it was
    try:
        run_worker(args)
    except PeakcError as exc:
        print(f"peakc: error (rank {rank}): {exc}", file=sys.stderr)
        return 2
    except (dist.DistError, RuntimeError) as exc:  # a peer gone, a timeout, a rendezvous
        text = str(exc).strip().splitlines()
        print(
            f"peakc: error (rank {rank}): torch.distributed: {text[0] if text else exc!r}",
            file=sys.stderr,
        )
        return 2
    return 0


def exit_worker(code: int) -> None:
    """Leave the stage process without the interpreter's finalization. The group is gone and
    every output file closed by now, but gloo's threads may still hold the last references
    to tensors, which finalization then frees after the interpreter's state is torn down:
    'terminate called without an active exception' and SIGABRT (pytorch/pytorch#179291;
    seen once in CI's full suite, not reproduced in 52 launches here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_worker(main())
