"""ort backend (CPU provider): export with contrib ops, parity, artifacts, generation, errors."""

import json
import warnings

import onnx
import pytest
import torch

import peakc
from peakc.backends.ort.export import check_onnx, count_contrib_ops, max_ir_version
from peakc.cli import main
from peakc.errors import PeakcError
from peakc.ir.ops import define_op
from peakc.models import load_source_for_task
from peakc.models.demo import demo_llama, demo_mlp
from peakc.runtime.generate import Generator, SamplingConfig


def compile_ort(model, inputs, tmp_path, name, **kwargs):
    compiled = peakc.compile(model, inputs, backend="ort", **kwargs)
    directory = compiled.save(tmp_path / name)
    return compiled, peakc.load(directory)


def rel_error(got, want):
    return float((got - want).abs().max() / want.abs().max())


def test_llama_contrib_ops_and_parity(tmp_path):
    model, inputs = demo_llama()
    compiled, artifact = compile_ort(model, inputs, tmp_path, "llama")
    ort = compiled.contents.report["ort"]
    # 2 layers: 5 RMSNorms of which 4 take the residual add; rotary on q and k; 2 attentions.
    assert ort["contrib_ops"] == {
        "MultiHeadAttention": 2,
        "RotaryEmbedding": 4,
        "SimplifiedLayerNormalization": 1,
        "SkipSimplifiedLayerNormalization": 4,
    }
    assert ort["parity_rel_error"] < 1e-4 and ort["provider"] == "CPUExecutionProvider"
    assert ort["ir_version"] == max_ir_version() and ort["external_data"] is True
    assert ort["nodes_after_cleanup"] < ort["nodes_before_cleanup"]
    assert compiled.contents.report["ops"]["attention"] == "contrib/onnx"
    report_md = compiled.contents.report_md  # what `peakc inspect` prints
    assert "## backend ort" in report_md and "- provider: CPUExecutionProvider" in report_md
    assert "- contrib_ops: MultiHeadAttention 2, RotaryEmbedding 4," in report_md
    manifest = json.loads((artifact.directory / "manifest.json").read_text())
    assert manifest["programs"]["forward"]["format"] == "onnx"
    assert manifest["programs"]["forward"]["weights"] == []
    model_proto = onnx.load(str(artifact.directory / "forward.onnx"))
    assert {o.domain for o in model_proto.opset_import} >= {"", "com.microsoft"}
    with torch.no_grad():
        want = model(*inputs)
    other = torch.randint(0, 256, inputs[0].shape)
    assert rel_error(artifact(*inputs)[0], want) < 1e-4
    assert rel_error(artifact(other)[0], model(other).detach()) < 1e-4


def test_mlp_gelu(tmp_path):
    model, inputs = demo_mlp()
    compiled, artifact = compile_ort(model, inputs, tmp_path, "mlp")
    assert compiled.contents.report["ort"]["contrib_ops"] == {"Gelu": 2}
    assert rel_error(artifact()[0], model(*inputs).detach()) < 1e-4


def test_sessions_use_the_runtime_thread_count(tmp_path):
    """--threads (torch's thread count, set by runtime/threads.py) reaches ONNX Runtime too."""
    from peakc.backends.ort.session import load_session

    model, inputs = demo_mlp()
    _, artifact = compile_ort(model, inputs, tmp_path, "mlp")
    path = next(tmp_path.rglob("*.onnx"))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        session = load_session(path, "CPUExecutionProvider")
        assert session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)


def test_gpt2_from_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from peakc.models.hf import CausalLMLogits

    config = transformers.GPT2Config(
        vocab_size=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = CausalLMLogits(hf.eval())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    compiled, artifact = compile_ort(model, (ids,), tmp_path, "gpt2")
    contrib = compiled.contents.report["ort"]["contrib_ops"]
    # Every skip norm the fuse pass made, both attentions and the tanh GELUs of both MLPs
    # (in linear_act) are contrib ops; the plain LayerNormalization is a standard op.
    assert contrib["SkipLayerNormalization"] == compiled.records[-1]["stats"]["fused.skip_norm"]
    assert contrib["SkipLayerNormalization"] == 4
    assert contrib["MultiHeadAttention"] == 2
    assert contrib["FastGelu"] == 2
    with torch.no_grad():
        want = model(ids)
    assert rel_error(artifact(ids)[0], want) < 1e-4


def test_generation_matches_eager(tmp_path):
    source = load_source_for_task("demo:llama", "generate", 48, 3)
    results = {}
    for backend in ("eager", "ort"):
        compiled = peakc.compile(
            source,
            backend=backend,
        )
        artifact = peakc.load(compiled.save(tmp_path / backend))
        generator = Generator.from_artifact(artifact, "cpu")
        prompts = [[5, 17, 99, 3, 250, 7], [42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
        results[backend] = generator.generate(prompts, SamplingConfig(max_new_tokens=10)).tokens
    assert results["ort"] == results["eager"]
    contrib = compiled.contents.report["ort"]["contrib_ops"]
    assert contrib["GroupQueryAttention"] == 2 and "MultiHeadAttention" not in contrib


def test_cli_compile_run_generate(tmp_path, capsys):
    out = tmp_path / "gen"
    argv = [
        "compile",
        "demo:llama",
        "-o",
        str(out),
        "--backend",
        "ort",
        "--task",
        "generate",
        "--max-seq-len",
        "32",
        "--max-batch",
        "2",
    ]
    assert main(argv) == 0
    assert (out / "decoder.onnx").is_file()
    assert main(["run", str(out)]) == 0
    assert "output_0: float32[2, 8, 256]" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "hi"]) == 2  # no tokenizer: the clear error
    captured = capsys.readouterr()
    assert "has no tokenizer: give token ids with --prompt-ids" in captured.err
    assert captured.out == ""  # nothing printed before the error
    argv = ["generate", str(out), "--prompt-ids", "1 2 3", "--prompt-ids", "4,5"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.split("\n")
    artifact = peakc.load(out)
    want = Generator.from_artifact(artifact, "cpu").generate(
        [[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=4)
    )
    assert lines[:2] == [" ".join(map(str, t)) for t in want.tokens]
    assert main(["generate", str(out), "--prompt-ids", "1 x"]) == 2
    assert "--prompt-ids '1 x' is not a list of token ids" in capsys.readouterr().err


def test_cuda_requested_without_onnxruntime_gpu(capsys, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    argv = ["compile", "demo:mlp", "-o", str(tmp_path / "x"), "--backend", "ort{device=cuda}"]
    assert main(argv) == 2
    assert "device=cuda needs onnxruntime-gpu" in capsys.readouterr().err
    with pytest.raises(PeakcError, match="backend 'ort' has no option"):
        peakc.compile(*demo_mlp(), backend="ort{gpu=1}")


class Odd(torch.nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x * 2) + 1


def _data_dependent_branch(x: torch.Tensor) -> torch.Tensor:
    """Python control flow on a tensor's value: the reference cannot be exported."""
    if float(x.sum()) > 1e9:
        return x * 3
    return x * 2


def _shifted(x: torch.Tensor) -> torch.Tensor:
    """Plain torch: exports through its reference."""
    return x.roll(1, dims=-1) * 3


UNEXPORTABLE = define_op(
    "test_ort_unexportable", _data_dependent_branch, lambda x: torch.empty_like(x)
)
SHIFTED = define_op("test_ort_shifted", _shifted, lambda x: torch.empty_like(x))


def test_unmapped_op_exports_its_reference(tmp_path):
    model = Odd(torch.ops.peakc.test_ort_shifted)
    x = torch.randn(3, 5)
    compiled, artifact = compile_ort(model, (x,), tmp_path, "odd", pipeline="none")
    assert compiled.contents.report["ops"] == {"test_ort_shifted": "reference (exported)"}
    assert compiled.contents.report["ort"]["reference_ops"] == ["test_ort_shifted"]
    assert rel_error(artifact(x)[0], model(x)) < 1e-6


def test_unmapped_unexportable_op_is_named():
    model = Odd(torch.ops.peakc.test_ort_unexportable)
    with pytest.raises(PeakcError, match="peakc::test_ort_unexportable has no ONNX mapping"):
        peakc.compile(model, (torch.randn(3, 5),), backend="ort", pipeline="none")


def test_checker_failure_is_clear(tmp_path):
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        "bad",
        [value("x", TensorProto.FLOAT, [1])],
        [value("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(PeakcError, match="bad.onnx fails the ONNX checker: No Op registered"):
        check_onnx(path)


def test_count_contrib_ops_reads_functions_too():
    import onnx_ir

    model = onnx_ir.serde.deserialize_model(
        onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    )
    assert count_contrib_ops(model) == {}


class BigEmbedding(torch.nn.Module):
    """263k x 2048 fp32 = 2.15 GB of weights: past protobuf's 2 GB limit."""

    def __init__(self) -> None:
        super().__init__()
        weight = torch.zeros(263_000, 2048)
        weight[7] = 1.5
        self.embed = torch.nn.Embedding.from_pretrained(weight)

    def forward(self, ids):
        return self.embed(ids) * 2


@pytest.mark.slow
@pytest.mark.parametrize("onnx_ir_aligns", [True, False])
def test_external_data_starts_each_initializer_on_a_page(tmp_path, monkeypatch, onnx_ir_aligns):
    """onnx_ir 1.0's save has no `alignment`: the data file is then written by hand, with the
    same page-aligned offsets, and the artifact loads and runs the same."""
    from peakc.backends.ort import export

    if onnx_ir_aligns and not export.save_takes_alignment():
        pytest.skip("the installed onnx_ir.save has no alignment option")
    monkeypatch.setattr(export, "save_takes_alignment", lambda: onnx_ir_aligns)
    model, inputs = demo_mlp()
    _, artifact = compile_ort(model, inputs, tmp_path, "mlp", pipeline="none")
    proto = onnx.load(str(artifact.directory / "forward.onnx"), load_external_data=False)
    offsets = {
        t.name: int(next((e.value for e in t.external_data if e.key == "offset"), 0))
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert len(offsets) >= 2 and all(o % export.EXTERNAL_ALIGNMENT == 0 for o in offsets.values())
    assert rel_error(artifact()[0], model(*inputs).detach()) < 1e-4


def test_over_2gb_uses_external_data(tmp_path):
    """About 40 s and 5 GB of disk on 2 cores (export, checker, two session loads, sha256)."""
    ids = torch.tensor([[1, 7, 262_999]])
    compiled = peakc.compile(BigEmbedding(), (ids,), backend="ort", pipeline="none", parity=False)
    assert compiled.contents.report["ort"]["external_data"] is True
    directory = compiled.save(tmp_path / "big")
    assert (directory / "forward.onnx.data").stat().st_size > 2**31
    assert (directory / "forward.onnx").stat().st_size < 2**20
    out = peakc.load(directory)(ids)[0]
    assert out[0, 1].eq(3.0).all() and out[0, 0].eq(0).all()


def test_bfloat16_tensors_bind_by_value():
    """numpy has no bfloat16: bind_tensor hands ONNX Runtime an OrtValue over the tensor's own
    memory (input and output), so a bf16 program runs through the same IOBinding path."""
    import onnxruntime
    from onnx import TensorProto, helper

    from peakc.backends.ort.io_binding import bind_tensor

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = max_ir_version()
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = torch.randn(2, 3).to(torch.bfloat16)
    y = torch.zeros(2, 3, dtype=torch.bfloat16)
    binding = session.io_binding()
    bind_tensor(binding.bind_input, "x", x)
    bind_tensor(binding.bind_output, "y", y)
    session.run_with_iobinding(binding)
    assert torch.equal(y, x)


def test_parity_failure_is_clear_and_leaves_no_export(tmp_path, monkeypatch):
    """Parity is norm-wise (as the pipeline's checks), its worst element reported beside it; a
    program over the tolerance is refused and its half-made export removed from the temp dir."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, inputs = demo_llama()
    ort = peakc.compile(model, inputs, backend="ort").contents.report["ort"]
    assert ort["parity_rel_error"] < 1e-4 and ort["parity_max_element_rel_error"] < 1e-4
    assert ort["parity_tol"] == "auto"
    leftovers = list(tmp_path.glob("peakc-ort-*"))
    with pytest.raises(PeakcError, match=r"output_0 differs from the graph by .* \(norm-wise"):
        peakc.compile(model, inputs, backend="ort{parity_tol=0}")
    assert list(tmp_path.glob("peakc-ort-*")) == leftovers
    with pytest.raises(
        PeakcError,
        match=r"backend 'ort': option 'parity_tol' expects one of auto or a number, "
        r"got 'x' \(column 5\)",
    ):
        peakc.compile(model, inputs, backend="ort{parity_tol=x}")


def test_flag_options_read_alike():
    """cuda_graph, share_weights and fold_rotary take true/false/1/0 (share_weights also auto)
    and name themselves in one form of error."""
    from peakc.backends.ort.session import parse_flag, resolve_cuda_graph, resolve_share_weights

    assert parse_flag("fold_rotary", "1") is True and parse_flag("fold_rotary", "False") is False
    assert (
        resolve_share_weights("auto", "cpu") is False
        and resolve_share_weights("0", "cuda") is False
    )
    assert resolve_cuda_graph("false", "cpu") is False
    with pytest.raises(PeakcError, match="backend ort: cuda_graph must be true or false; got 'x'"):
        resolve_cuda_graph("x", "cuda")
    with pytest.raises(PeakcError, match="cuda_graph=true needs device=cuda"):
        resolve_cuda_graph("1", "cpu")
    with pytest.raises(PeakcError, match="fold_rotary must be true or false; got 'auto'"):
        parse_flag("fold_rotary", "auto")


def test_export_keeps_torch_onnx_registry_warnings_out():
    """torch.onnx's "torchvision is not installed" lines (one per op, once per process) stay
    out of the output: checked in a fresh process."""
    import subprocess
    import sys

    code = (
        "import peakc; from peakc.models.demo import demo_mlp; m, i = demo_mlp(); "
        "peakc.compile(m, i, backend='ort')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "torchvision" not in run.stderr


def test_onnx_artifact_as_a_source_is_refused_clearly(tmp_path, capsys):
    model, inputs = demo_mlp()
    peakc.compile(model, inputs, backend="ort").save(tmp_path / "mlp")
    out = tmp_path / "again"
    assert main(["compile", f"artifact:{tmp_path / 'mlp'}", "-o", str(out)]) == 2
    assert "its program is ONNX (ort backend) and cannot be read back" in capsys.readouterr().err
    assert not out.exists()


def test_large_external_data_waits_in_temp_only_while_the_contents_live(tmp_path, monkeypatch):
    """A data file too large to hold in memory stays in its peakc-ort-* folder until saved
    (moved into the artifact); the folder goes with the compiled contents, saved or not."""
    import gc
    import tempfile

    from peakc.backends.ort import lower

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(lower, "IN_MEMORY_BYTES", 0)
    model, inputs = demo_llama()
    compiled = peakc.compile(model, inputs, backend="ort")
    (folder,) = (tmp_path / "tmp").glob("peakc-ort-*")
    assert [p.name for p in folder.iterdir()] == ["forward.onnx.data"]
    directory = compiled.save(tmp_path / "saved")
    assert (directory / "forward.onnx.data").is_file() and not any(folder.iterdir())
    torch.testing.assert_close(peakc.load(directory)(*inputs)[0], compiled(*inputs)[0])
    del compiled
    gc.collect()
    assert not folder.exists()
    unsaved = peakc.compile(model, inputs, backend="ort")
    (folder,) = (tmp_path / "tmp").glob("peakc-ort-*")
    del unsaved
    gc.collect()
    assert not folder.exists()
