"""Offloaded int4 linears in the Triton kernels' layout: demo:llama in bf16, its layers quantized
to 4 bits (one to 3 bits, which the kernels decline), run by the offload executor with weights
on every tier; outputs and greedy tokens against the un-offloaded quantized model, the kernels
counted, the declined layer named with its reason, the plan's bytes the repacked ones.

The kernels run under TRITON_INTERPRET=1, which must be set before a kernel is decorated: that
part runs in a fresh interpreter (a subprocess) printing its findings as JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
DECLINED = "model.layers.1.mlp.down_proj"

SETUP = """
import torch
from peakc.ir.capture import capture
from peakc.models import load_source_for_task
from peakc.passes.base import PassContext
from peakc.passes.pipeline import Pipeline

source = load_source_for_task(
    "demo:llama", task="generate", max_seq_len=32, max_batch=2, dtype="bfloat16"
)
decoder = capture(source.module, source.example_inputs, name="demo", dynamic=source.dynamic)
decoder.info["generation"] = dict(source.generation)
spec = (
    "quantize{method=rtn,bits=3,group_size=16,targets=layers.1.mlp.down_proj},"
    "quantize{method=rtn,bits=4,group_size=16}"
)
decoder, _ = Pipeline.parse(spec).run(decoder, PassContext(device="cpu"))
"""

CHECKS = (
    SETUP
    + """
import json, sys
from peakc.runtime.generate import Generator, SamplingConfig
from peakc.runtime.offload import (
    LINEAR_KEY, OffloadExecutor, OffloadStep, SimulatedTransfers, executor_graph, kv_layer,
)

TIERS = ("gpu", "cpu", "disk")
graph = executor_graph(decoder)
weights = [n for n in graph.weights() if kv_layer(n) is None]
plan = {
    "format": 1, "target": "cpu", "gpu_memory": 1e12, "cpu_memory": 1e12,
    "disk_path": sys.argv[1],
    "weights": {
        n: {"tier": TIERS[i % 3], "bytes": graph.get_weight(n).numel()
            * graph.get_weight(n).element_size()}
        for i, n in enumerate(weights)
    },
    "kv_cache": {"0": {"tier": "cpu", "bytes": 0}, "1": {"tier": "gpu", "bytes": 0}},
    "linear_wq": graph.info[LINEAR_KEY],
}
executor = OffloadExecutor(graph, plan, SimulatedTransfers())
layout = decoder.info["generation"]
prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]

def greedy(step):
    return Generator(step, layout, "cpu").generate(prompts, SamplingConfig(max_new_tokens=4))

step = OffloadStep(executor, layout)
ours = greedy(step).tokens
after_generation = executor.linear_wq_report()["kernel_launches"]
expected = greedy(lambda *inputs: decoder.run(*inputs)).tokens

step.begin(2)  # one forward: the prompt's logits, zero caches
ids = torch.tensor([[1, 2, 3, 4], [7, 8, 9, 10]])
positions = torch.arange(4).expand(2, 4).contiguous()
got = step(ids, positions)
caches = [torch.zeros_like(t) for t in decoder.example_inputs[2:]]
want = decoder.run(ids, positions, *caches)[0]
repacked_tiers = {plan["weights"][n]["tier"] for n in weights if ".triton_" in n}
print(json.dumps({
    "tokens_equal": ours == expected,
    "logits_error": float((got.float() - want.float()).abs().max()),
    "logits_scale": float(want.float().abs().max()),
    "report": executor.linear_wq_report(),
    "launches_in_generation": after_generation,
    "repacked_tiers": sorted(repacked_tiers),
    "peakc_layout_left": sorted(n for n in weights if n.endswith(".qweight")),
}))
executor.close()
"""
)


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    disk = tmp_path_factory.mktemp("disk")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", CHECKS, str(disk)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_int4_offloaded_on_every_tier_runs_the_kernels_and_matches(found):
    assert found["repacked_tiers"] == ["cpu", "disk", "gpu"]
    assert found["tokens_equal"]
    assert found["logits_error"] <= 0.02 * found["logits_scale"]
    layers = found["report"]["layers"]
    assert sum(path == "triton" for path in layers.values()) == len(layers) - 1
    assert found["launches_in_generation"] > 0


def test_a_declined_layout_keeps_the_reference_and_says_why(found):
    layers = found["report"]["layers"]
    assert "3-bit weights" in layers[DECLINED]
    assert found["peakc_layout_left"] == [f"{DECLINED}.qweight"]
