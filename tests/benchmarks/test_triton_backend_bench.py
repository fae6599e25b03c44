"""The Triton backend benchmark's bookkeeping: the per-kernel table from profiler times and the
cost model's launches, the profiler on the CPU, records merged per runtime, and a peer's
process killed at its time limit with error rows for the batches it did not measure."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

bench = pytest.importorskip("triton_backend")


def test_kernel_table_rows_ops_bytes_and_the_gap():
    triton = {"rms_norm_kernel": "rms_norm", "attention_cache_kernel": "attention_cache",
              "combine_splits_kernel": "attention_cache"}  # fmt: skip
    times = {  # two steps profiled
        "rms_norm_kernel": [2.0, 2.0, 2.0, 2.0],
        "attention_cache_kernel_0d1d": [5.0, 5.0],  # a suffixed name still maps to its op
        "combine_splits_kernel": [1.0, 1.0],
        "nvjet_tst_64x8_64x16_4x1_v_bz_TNT": [10.0, 10.0, 10.0, 10.0],
        "void at::native::vectorized_elementwise_kernel<4>": [0.5, 0.5],
    }
    launches = [
        {"op": "peakc.rms_norm", "kind": "memory", "flops": 0.0, "bytes": 4000.0, "kernels": 1},
        {"op": "peakc.rms_norm", "kind": "memory", "flops": 0.0, "bytes": 4000.0, "kernels": 1},
        {"op": "peakc.attention_cache", "kind": "attention", "flops": 1e6, "bytes": 6000.0,
         "kernels": 1},
        {"op": "aten.linear", "kind": "gemm", "flops": 1e7, "bytes": 40000.0, "kernels": 1},
        {"op": "aten.embedding", "kind": "memory", "flops": 0.0, "bytes": 100.0, "kernels": 1},
    ]  # fmt: skip
    table = bench.kernel_table(times, 2, 60.0, triton, launches)
    assert table["kernel_us"] == 4.0 + 5.0 + 1.0 + 20.0 + 0.5
    assert table["gap_us"] == 60.0 - table["kernel_us"]
    first = table["rows"][0]
    assert first["kernel"].startswith("nvjet") and first["op"] == "gemm"
    assert first["launches"] == 2 and first["us"] == 20.0 and first["share"] == round(20 / 60, 4)
    assert first["bytes"] == 40000.0 and first["gb_per_s"] == round(40000 / 20 / 1e3, 1)
    ops = {op["op"]: op for op in table["by_op"]}
    assert ops["rms_norm"]["bytes"] == 8000.0 and ops["rms_norm"]["launches"] == 2
    # two kernels of one op: the op has the bytes, its rows do not
    assert ops["attention_cache"]["kernels"] == 2 and ops["attention_cache"]["us"] == 6.0
    assert all("bytes" not in r for r in table["rows"] if r["op"] == "attention_cache")
    assert ops["aten"]["bytes"] == 100.0 and ops["aten"]["us"] == 0.5


def test_kernel_times_profiles_top_level_cpu_ops():
    a = torch.randn(16, 16)
    times = bench.kernel_times(lambda: torch.nn.functional.linear(a, a).relu(), 3, "cpu")
    assert len(times["aten::linear"]) == 3 and len(times["aten::relu"]) == 3
    assert "aten::mm" not in times and "aten::clamp_min" not in times  # ops inside ops
    assert bench.kernel_op("aten::linear", {}) == "gemm"
    assert bench.kernel_op("aten::relu", {}) == "aten"


def test_merge_replaces_only_the_runtimes_a_run_measured(tmp_path):
    out = tmp_path / "results.json"

    def rec(runtime, ms, model="llama-1b"):
        return {"model": model, "device": "gpu", "runtime": runtime, "batch": 1, "decode_ms": ms}

    bench.merge(out, [rec("peakc-triton", 1.0), rec("torch-compile", 2.0), rec("aoti", 9.0, "x")])
    bench.merge(out, [rec("aoti", 3.0), rec("hf-generate", 4.0)])  # a second call, other peers
    kept = {(r["model"], r["runtime"]): r["decode_ms"] for r in json.loads(out.read_text())}
    assert kept == {("llama-1b", "peakc-triton"): 1.0, ("llama-1b", "torch-compile"): 2.0,
                    ("x", "aoti"): 9.0, ("llama-1b", "aoti"): 3.0,
                    ("llama-1b", "hf-generate"): 4.0}  # fmt: skip


def test_a_peer_out_of_time_is_killed_and_its_batches_are_error_rows():
    args = SimpleNamespace(model="tiny", dtype="float32", batches=[1, 2], context=12, prefill=8,
                           steps=2, gguf=None, smoke=True)  # fmt: skip
    started = time.perf_counter()
    rows = bench.run_peer_process("eager", args, 0.5)
    assert time.perf_counter() - started < 30
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["error"] == "not done in the 0 s left of --budget-s" for r in rows)
