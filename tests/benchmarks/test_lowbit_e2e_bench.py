"""The low-bit end-to-end benchmark (benchmarks/lowbit_e2e.py): its --smoke run (a subprocess:
the interpreter is chosen before any kernel is defined) compiles a tiny bf16 Llama as bf16 and
as SparseGPT 2:4 + GPTQ int4, decodes both from their loaded triton artifacts, and merges its
records into the kernel table's JSON without touching the kernel rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("triton")
e2e = pytest.importorskip("lowbit_e2e")
kernels_bench = pytest.importorskip("lowbit_kernels")

KEYS = {"date", "device", "kernel", "model", "batch", "decode_ms", "floor_ms"}


def test_smoke_decodes_compressed_artifacts_and_merges_its_records(tmp_path):
    out = tmp_path / "lowbit_kernels.json"
    table_row = {"kernel": "peakc-int4", "K": "layer", "N": "layer", "M": 1, "ms": 0.1}
    device = "cpu (Triton interpreter)"
    replaced = {"kernel": "peakc-bf16", "model": "tiny", "device": device, "batch": 1}
    elsewhere = dict(replaced, device="NVIDIA H200")
    out.write_text(json.dumps([table_row, replaced, elsewhere]))
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lowbit_e2e.py"), "--smoke",
         "--variants", "bf16,2:4-int4", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(out.read_text())
    assert table_row in records and elsewhere in records and replaced not in records
    new = [r for r in records if r.get("device") == device]
    assert {(r["kernel"], r["batch"]) for r in new} == {
        (k, b) for k in ("peakc-bf16", "peakc-2:4-int4") for b in (1, 2)
    }
    for r in new:
        assert KEYS <= set(r) and r["decode_ms"] > 0 and r["floor_ms"] > 0, r
        assert r["fallbacks"] == [], r  # every linear on a kernel
    sparse = [r for r in new if r["kernel"] == "peakc-2:4-int4"]
    # q/k/v and gate/up fused before compression: 4 per layer (2 layers), not 7
    assert all(r["kernels"].get("triton/linear_sparse24") == 8 for r in sparse)
    assert all(r["speedup_vs_bf16"] > 0 for r in sparse)
    dense = {r["batch"]: r["floor_ms"] for r in new if r["kernel"] == "peakc-bf16"}
    assert all(r["floor_ms"] < dense[r["batch"]] for r in sparse)  # fewer bytes to read
    assert "| tiny | peakc-2:4-int4 | 1 |" in e2e.markdown_table(records)
    # the kernel table (lowbit_kernels.py's) reads its layer rows past the end-to-end ones
    cublas = dict(table_row, kernel="cublas-bf16", ms=0.2, floor_ms=0.1)
    table = kernels_bench.markdown_table([*records, dict(table_row, floor_ms=0.05), cublas])
    assert "| 1 | 0.200 (1.00x) | 0.100 (2.00x) |" in table


def test_pipelines_compress_before_fusing():
    specs = e2e.pipelines("gptq", 128, 16, 256)
    assert specs["bf16"] == "default"
    assert specs["int4"] == (
        "cleanup,fuse,quantize{method=gptq,bits=4,group_size=128,nsamples=16,seq_len=256}"
    )
    assert specs["2:4-int4"].startswith("cleanup,fuse,prune{method=sparsegpt,pattern=2:4,")
    assert specs["2:4-int4"].endswith(",sparse24")
    assert "prune{method=magnitude" in e2e.pipelines("rtn", 128, 16, 256)["2:4-int4"]
