"""The QMoE benchmark's end-to-end part on both backends: the --smoke run (a subprocess: the
Triton interpreter is chosen before kernels are decorated) compresses a tiny random Mixtral
once and decodes it from an eager and a triton artifact, one record per backend; the backend
list, the results file's per-backend replacement and the table rows of unfinished runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("transformers")
bench = pytest.importorskip("qmoe")


@pytest.mark.slow
def test_smoke_e2e_decodes_from_an_eager_and_a_triton_artifact(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "qmoe.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "qmoe.py"), "--smoke", "--part", "e2e",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["backend"]: r for r in json.loads(out.read_text()) if r["what"] == "e2e"}
    assert list(records) == ["eager", "triton"]
    eager, triton = records["eager"], records["triton"]
    for r in (eager, triton):
        assert "error" not in r and r["phase"] == "done", r
        assert r["decode_ms_per_token"] > 0 and r["prefill_ms"] > 0 and r["artifact_bytes"] > 0
        assert r["kernel_rel_err"] < 2e-2, r  # bf16 activations against the float reference
        assert 0 <= r["tokens_equal_dense"] <= r["new_tokens"]
    # compressed once: the pass's stats are one run's, shared by both records
    for key in ("bits_per_param", "compress_s", "compile_s", "zero_fraction", "pipeline"):
        assert eager[key] == triton[key]
    assert triton["backend_spec"] == "triton"  # the interpreter: no CUDA graphs, no tuning
    assert triton["experts_lowering"] == "triton/grouped_mm_compressed"
    assert triton["stored_layout_equal"] is True
    assert "stored sliced ELL" in triton["kernel_check"]
    assert "coded stream" in eager["kernel_check"]
    assert triton["parity_rel_err"] < 5e-2
    table = bench.markdown_table(list(records.values()))
    assert "| eager |" in table and "| triton |" in table


def test_backend_list_defaults_orders_and_refuses_unknown_names():
    interpreted = bench.e2e_backend_specs("triton,eager", cuda=False, interpreted=True)
    assert interpreted == {"triton": "triton", "eager": "eager"}
    cuda = bench.e2e_backend_specs("eager,triton", cuda=True)
    assert cuda == {"eager": "eager", "triton": bench.TRITON_CUDA_SPEC}
    assert "cuda_graph=true" in cuda["triton"] and "tune=true" in cuda["triton"]
    # on the CPU outside the interpreter: eager alone by default, triton refused by name
    assert list(bench.e2e_backend_specs(None, cuda=False)) == ["eager"]
    with pytest.raises(SystemExit, match="triton needs a CUDA device"):
        bench.e2e_backend_specs("eager,triton", cuda=False)
    for bad in ("ort", "eager,eager", ","):
        with pytest.raises(SystemExit, match="--e2e-backend"):
            bench.e2e_backend_specs(bad, cuda=False)


def test_a_run_replaces_only_its_backends_records(tmp_path):
    path = tmp_path / "qmoe.json"
    old_eager = {"what": "e2e", "device": "gpu", "phase": "compile", "error": "x"}  # no key
    old_gemv = {"what": "gemv", "device": "gpu", "shape": [1, 2, 3]}
    path.write_text(json.dumps([old_eager, old_gemv]))
    results = bench.ResultsFile(path)
    results.emit({"what": "e2e", "device": "gpu", "backend": "triton", "phase": "build"})
    assert old_eager in results.records()  # a triton run keeps the earlier eager record
    results.emit({"what": "e2e", "device": "gpu", "backend": "eager", "phase": "build"})
    kept = json.loads(path.read_text())
    assert old_eager not in kept and old_gemv in kept
    assert [r.get("backend") for r in kept if r["what"] == "e2e"] == ["triton", "eager"]


def test_table_rows_of_a_failed_backend_and_of_a_run_stopped_before_dense():
    common = dict(what="e2e", model="m", device="gpu", date="d")
    failed = dict(common, backend="triton", phase="decode", error="TimeoutError: spent")
    decoded = dict(
        common, backend="eager", bits_per_param=0.9, code_bits_per_param=0.8, zero_fraction=0.9,
        artifact_bytes=2e6, dense_bf16_bytes=8e6, decode_ms_per_token=1.5, prefill_ms=9.0,
        kernel_rel_err=1e-3, compile_s=60, lower_s=3,
    )  # fmt: skip
    rows = bench.markdown_table([failed, decoded]).splitlines()[2:]
    assert "| triton | TimeoutError: spent |" in rows[0]
    assert "| 1.50 (-) | 9.0 (-) | 1.0e-03 | 60 (3) |" in rows[1]
