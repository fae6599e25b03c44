"""triton backend on CPU under TRITON_INTERPRET=1: generated fusion groups against their ATen
subgraphs, demo:llama against eager (forward and greedy generation), the artifact's kernel
descriptions (regeneration, tampering, tuning keys, source cache), the report's fallbacks.

TRITON_INTERPRET must be set before a kernel is decorated, so the work runs in one fresh
interpreter (a subprocess) that prints its findings as JSON; this process asserts on them.
The no-GPU error runs here, without the interpreter.
"""

import json

import pytest
import torch

from peakc.cli import main

pytest.importorskip("triton")


CHECKS = r"""
import json, shutil, sys, warnings
from pathlib import Path
import torch
import peakc
from peakc.backends.triton import codegen
from peakc.backends.triton.codegen import GroupKernel
from peakc.backends.triton.fusion import plan_fusion
from peakc.backends.triton.program import TritonProgram
from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.ir.ops import define_op
from peakc.models import load_source_for_task
from peakc.models.demo import demo_llama
from peakc.runtime.generate import Generator, SamplingConfig

tmp = Path(sys.argv[1])
found = {}


class Chains(torch.nn.Module):
    # RMSNorm and softmax written out, a gated MLP, a tanh GELU, a permuted input
    def __init__(self, width):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(width))

    def forward(self, x, y, z):
        r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        h = (x.float() * r).to(x.dtype) * self.w
        s = h.float() * 0.5
        e = torch.exp(s - s.amax(-1, keepdim=True))
        p = e / e.sum(-1, keepdim=True)
        g = torch.nn.functional.silu(y) * (1.0 - y)
        t = torch.nn.functional.gelu(z.transpose(1, 2), approximate="tanh") * 2.0
        return p, g, t


errors, kinds = {}, set()
for case, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
    gen = torch.Generator().manual_seed(case)
    width = (24, 37, 64)[case]
    rows = (3, 5, 2)[case]
    model = Chains(width).to(dtype)
    x = torch.randn(2, rows, width, generator=gen).to(dtype)
    y = torch.randn(rows, 1, 7 + case, generator=gen).to(dtype)
    z = torch.randn(2, 5 + case, 3, generator=gen).to(dtype)
    graph = capture(model, (x, y, z))
    values = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, node):
            values[node] = super().run_node(node)
            return values[node]

    Record(graph.gm).run(x, y, z)
    worst = 0.0
    for group in plan_fusion(graph.graph).groups:
        kinds.add("row" if group.row_wise else "pointwise")
        outs = GroupKernel(group.description())(*[values[n] for n in group.inputs()])
        for got, node in zip(outs, group.outputs()):
            want = values[node]
            assert got.shape == want.shape and got.dtype == want.dtype, node
            assert got.stride() == want.stride(), (node, got.stride(), want.stride())
            scale = want.float().abs().max().clamp_min(1e-6)
            worst = max(worst, float((got.float() - want.float()).abs().max() / scale))
    errors[str(dtype)] = worst
found["groups"] = {"errors": errors, "kinds": sorted(kinds)}

# demo:llama without the fuse pass (so ATen chains remain for the planner), against eager
model, inputs = demo_llama()
compiled = peakc.compile(model, inputs, backend="triton", pipeline="cleanup")
folder = compiled.save(tmp / "forward")
report = compiled.contents.report["triton"]["programs"]["forward"]
codegen._LOADED.clear()
shutil.rmtree(codegen.cache_dir(), ignore_errors=True)
artifact = peakc.load(folder)
with torch.no_grad():
    want = model(*inputs)
    got = artifact(*inputs)[0]
cold = artifact.program().load_report
codegen._LOADED.clear()
warm = peakc.load(folder).program().load_report
found["forward"] = {
    "error": float((got - want).abs().max() / want.abs().max()),
    "groups": report["fusion_groups"],
    "parity": report["parity_rel_error"],
    "cold_hits": cold["source_cache_hits"],
    "warm_hits": warm["source_cache_hits"],
    "sources": warm["generated_sources"],
    "load_seconds": [cold["seconds"], warm["seconds"]],
    "notes": warm["notes"],
}

# tuning's storage and lookup (its timing needs CUDA: here the smallest block is "fastest")
from peakc.backends.triton import tuning
from peakc.backends.triton.program import device_key

spec = json.loads((folder / "forward.triton.json").read_text())
tuning.time_config = lambda fn, args, config: config.get("BLOCK", 0)  # gemv: its default
program = TritonProgram(spec, "cpu")
weights = [artifact.weights[name] for name in artifact.manifest["programs"]["forward"]["weights"]]
configs = tuning.tune_program(program, weights, [inputs])
spec["tuning"] = {"key": device_key(), "configs": configs}
tuned = TritonProgram(spec, "cpu")
found["tuning"] = {
    "blocks": sorted({c["BLOCK"] for per in configs.values() for c in per.values()
                      if "BLOCK" in c}),
    "notes": tuned.notes,
    "steps_tuned": sum(bool(step.tuned) for step in tuned.steps),
    "error": float((tuned(*weights, *inputs)[0] - want).abs().max() / want.abs().max()),
}

# tampering: a changed byte is refused by the checksums
tampered = tmp / "tampered"
shutil.copytree(folder, tampered)
program_file = tampered / "forward.triton.json"
program_file.write_text(program_file.read_text().replace("tl.rsqrt", "tl.sqrt", 1))
try:
    peakc.load(tampered)
    found["tampered"] = "loaded"
except PeakcError as exc:
    found["tampered"] = str(exc)

# a description whose stored source differs (another peakc): reported, peakc's source runs
spec = json.loads((folder / "forward.triton.json").read_text())
spec["kernels"][0]["source"] += "# edited\n"
spec["tuning"] = {"key": {"device": "another gpu"}, "configs": {"0": {"x": {"BLOCK": 64}}}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    notes = TritonProgram(spec, "cpu").notes
found["regenerated_notes"] = notes
found["warned"] = len(caught)

# generation (default pipeline: peakc ops without triton kernels run their references)
source = load_source_for_task("demo:llama", "generate", 48, 3)
compiled = peakc.compile(source, backend="triton")
artifact = peakc.load(compiled.save(tmp / "generate"))
prompts = [[5, 17, 99, 3, 250, 7], [42]]
config = SamplingConfig(max_new_tokens=6)
tokens = Generator.from_artifact(artifact, "cpu").generate(prompts, config).tokens
layout = artifact.manifest["generation"]
graph = compiled.graph
reference = Generator(lambda *a: graph.run(*a), layout, "cpu").generate(prompts, config).tokens
found["generate"] = {"tokens": tokens, "reference": reference}
compiled_programs = compiled.contents.report["triton"]["programs"]
found["report"] = {
    "ops": compiled.contents.report["ops"],
    "decoder": compiled.contents.report["triton"]["programs"]["decoder"]["cost"],
    "manifest_programs": {
        k: [v["format"], v["file"], v["runtime"]] for k, v in artifact.manifest["programs"].items()
    },
}

# the CLI runs and benches triton artifacts as it does the others
from peakc.cli import main

bench = ["--batch", "1", "--prompt-len", "3", "--gen-len", "2", "--repeats", "1", "--json"]
found["cli"] = [main(["run", str(folder)]), main(["bench", str(tmp / "generate"), *bench])]

# an op without a triton kernel runs its reference; the report lists it with its time share
def _shifted(x: torch.Tensor) -> torch.Tensor:
    "x + 1, an op no backend has a kernel for."
    return x + 1


define_op("test_triton_shifted", _shifted, lambda x: torch.empty_like(x))


class Odd(torch.nn.Module):
    def forward(self, x):
        return (torch.ops.peakc.test_triton_shifted(x).relu() * 2,)


x = torch.randn(3, 5)
compiled = peakc.compile(Odd(), (x,), backend="triton", pipeline="none")
odd = peakc.load(compiled.save(tmp / "odd"))
found["fallback"] = {
    "ops": compiled.contents.report["ops"],
    "cost": compiled.contents.report["triton"]["programs"]["forward"]["cost"],
    "error": float((odd(x)[0] - ((x + 1).relu() * 2)).abs().max()),
}

# one pipeline run lowered by two backends: an artifact each, both from the same graph
import contextlib, io

pair = peakc.compile(Odd(), (x,), backend="triton,eager", pipeline="none")
written = pair.save(tmp / "pair")
found["pair"] = {
    "written": {k: str(v.relative_to(tmp)) for k, v in written.items()},
    "shared": [pair[k].contents.report["one_pipeline"] for k in written],
    "fingerprints": [pair[k].contents.report["fingerprint"] for k in written],
    "manifests": [peakc.load(v).manifest["one_pipeline"] for v in written.values()],
    "errors": [float((peakc.load(v)(x)[0] - ((x + 1).relu() * 2)).abs().max())
               for v in written.values()],
}

# peakc estimate prices the stored program (no source model) on any --target
estimates = {}
for target in ("cpu", "h100-sxm"):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["estimate", str(tmp / "generate"), "--target", target, "--json"])
    estimates[target] = json.loads(out.getvalue())
found["estimate"] = {
    "estimates": estimates,
    "priced": {k: v["cost"]["predicted_ms"]
               for k, v in compiled_programs.items()},
}

# ... and at other shapes: launches interpolated from the stored sample points (exact where
# no point was sampled), shapes the artifact cannot run refused, CUDA-graph batches noted
from peakc.backends.base import programs_to_export
from peakc.backends.triton.cost import launches_at, plan_launches, sample_launches
from peakc.backends.triton.lower import apply_rewrites, lower_program
from peakc.cost_model.hardware import resolve_profile
from peakc.cost_model.predict import CostModel

model_cost, worst = CostModel(resolve_profile("cpu")), 0.0
for name, program in programs_to_export(apply_rewrites(graph)).items():
    plan = lower_program(program).plan
    phase = "prefill" if name == "decoder" else "decode"
    sampled = sample_launches(program, plan, model_cost, phase)
    for batch, length in ((3, 20), (1, 47)):
        shaped, est = model_cost.decoder_estimate(
            program, phase, batch, length if phase == "prefill" else 1, length
        )
        for got, want in zip(launches_at(sampled, batch, length),
                             plan_launches(plan, est, shaped.graph), strict=True):
            for key in ("flops", "bytes"):
                worst = max(worst, abs(got[key] - want[key]) / max(want[key], 1.0))


def estimate(folder, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["estimate", str(folder), "--target", "cpu", "--json", *argv])
    return json.loads(out.getvalue()) if code == 0 else err.getvalue().strip()


graphs = tmp / "graphs"
shutil.copytree(tmp / "generate", graphs)
manifest = json.loads((graphs / "manifest.json").read_text())
manifest["programs"]["decoder"]["runtime"]["decode_batches"] = [1]
(graphs / "manifest.json").write_text(json.dumps(manifest))
changed_report = tmp / "changed_report"  # the launches priced come from it: checked first
shutil.copytree(tmp / "generate", changed_report)
report_path = changed_report / "report.json"
report_path.chmod(0o644)
report_path.write_text(report_path.read_text().replace('"flops"', '"flops" ', 1))
found["reshaped"] = {
    "changed_report": estimate(changed_report),
    "worst": worst,
    "asked": estimate(tmp / "generate", "--batch", "3", "--seq", "10", "--context", "20"),
    "example_batch": estimate(tmp / "generate", "--batch", "2"),
    "short": estimate(tmp / "generate", "--batch", "2", "--context", "12"),
    "errors": [estimate(tmp / "generate", *a)
               for a in (["--batch", "4"], ["--context", "49"], ["--seq", "0"])],
    "no_graph": estimate(graphs, "--batch", "2")["notes"],
    "forward": estimate(tmp / "odd", "--batch", "2"),
}

# a GPU too old for a kernel, or a triton without a feature it uses: one line naming both, at
# compile (the program is built on the device) and at load
import triton.language as tl
from peakc.backends.triton import device as triton_device

x16 = x.to(torch.bfloat16)
peakc.compile(Odd(), (x16,), backend="triton", pipeline="none").save(tmp / "odd16")
features, capability = {}, triton_device.gpu_capability
triton_device.gpu_capability = lambda device: ("Tesla V100-SXM2-16GB", (7, 0))
for case, build in (
    ("compile", lambda: peakc.compile(Odd(), (x16,), backend="triton", pipeline="none")),
    ("load", lambda: peakc.load(tmp / "odd16").program()),
    ("float32", lambda: peakc.load(tmp / "odd").program()),
):
    try:
        build()
        features[case] = "built"
    except PeakcError as exc:
        features[case] = str(exc)
triton_device.gpu_capability = capability
maximum = tl.maximum
del tl.maximum
try:
    peakc.load(tmp / "odd").program()
except PeakcError as exc:
    features["triton"] = str(exc)
tl.maximum = maximum
feature = triton_device.FEATURES["tl.dot(input_precision=)"]
triton_device.FEATURES["tl.dot(input_precision=)"] = triton_device.Feature(
    feature.description, available=lambda: False
)
try:
    peakc.load(tmp / "generate").program("decode_step")
except PeakcError as exc:
    features["dot"] = str(exc)
triton_device.FEATURES["tl.dot(input_precision=)"] = feature
found["features"] = features

# the CUDA-graph step refuses a decode batch above its captured batches (checked before CUDA)
from peakc.backends.triton.cuda_graphs import GraphedDecoder

decoder = artifact.program("decoder")
decoder.runtime = {"decode_program": "decode_step", "decode_batches": [1]}
step = GraphedDecoder(decoder, layout)
try:
    step.begin(2)
    found["big_batch"] = "accepted"
except PeakcError as exc:
    found["big_batch"] = str(exc)
print("RESULT " + json.dumps(found))
"""


@pytest.fixture(scope="module")
def found(tmp_path_factory, interpreted):
    tmp = tmp_path_factory.mktemp("triton")
    return interpreted(CHECKS, tmp, env={"PEAKC_TRITON_CACHE": str(tmp / "cache")})


def test_fusion_groups_equal_their_aten_subgraphs(found):
    groups = found["groups"]
    assert groups["kinds"] == ["pointwise", "row"]
    assert groups["errors"]["torch.float32"] < 1e-5
    assert groups["errors"]["torch.float16"] < 5e-3
    assert groups["errors"]["torch.bfloat16"] < 3e-2


def test_llama_forward_matches_eager_and_loads_warm(found):
    forward = found["forward"]
    assert forward["error"] < 1e-5 and forward["parity"] < 1e-5
    assert forward["groups"] >= 4  # the written-out RMSNorms and SwiGLU of demo:llama
    assert forward["cold_hits"] == 0 and forward["warm_hits"] == forward["sources"] > 0
    assert forward["notes"] == []


def test_tuned_configs_are_stored_and_used_on_the_same_key(found):
    tuning = found["tuning"]
    assert tuning["blocks"] == [512]  # pointwise groups offer 1024, 512, 2048
    assert tuning["notes"] == [] and tuning["error"] < 1e-5
    assert tuning["steps_tuned"] > 0


def test_tampered_program_is_refused(found):
    assert found["tampered"] != "loaded"
    assert "forward.triton.json" in found["tampered"]


def test_regenerated_source_and_tuning_key_are_reported(found):
    notes = found["regenerated_notes"]
    assert any("generates a different source" in n for n in notes)
    assert any("default configs" in n for n in notes)
    assert found["warned"] == len(notes)


def test_op_without_kernel_is_a_listed_fallback(found):
    fallback = found["fallback"]
    assert fallback["ops"] == {"test_triton_shifted": "reference"}
    (entry,) = fallback["cost"]["fallbacks"]
    assert entry["why"] == "test_triton_shifted: no triton kernel"
    assert 0 < entry["share_of_time"] == fallback["cost"]["fallback_share"] < 1
    assert fallback["error"] < 1e-6


def test_generation_matches_the_graph_and_fallbacks_are_listed(found):
    assert found["generate"]["tokens"] == found["generate"]["reference"]
    programs = found["report"]["manifest_programs"]
    assert programs["decoder"][:2] == ["triton", "decoder.triton.json"]
    assert programs["decoder"][2]["decode_program"] == "decode_step"
    assert programs["decode_step"][0] == "triton"
    ops = found["report"]["ops"]
    cost = found["report"]["decoder"]
    listed = {f["node"] for f in cost["fallbacks"]}
    for op, label in ops.items():  # each op on its reference is a listed fallback
        if label.startswith("reference") or " reference (" in label:
            assert any(op in f["why"] for f in cost["fallbacks"]), op
    assert len(listed) == len(cost["fallbacks"])
    assert 0 <= cost["fallback_share"] <= 1 and cost["predicted_ms"] > 0


def test_cli_runs_and_benches_triton_artifacts(found):
    assert found["cli"] == [0, 0]


def test_decode_batch_above_the_captured_graphs_is_refused(found):
    assert "decode batch 2 is larger than the captured CUDA graphs'" in found["big_batch"]


def test_one_pipeline_lowers_to_triton_and_eager(found):
    pair = found["pair"]
    assert pair["written"] == {"triton": "pair/triton", "eager": "pair/eager"}
    (fingerprint,) = set(pair["fingerprints"])
    shared = {"backends": ["triton", "eager"], "fingerprint": fingerprint}
    assert pair["shared"] == pair["manifests"] == [shared, shared]
    assert max(pair["errors"]) < 1e-6  # each artifact loads alone and computes the model


def test_estimate_prices_a_triton_artifact_per_phase_and_target(found):
    estimate = found["estimate"]
    cpu, h100 = estimate["estimates"]["cpu"], estimate["estimates"]["h100-sxm"]
    assert set(cpu["phases"]) == {"prefill", "decode"} and cpu["compiled_for"] == "cpu"
    # on the compile's own target, the stored launches price to the report's prediction
    assert cpu["phases"]["prefill"]["predicted_ms"] == estimate["priced"]["decoder"]
    assert cpu["phases"]["decode"]["predicted_ms"] == estimate["priced"]["decode_step"]
    assert cpu["phases"]["decode"]["shape"] == "batch 2 x 1 token, cache of 48 slots"
    for phase in ("prefill", "decode"):  # another target: the same program, repriced
        assert 0 < h100["phases"][phase]["predicted_ms"] != cpu["phases"][phase]["predicted_ms"]
        assert h100["phases"][phase]["kernels"] == cpu["phases"][phase]["kernels"] > 0


def test_estimate_reprices_a_triton_artifact_at_other_shapes(found):
    reshaped, priced = found["reshaped"], found["estimate"]["priced"]
    assert reshaped["worst"] < 1e-9  # interpolation is exact where no point was sampled
    asked = reshaped["asked"]["phases"]
    assert asked["prefill"]["shape"] == "batch 3 x 10 tokens"
    assert asked["decode"]["shape"] == "batch 3 x 1 token, context 20 of 48 slots"
    assert reshaped["asked"]["notes"] == []
    # at the example batch and the whole cache, the compiled shape: the stored price again
    same = reshaped["example_batch"]["phases"]
    assert same["prefill"]["predicted_ms"] == pytest.approx(priced["decoder"], rel=1e-6)
    assert same["decode"]["predicted_ms"] == pytest.approx(priced["decode_step"], rel=1e-6)
    short = reshaped["short"]["phases"]["decode"]["predicted_ms"]
    assert 0 < short < same["decode"]["predicted_ms"]  # fewer cache slots read
    assert "report.json was changed (checksum mismatch)" in reshaped["changed_report"]
    big, long, zero = reshaped["errors"]
    assert "batch 4 exceeds its max_batch 3" in big
    assert "--context 49 exceeds its KV cache of 48 slots" in long
    assert "--seq must be positive" in zero
    assert all(len(e.splitlines()) == 1 for e in reshaped["errors"])
    (note,) = reshaped["no_graph"]
    assert "batch 2 is above the captured CUDA graphs (decode_batches [1])" in note
    assert "is not a generation decoder" in reshaped["forward"]


def test_an_old_gpu_or_triton_is_one_line_naming_kernel_and_feature(found):
    features = found["features"]
    for case in ("compile", "load"):
        message = features[case]
        assert len(message.splitlines()) == 1
        assert message.startswith("kernel 0 (triton/group:2 ops) needs bf16 (")
        assert "compute capability 8.0, sm80); Tesla V100-SXM2-16GB has 7.0" in message
    assert features["float32"] == "built"  # float32 kernels run on that GPU
    assert "needs tl.maximum, which triton" in features["triton"]
    assert "(triton/group:2 ops)" in features["triton"]
    dot = features["dot"]
    assert "(triton/attention_cache) needs tl.dot(input_precision=)" in dot


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_no_gpu_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["compile", "demo:mlp", "-o", str(tmp_path / "mlp"), "--backend", "triton"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs a CUDA GPU" in err and "--backend eager or ort" in err


# --- in this process: planning and the program format (no kernel runs) ----------------------


class RowChain(torch.nn.Module):
    def forward(self, x):
        a = x.exp()
        b = a.sum()  # not a keepdim last-dim reduction: stays an ATen op, read after a
        return a * b, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * x


def _plan(bytes_of=None):
    from peakc.backends.triton.fusion import plan_fusion
    from peakc.ir.capture import capture

    graph = capture(RowChain(), (torch.randn(3, 16),))
    return graph, plan_fusion(graph.graph, bytes_of)


def test_planner_groups_chains_without_cycles():
    from peakc.backends.triton.codegen import group_source

    _, plan = _plan()
    # exp * sum stays apart (the sum, read by the mul, is computed after exp, so a group holding
    # both would wait on itself); the norm chain is one row-wise group
    (norm,) = plan.groups
    ops = [str(n.target) for n in norm.nodes]
    assert ops == ["aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.add.Tensor",
                   "aten.rsqrt.default", "aten.mul.Tensor"]  # fmt: skip
    assert norm.row_wise and norm.space == ("3", "16")
    description = norm.description()
    assert json.loads(json.dumps(description)) == description
    assert group_source(description) == group_source(json.loads(json.dumps(description)))


def test_planner_keeps_only_groups_that_save_memory_traffic():
    _, plan = _plan(bytes_of=lambda node: 0.0)
    assert plan.groups == []
    assert plan.not_fused == {"moves no less memory than its ops one by one": 5}


def test_program_names_only_aten_and_peakc_ops():
    from peakc.backends.triton.program import aten_op, decode_arg
    from peakc.errors import PeakcError

    assert aten_op("aten.add.Tensor") is torch.ops.aten.add.Tensor
    for name in ("os.system.default", "builtins.eval", "operator.call", "aten.add"):
        with pytest.raises(PeakcError, match="triton program"):
            aten_op(name)
    with pytest.raises(PeakcError, match="unknown argument"):
        decode_arg({"dtype": "Tensor"}, torch.device("cpu"))
