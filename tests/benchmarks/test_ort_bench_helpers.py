"""The ort benchmark's bookkeeping: greedy-token comparison and MatMulNBits bits per weight."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

ort_backend = pytest.importorskip("ort_backend")
models = pytest.importorskip("ort_bench_models")


def test_compare_tokens_reports_the_first_difference_per_sequence():
    got = [[1, 2, 3], [4, 5, 6], [7, 8]]
    want = [[1, 2, 3], [4, 9, 6], [7, 8, 9]]
    check = models.compare_tokens(got, want)
    assert check == {"first_diff": [-1, 1, 2], "all_match": False}
    assert models.compare_tokens(want, want)["all_match"]


def test_nbits_stats_counts_blocks_scales_and_zero_points(tmp_path):
    n, k, block = 8, 64, 32
    blocks = k // block
    inits = [
        helper.make_tensor("b", TensorProto.UINT8, [n, blocks, block // 2], [0] * (n * k // 2)),
        helper.make_tensor("s", TensorProto.FLOAT16, [n * blocks], [0] * (n * blocks)),
        helper.make_tensor("z", TensorProto.UINT8, [n], [0] * n),  # 2 blocks x 4 bits per row
    ]
    node = helper.make_node(
        "MatMulNBits",
        ["x", "b", "s", "z"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, n])],
        inits,
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    stats = ort_backend.nbits_stats(path, params=n * k)
    assert stats["matmul_nbits"] == 1 and stats["block_size"] == [32]
    assert stats["with_zero_points"] == 1
    assert stats["bits_per_quantized_weight"] == 4 + 16 / 32 + 4 / 32
    assert ort_backend.op_counts(path) == {"MatMulNBits": 1}
