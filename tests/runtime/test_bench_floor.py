"""`peakc bench A B` with the decode floor: the bytes a decode step must read (each weight
once, embedding tables gathered not read, the KV cache at the timed context) over the copy
bandwidth measured in the same run, and each artifact's share of it; the weights each program
format reads (torch.export graphs, triton programs, ONNX initializers)."""

import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import peakc
from peakc.cli import main
from peakc.models import load_source_for_task
from peakc.runtime.bench import (
    _onnx_weights,
    _triton_tables,
    copy_bandwidth,
    format_side_by_side,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """demo:llama's decoder compiled once, saved as two eager artifacts."""
    source = load_source_for_task("demo:llama", "generate", 24, 2)
    folder = tmp_path_factory.mktemp("floor")
    compiled = peakc.compile(source, backend="eager", pipeline="cleanup,fuse")
    return compiled.save(folder / "a"), compiled.save(folder / "b")


def test_bench_prints_the_floor_per_batch_and_each_share(pair, capsys):
    first, second = pair
    argv = ["bench", str(first), str(second), "--batch", "1", "2", "--prompt-len", "4",
            "--gen-len", "3", "--repeats", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    lines = format_side_by_side(results).splitlines()  # what the command prints without --json
    floors = [line for line in lines if line.startswith("decode floor, batch")]
    assert [f.split("  ")[0] for f in floors] == ["decode floor, batch 1 (ms)",
                                                  "decode floor, batch 2 (ms)"]  # fmt: skip
    assert all(f.count("%)") == 2 for f in floors)  # a share per artifact
    assert lines[-1].startswith("decode floor: bytes a decode step must read")
    assert "KV cache at context 5" in lines[-1] and "GB/s (read + write)" in lines[-1]

    artifact = peakc.load(first)
    layout = artifact.manifest["generation"]
    gathered = artifact.weights["model.embed_tokens.weight"]  # demo:llama's head is untied
    weights = sum(t.numel() * t.element_size() for t in artifact.weights.values())
    weights -= gathered.numel() * gathered.element_size()
    for r in results:
        per_token = 2 * layout["num_layers"] * layout["num_kv_heads"] * layout["head_dim"] * 4
        kv = r["batch"] * 5 * per_token  # context: prompt 4 + half of the 3 new tokens
        assert r["floor_bytes"] == {"weights": weights, "kv_cache": kv, "total": weights + kv,
                                    "context": 5}  # fmt: skip
        assert r["floor_ms"] == pytest.approx(
            (weights + kv) / r["copy_bytes_per_s"] * 1e3, rel=1e-3, abs=1e-4
        )


def test_copy_bandwidth_is_bytes_read_and_written_per_second():
    assert 1e8 < copy_bandwidth("cpu") < 1e13


def test_triton_program_tables_are_weights_read_only_by_embedding():
    embedding, linear = "aten.embedding.default", "aten.linear.default"
    spec = {
        "weights": [0, 1, 2],
        "weight_names": ["embed", "tied", "proj"],
        "steps": [
            {"kind": "aten", "op": embedding, "args": [{"value": 0}, {"value": 3}]},
            {"kind": "aten", "op": embedding, "args": [{"value": 1}, {"value": 3}]},
            {"kind": "gemm", "op": linear, "args": [{"value": 4}, {"value": 1}]},
            {"kind": "gemm", "op": linear, "args": [{"value": 4}], "kwargs": {"w": {"value": 2}}},
        ],
    }
    assert _triton_tables(spec) == {"embed"}


def test_onnx_initializers_once_with_gather_tables(tmp_path):
    inits = [
        helper.make_tensor(name, TensorProto.FLOAT, shape, torch.randn(shape).flatten().tolist())
        for name, shape in (("embed", [8, 4]), ("proj", [4, 4]), ("tied", [8, 4]))
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "proj"], ["y"]),
        helper.make_node("Gather", ["tied", "ids"], ["z"]),
        helper.make_node("MatMul", ["y", "tied_t"], ["out"]),
        helper.make_node("Transpose", ["tied"], ["tied_t"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 8])],
        inits,
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(
        helper.make_model(graph), str(path), save_as_external_data=True,
        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0,
    )  # fmt: skip
    weights = _onnx_weights(path)
    assert sorted(weights.values()) == [(64, False), (128, False), (128, True)]
