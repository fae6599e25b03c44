"""Pipeline stages lowered to the triton backend (TRITON_INTERPRET=1, gloo): a 2-stage run
equals the unpartitioned model (forward and greedy generation), and a triton stage loads
without the other stage's files.

TRITON_INTERPRET must be set before a kernel is decorated, so the compile and the stage load
run in one fresh interpreter (a subprocess printing its findings as JSON), and the stage
processes `peakc launch` starts get it in their environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peakc.runtime.artifact import read_example_inputs
from peakc.runtime.generate import Generator, SamplingConfig
from peakc.runtime.manifest import read_manifest

pytest.importorskip("triton")

PROMPTS = ["1 2 3 4", "9 8"]
NEW_TOKENS = 4
MAX_SEQ_LEN, MAX_BATCH = 24, 2
SPEC = "partition{stages=2,schedule=gpipe,microbatches=2}"

COMPILE = r"""
import json, shutil, sys
from pathlib import Path
from safetensors.torch import load_file
import peakc
from peakc.errors import PeakcError
from peakc.models import load_source_for_task
from peakc.runtime.manifest import read_manifest
from peakc.runtime.pipeline import load_stage

tmp, spec, max_seq_len, max_batch = Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:5])
source = load_source_for_task("demo:llama", "generate", max_seq_len=max_seq_len,
                              max_batch=max_batch)
compiled = peakc.compile(source, backend="triton", pipeline=spec, parity=False)
artifact = compiled.save(tmp / "stages2")

# stage 1 alone: the other stage's program and weights are gone
copy = tmp / "copy"
shutil.copytree(artifact, copy)
(copy / "stage_0.safetensors").unlink()
(copy / "stage_0.triton.json").unlink()
stage = load_stage(copy, 1, "cpu")
found = {
    "artifact": str(artifact),
    "report": sorted(compiled.contents.report["triton"]["programs"]),
    "program": type(stage.program).__name__,
    "weights": len(stage.weights),
    "file_weights": len(load_file(str(copy / "stage_1.safetensors"))),
    "names": read_manifest(copy)["programs"]["stage_1"]["weights"],
}
try:
    load_stage(copy, 0, "cpu")
except PeakcError as exc:
    found["missing"] = str(exc)
print("RESULT " + json.dumps(found))
"""


@pytest.fixture(scope="module")
def triton_stages(tmp_path_factory, interpreted):
    """A 2-stage triton artifact of the demo Llama for generation, and what the compiling
    interpreter found when it loaded stage 1 alone."""
    folder = tmp_path_factory.mktemp("pipeline_triton")
    return interpreted(COMPILE, folder, SPEC, MAX_SEQ_LEN, MAX_BATCH, timeout=300)


@pytest.fixture(scope="module")
def graph():
    """The unpartitioned demo Llama decoder, captured as the artifact's source was."""
    from peakc.ir.capture import capture
    from peakc.models import load_source_for_task

    source = load_source_for_task("demo:llama", "generate", MAX_SEQ_LEN, MAX_BATCH)
    captured = capture(source.module, source.example_inputs, dynamic=source.dynamic)
    captured.info["generation"] = source.generation
    return captured


def test_triton_stages_equal_the_unpartitioned_model(triton_stages, graph, tmp_path):
    artifact = Path(triton_stages["artifact"])
    manifest = read_manifest(artifact)
    assert manifest["backend"] == "triton"
    assert {p["format"] for p in manifest["programs"].values()} == {"triton"}
    out, tokens = tmp_path / "out.safetensors", tmp_path / "tokens.json"
    argv = [sys.executable, "-m", "peakc.cli", "launch", str(artifact), "--nproc-per-node=2"]
    argv += [f"--output={out}", f"--tokens-output={tokens}", f"--max-new-tokens={NEW_TOKENS}"]
    argv += ["--timeout=60", *[f"--prompt-ids={p}" for p in PROMPTS]]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # forward: the example batch once per microbatch, through the schedule
    example = read_example_inputs(artifact, manifest)
    expected = graph.run(*example)[0]
    logits = load_file(str(out))["output_0"]
    microbatches = manifest["partition"]["microbatches"]
    assert torch.allclose(logits, torch.cat([expected] * microbatches), atol=1e-4)
    # greedy generation, each stage's cache on its own rank
    reference = Generator(lambda *a: graph.run(*a), graph.info["generation"])
    prompt_ids = [[int(x) for x in p.split()] for p in PROMPTS]
    want = reference.generate(prompt_ids, SamplingConfig(max_new_tokens=NEW_TOKENS)).tokens
    assert json.loads(tokens.read_text()) == want


def test_a_triton_stage_loads_without_the_other_stage(triton_stages):
    assert triton_stages["report"] == ["stage_0", "stage_1"]
    assert triton_stages["program"] == "TritonProgram"
    assert triton_stages["weights"] == triton_stages["file_weights"] > 0
    assert all("layers.0." not in name for name in triton_stages["names"])
    assert "stage 0's file stage_0.triton.json is missing" in triton_stages["missing"]


def test_cuda_graphs_are_refused_for_stages():
    """Decode steps go down the stages one program at a time: no stage replays a CUDA graph,
    and asking for one is an error naming the option (before any kernel is built)."""
    import peakc
    from peakc.errors import PeakcError
    from peakc.models import load_source

    source = load_source("demo:llama")
    with pytest.raises(PeakcError, match="option 'cuda_graph' does not apply to pipeline stages"):
        peakc.compile(source, pipeline=SPEC, backend="triton{cuda_graph=true}", parity=False)
