"""The triton backend's dense linears at decode-sized M (kernels/gemv.py) on CPU under
TRITON_INTERPRET=1: every config of the launcher against F.linear (M = 1, 3, 17, 64, odd K and
N, bias or none, fp32/fp16/bf16), the [K, N] form of mm/addmm, a K split summed by the last part
to arrive; the lowering choosing it (and declining what it does not cover), tuning storing a
Triton config for it, the cost model still pricing GEMMs.

TRITON_INTERPRET must be set before a kernel is decorated, so the work runs in one fresh
interpreter (a subprocess) that prints its findings as JSON; this process asserts on them.
"""

import json

import pytest

pytest.importorskip("triton")


CHECKS = r"""
import json, sys
from pathlib import Path
import torch
import peakc
from peakc.backends.triton import tuning
from peakc.backends.triton.kernels import gemv as G
from peakc.backends.triton.program import TritonProgram, device_key

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
tmp = Path(sys.argv[1])
gen = torch.Generator().manual_seed(0)
found = {"launcher": [], "forms": []}


def randn(*shape, dtype=F32):
    return torch.randn(*shape, generator=gen).to(dtype)


def error(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# every config at each M; dtypes and bias alternate over the cases (the interpreter is slow)
case = 0
for m in (1, 3, 17, 64):
    n = 37 if m < 64 else 13
    k = 67 + 2 * m
    for index, config in enumerate(G.GEMV_CONFIGS):
        dtype = (F32, F16, BF16)[case % 3]
        x, w = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype)
        bias = randn(n, dtype=dtype) if case % 2 else None
        out = G.gemv(x, w, bias, False, config=config)
        ref = x.float() @ w.float().t() + (0.0 if bias is None else bias.float())
        found["launcher"].append(dict(m=m, config=index, dtype=str(dtype), bias=bias is not None,
                                      err=error(out, ref), shape=list(out.shape),
                                      out_dtype=str(out.dtype), contiguous=out.is_contiguous()))
        case += 1

# the [K, N] form (mm, addmm), a 3-D x, a K split of 3 parts run twice (the arrival counters
# are left zeroed), and a Triton config refused beyond MAX_ROWS
split = {"kernel": "triton", "block_m": 4, "block_n": 16, "block_k": 32, "split_k": 3,
         "num_warps": 4}
for dtype in (F32, F16, BF16):
    x, w_kn, bias = randn(5, 101, dtype=dtype), randn(101, 29, dtype=dtype), randn(29, dtype=dtype)
    x3 = randn(2, 3, 101, dtype=dtype)
    w = w_kn.t().contiguous()
    ref_kn = (x.float() @ w_kn.float() + bias.float())
    ref3 = torch.nn.functional.linear(x3.float(), w.float(), bias.float())
    for tag, out, ref in (
        ("addmm", G.gemv(x, w_kn, bias, True, config=G.GEMV_CONFIGS[5]), ref_kn),
        ("mm", G.gemv(x, w_kn, None, True, config=G.GEMV_CONFIGS[1]), ref_kn - bias.float()),
        ("3-D x", G.gemv(x3, w, bias, False, config=G.GEMV_CONFIGS[4]), ref3),
        ("split", G.gemv(x, w, bias, False, config=split), ref_kn),
        ("split again", G.gemv(x, w, bias, False, config=split), ref_kn),
    ):
        found["forms"].append(dict(form=tag, dtype=str(dtype), err=error(out, ref),
                                   shape=list(out.shape), want=list(ref.shape)))
try:
    G.gemv(randn(65, 8), randn(4, 8), None, False, config=G.GEMV_CONFIGS[1])
    found["too_many_rows"] = "accepted"
except ValueError as exc:
    found["too_many_rows"] = str(exc)


# the lowering: small-M linears, mm and addmm through the launcher; a 100-row one, an int
# matmul stay cuBLAS steps with the reason; the cost model prices the GEMMs as before
class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(24, 40)
        self.b = torch.nn.Linear(40, 24, bias=False)
        self.w = torch.nn.Parameter(torch.randn(24, 16))
        self.c = torch.nn.Parameter(torch.randn(16))

    def forward(self, x, big, ints):
        h = self.b(torch.relu(self.a(x)))
        y = torch.addmm(self.c, h.view(-1, 24), self.w) + torch.mm(h.view(-1, 24), self.w)
        return y, self.a(big), torch.mm(ints, ints)


model = Mixed()
inputs = (torch.randn(1, 3, 24), torch.randn(100, 24), torch.randint(0, 5, (3, 3)))
compiled = peakc.compile(model, inputs, backend="triton", pipeline="none")
folder = compiled.save(tmp / "mixed")
spec = json.loads((folder / "forward.triton.json").read_text())
report = compiled.contents.report["triton"]["programs"]["forward"]
artifact = peakc.load(folder)
with torch.no_grad():
    want, got = model(*inputs), artifact(*inputs)
found["lowering"] = {
    "steps": [(s["kind"], s["op"], s.get("reason")) for s in spec["steps"]
              if s["kind"] == "gemm" or s.get("op") == "gemv"],
    "kernels": report["kernels"],
    "priced": sorted({(l["op"], l["kind"]) for l in report["cost"]["launches"]
                      if "mm" in l["op"] or "linear" in l["op"]}),
    "errors": [float((g - w).abs().max()) for g, w in zip(got, want)],
}

# tuning keeps a Triton config where it "measures" faster (here: the one with the most
# columns per program), under the step's shape; a load on the same key runs it
weights = [artifact.weights[n] for n in artifact.manifest["programs"]["forward"]["weights"]]
tuning.time_config = lambda fn, args, config: -config.get("block_n", 0)
configs = tuning.tune_program(TritonProgram(spec, "cpu"), weights, [inputs])
spec["tuning"] = {"key": device_key(), "configs": configs}
tuned = TritonProgram(spec, "cpu")
with torch.no_grad():
    again = tuned(*weights, *inputs)
found["tuning"] = {
    "chosen": sorted({json.dumps(c, sort_keys=True) for per in configs.values()
                      for c in per.values()}),
    "tuned_steps": sum(bool(s.tuned) for s in tuned.steps if s.entry.get("op") == "gemv"),
    "notes": tuned.notes,
    "errors": [float((g - w).abs().max() / w.abs().max()) for g, w in zip(again[:2], want[:2])],
}
print("RESULT " + json.dumps(found))
"""


@pytest.fixture(scope="module")
def found(tmp_path_factory, interpreted):
    tmp = tmp_path_factory.mktemp("gemv")
    return interpreted(CHECKS, tmp, timeout=300, env={"PEAKC_TRITON_CACHE": str(tmp / "cache")})


TOL = {"torch.float32": 1e-5, "torch.float16": 2e-3, "torch.bfloat16": 1e-2}


def test_every_config_matches_linear(found):
    cases = found["launcher"]
    configs = {c["config"] for c in cases}
    assert configs == set(range(7)) and {c["m"] for c in cases} == {1, 3, 17, 64}
    assert {c["dtype"] for c in cases} == set(TOL) and {c["bias"] for c in cases} == {True, False}
    for c in cases:
        assert c["err"] < TOL[c["dtype"]], c
        assert c["out_dtype"] == c["dtype"] and c["contiguous"], c
        assert c["shape"] == [c["m"], 37 if c["m"] < 64 else 13], c


def test_mm_form_3d_input_and_split_k(found):
    forms = found["forms"]
    assert len(forms) == 15
    for f in forms:
        assert f["err"] < TOL[f["dtype"]] and f["shape"] == f["want"], f
    assert "65 rows exceed" in found["too_many_rows"]


def test_lowering_takes_small_gemms_and_keeps_their_gemm_price(found):
    lowering = found["lowering"]
    gemv_steps = [s for s in lowering["steps"] if s[1] == "gemv"]
    kept = {s[1]: s[2] for s in lowering["steps"] if s[0] == "gemm"}
    assert len(gemv_steps) == 4 and all(s[0] == "kernel" for s in gemv_steps)  # a, b, addmm, mm
    assert kept["aten.linear.default"] == "x has 100 rows (> 64): cuBLAS"
    assert kept["aten.mm.default"] == "x is int64, not fp16/bf16/fp32"
    assert lowering["kernels"].count("triton/gemv") == 4
    assert ["aten.linear", "gemm"] in lowering["priced"]
    assert ["aten.addmm", "gemm"] in lowering["priced"]
    assert max(lowering["errors"]) < 1e-4


def test_tuning_stores_a_triton_config_and_runs_it(found):
    tuning = found["tuning"]
    assert tuning["chosen"] == [json.dumps(
        {"block_k": 128, "block_m": 1, "block_n": 64, "kernel": "triton", "num_warps": 8,
         "split_k": 0}, sort_keys=True)]  # fmt: skip
    assert tuning["tuned_steps"] == 4 and tuning["notes"] == []
    assert max(tuning["errors"]) < 1e-5
