"""Pipeline stages across gloo processes: equal to the unpartitioned model, stage files load
alone, bad configurations fail with one line on every rank."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peakc
from peakc.cli import main
from peakc.errors import PeakcError
from peakc.runtime.artifact import read_example_inputs
from peakc.runtime.generate import Generator, SamplingConfig
from peakc.runtime.manifest import read_manifest
from peakc.runtime.pipeline import PipelineRun, load_stage

PROMPTS = ["1 2 3 4", "9 8"]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """The demo Llama captured for generation, and artifacts cut into 2 and 3 stages."""
    from peakc.ir.capture import capture
    from peakc.models import load_source_for_task

    source = load_source_for_task("demo:llama", "generate", max_seq_len=24, max_batch=2)
    graph = capture(source.module, source.example_inputs, dynamic=source.dynamic)
    graph.info["generation"] = source.generation
    folder = tmp_path_factory.mktemp("pipeline")
    artifacts = {}
    for stages, spec in (
        (2, "partition{stages=2,schedule=gpipe,microbatches=2}"),
        (3, "partition{stages=3,schedule=1f1b,microbatches=3}"),
    ):
        compiled = peakc.compile(graph.copy(), pipeline=spec, parity=False)
        artifacts[stages] = compiled.save(folder / f"stages{stages}")
    return graph, artifacts


def launch(artifact: Path, nproc: int, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "peakc.cli", "launch", str(artifact)]
    argv += [f"--nproc-per-node={nproc}", "--timeout=60", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)


@pytest.mark.parametrize("stages", [2, 3])
def test_stages_equal_the_unpartitioned_model(decoder, stages, tmp_path):
    graph, artifacts = decoder
    artifact = artifacts[stages]
    out, tokens = tmp_path / "out.safetensors", tmp_path / "tokens.json"
    prompts = [f"--prompt-ids={p}" for p in PROMPTS]
    result = launch(
        artifact,
        stages,
        tmp_path,
        f"--output={out}",
        f"--tokens-output={tokens}",
        f"--max-new-tokens={NEW_TOKENS}",
        *prompts,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # forward: the example batch once per microbatch, through the schedule
    example = read_example_inputs(artifact, read_manifest(artifact))
    expected = graph.run(*example)[0]
    logits = load_file(str(out))["output_0"]
    microbatches = read_manifest(artifact)["partition"]["microbatches"]
    assert torch.allclose(logits, torch.cat([expected] * microbatches), atol=1e-5)
    # greedy generation, each stage's cache on its own rank
    reference = Generator(lambda *a: graph.run(*a), graph.info["generation"])
    prompt_ids = [[int(x) for x in p.split()] for p in PROMPTS]
    want = reference.generate(prompt_ids, SamplingConfig(max_new_tokens=NEW_TOKENS)).tokens
    assert json.loads(tokens.read_text()) == want


def test_manifest_records_cut_schedule_and_world_size(decoder):
    _, artifacts = decoder
    plan = read_manifest(artifacts[3])["partition"]
    assert plan["world_size"] == 3 and plan["schedule"] == "1f1b"
    assert [s["rank"] for s in plan["stages"]] == [0, 1, 2]
    assert [s["weights"] for s in plan["stages"]] == [f"stage_{i}.safetensors" for i in range(3)]
    assert plan["boundaries"][0] == 0 and plan["boundaries"][-1] == len(plan["units"])
    with pytest.raises(PeakcError, match="holds pipeline stages: run it with `peakc launch"):
        peakc.load(artifacts[3])


def test_a_stage_loads_without_the_other_stages(decoder, tmp_path):
    graph, artifacts = decoder
    copy = tmp_path / "copy"
    shutil.copytree(artifacts[2], copy)
    (copy / "stage_0.safetensors").unlink()
    (copy / "stage_0.pt2").unlink()
    stage = load_stage(copy, 1, "cpu")
    assert all(
        "layers.0." not in name for name in read_manifest(copy)["programs"]["stage_1"]["weights"]
    )
    assert len(stage.weights) == len(load_file(str(copy / "stage_1.safetensors")))
    with pytest.raises(PeakcError, match="stage 0's file stage_0.pt2 is missing"):
        load_stage(copy, 0, "cpu")


def test_world_size_mismatch_fails_before_any_collective(decoder, monkeypatch):
    _, artifacts = decoder
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(PeakcError, match="2 stages for 2 processes, but 3 were started"):
        PipelineRun(artifacts[2])
    assert main(["launch", str(artifacts[2]), "--nproc-per-node", "3"]) == 2


def test_missing_stage_file_fails_on_every_rank(decoder, tmp_path):
    """The stage processes started directly (what torchrun's agent would start): rank 1 lacks
    its weights file, and both ranks say so in one line instead of waiting on each other."""
    _, artifacts = decoder
    copy = tmp_path / "copy"
    shutil.copytree(artifacts[2], copy)
    (copy / "stage_1.safetensors").unlink()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    workers = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        argv = [sys.executable, "-m", "peakc.runtime.pipeline", str(copy), "--timeout=60"]
        workers.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True))
    for rank, worker in enumerate(workers):
        _, stderr = worker.communicate(timeout=240)
        assert worker.returncode == 2, stderr[-3000:]
        line = f"peakc: error (rank {rank}): rank 1: artifact {copy}: stage 1's file"
        assert line in stderr and "Traceback" not in stderr
