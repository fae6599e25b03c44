"""The multi-GPU partition benchmark's bookkeeping: a second machine's run merges into the
results file without erasing the first's, and the table renders every record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

bench = pytest.importorskip("partition_multigpu")


def record(gpus: int, cut: str, tokens_per_s: float, **extra) -> dict:
    base = dict(
        device="NVIDIA H200",
        gpus=gpus,
        processes=2,
        model="llama-8b-shaped",
        workload="prefill",
        cut=cut,
        schedule="1f1b" if cut != bench.ONE_GPU else "none",
        stages=2 if cut != bench.ONE_GPU else 1,
        tokens_per_s=tokens_per_s,
        imbalance=1.0,
        predicted_ms=[],
        measured_ms=[],
        speedup=1.0,
    )
    return {**base, **extra}


def test_a_second_machine_replaces_only_its_own_records(tmp_path):
    out = tmp_path / "results.json"
    first = [record(2, "peakc", 100.0)]
    out.write_text(json.dumps(first))
    rerun = [record(2, "peakc", 150.0)]
    other = [record(4, "peakc", 300.0)]
    merged = bench.merge_records(out, other)
    assert merged == first + other
    out.write_text(json.dumps(merged))
    assert bench.merge_records(out, rerun) == other + rerun


def test_table_renders_stage_times_balance_and_token_check():
    rows = [
        record(4, bench.ONE_GPU, 1000.0),
        record(
            4,
            "peakc",
            1900.0,
            predicted_ms=[10.0, 11.0],
            measured_ms=[10.5, 10.9],
            imbalance_predicted=1.048,
            bubble_predicted=0.2,
            bubble_measured=0.25,
            speedup=1.9,
        ),
        record(4, "peakc", 50.0, workload="generate", tokens_equal_one_gpu=True),
    ]
    lines = bench.markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert "| 1 (beside 2) | one-gpu |" in lines[2]
    assert "10.0 / 10.5, 11.0 / 10.9 | 1.048 / 1.000 | 0.20 / 0.25 |" in lines[3]
    assert "| 1.90 |" in lines[3]
    assert lines[4].endswith("| True |")
