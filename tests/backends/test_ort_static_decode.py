"""Static decode programs (CPU provider): one per batch size, no shape computation left (what
ONNX Runtime needs to place every node on CUDA and capture a CUDA graph), generation on them
equal to eager's greedy tokens."""

import onnx
import onnx_ir as ir
import pytest

import peakc
from peakc.backends.ort.static_decode import shape_dependent_nodes
from peakc.errors import PeakcError
from peakc.models import load_source_for_task
from peakc.runtime.generate import Generator, SamplingConfig

MAX_LEN, KV_HEADS, HEAD_DIM, VOCAB = 32, 2, 16, 256  # demo:llama


@pytest.fixture(scope="module")
def source():
    return load_source_for_task("demo:llama", "generate", MAX_LEN, 3)


def compile_to(source, backend, folder):
    compiled = peakc.compile(
        source,
        backend=backend,
    )
    return compiled, peakc.load(compiled.save(folder))


@pytest.fixture(scope="module")
def artifacts(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("static")
    return {
        "eager": compile_to(source, "eager", folder / "eager"),
        "ort": compile_to(source, "ort{device=cpu,decode_batches=[1,2]}", folder / "ort"),
    }


def test_static_programs_have_no_shape_computation(artifacts):
    compiled, artifact = artifacts["ort"]
    runtime = artifact.manifest["programs"]["decoder"]["runtime"]
    assert runtime["decode_programs"] == {
        "1": "decoder.decode_b1.onnx",
        "2": "decoder.decode_b2.onnx",
    }
    assert compiled.contents.report["ort"]["static_decode_batches"] == [1, 2]
    dynamic = ir.load(artifact.directory / "decoder.onnx")
    assert shape_dependent_nodes(dynamic)  # the dynamic decoder computes shapes (the CPU nodes)
    for batch in (1, 2):
        path = artifact.directory / f"decoder.decode_b{batch}.onnx"
        model = ir.load(path)
        assert shape_dependent_nodes(model) == []
        assert not any(n.op_type in ("Shape", "Size", "Range") for n in model.graph)
        ops = {n.op_type for n in model.graph}
        assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
        assert not ops & {"RotaryEmbedding", "Transpose"}  # gqa_fold: inside GQA
        assert [o.name for o in model.graph.outputs][0] == "output_0"  # logits + presents only
        checked = onnx.load(str(path))
        onnx.checker.check_model(checked)
        for value in list(checked.graph.input) + list(checked.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), value.name  # static everywhere
        shapes = {
            v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in checked.graph.output
        }
        assert shapes["output_0"] == [batch, 1, VOCAB]
        assert shapes["present_key.0"] == [batch, KV_HEADS, MAX_LEN, HEAD_DIM]


def test_generation_on_static_programs_equals_eager(artifacts):
    prompts = {2: [[5, 17, 99, 3, 250, 7], [42]], 1: [[9, 8, 7]], 3: [[1, 2], [3], [4, 5, 6]]}
    generators = {b: Generator.from_artifact(artifacts[b][1], "cpu") for b in ("eager", "ort")}
    step = generators["ort"].step
    config = SamplingConfig(max_new_tokens=6)
    for batch in (2, 1, 3):  # 3 has no static program: the dynamic decoder decodes it
        tokens = {b: g.generate(prompts[batch], config).tokens for b, g in generators.items()}
        assert tokens["ort"] == tokens["eager"], batch
        run = step.decode[batch]
        static = step.program.decode_sessions.get(batch)
        assert (run.session is static) == (batch != 3)
        assert run.runs == 5
    assert sorted(step.program.decode_sessions) == [1, 2]


def test_decode_batches_option_errors(source, tmp_path):
    with pytest.raises(PeakcError, match="decode_batches '9' must lie in 1..3"):
        compile_to(source, "ort{device=cpu,decode_batches=[9]}", tmp_path / "a")
    with pytest.raises(
        PeakcError,
        match=r"backend 'ort': option 'decode_batches' expects one of auto\|none or a list "
        r"like \[1, 8\], got 'x' \(column 16\)",
    ):
        compile_to(source, "ort{device=cpu,decode_batches=x}", tmp_path / "b")
