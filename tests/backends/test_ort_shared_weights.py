"""One copy of the weights (CPU provider): every ONNX program of a generation artifact
references one external data file, the sessions of an OrtProgram take the weights from the
same OrtValues, outputs and greedy tokens equal the unshared load and eager, and a changed or
truncated data file is refused."""

import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import peakc
from peakc.backends.ort import session as ort_session
from peakc.backends.ort.session import OrtProgram
from peakc.errors import PeakcError
from peakc.models import load_source_for_task
from peakc.runtime.generate import Generator, SamplingConfig

PROGRAMS = ["decoder.onnx", "decoder.decode_b1.onnx", "decoder.decode_b2.onnx"]
DATA = "decoder.onnx.data"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    source = load_source_for_task("demo:llama", "generate", 32, 3)
    folder = tmp_path_factory.mktemp("shared")
    out = {}
    for name, backend in {
        "eager": "eager",
        "ort": "ort{device=cpu,decode_batches=[1,2],share_weights=true}",
    }.items():
        compiled = peakc.compile(
            source,
            backend=backend,
        )
        out[name] = (compiled, peakc.load(compiled.save(folder / name)))
    return out


def program(artifact, share: bool, directory=None) -> OrtProgram:
    info = artifact.manifest["programs"]["decoder"]
    runtime = {**info["runtime"], "share_weights": str(share).lower()}
    return OrtProgram((directory or artifact.directory) / info["file"], **runtime)


def test_programs_reference_one_data_file(artifacts):
    compiled, artifact = artifacts["ort"]
    files = {p.name: p.stat().st_size for p in artifact.directory.iterdir()}
    assert set(files) == {
        *PROGRAMS,
        DATA,
        "inputs.safetensors",
        "manifest.json",
        "report.json",
        "report.md",
        "weights.safetensors",  # ort keeps no weights there: an empty table
    }
    assert files["weights.safetensors"] < 100
    external = {}
    for name in PROGRAMS:
        model = onnx.load(str(artifact.directory / name), load_external_data=False)
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                assert info["location"] == DATA, (name, tensor.name)
                external.setdefault(name, {})[tensor.name] = info
            else:  # only small constants stay inside a model
                assert len(tensor.raw_data) <= 256, (name, tensor.name)
    # a decode program reads a subset of the decoder's weights at the same places (it drops the
    # rotary tables that only the decoder's new_k output needs, see gqa_fold/static_decode)
    for name in ("decoder.decode_b1.onnx", "decoder.decode_b2.onnx"):
        assert external[name].items() <= external["decoder.onnx"].items()
        assert len(external[name]) >= len(external["decoder.onnx"]) - 2
    # the weights are on disk once: each program file is small next to the data file, which
    # every program used to embed (about 3x the data before)
    assert all(files[name] < files[DATA] / 4 for name in PROGRAMS)
    assert sum(files.values()) < 1.6 * files[DATA]
    weights = compiled.contents.report["ort"]["weights"]
    assert weights["external_data_file"] == DATA and weights["programs"] == 3
    assert weights["shareable_initializers"] == len(external["decoder.decode_b1.onnx"]) >= 10
    assert files[DATA] >= weights["shareable_bytes"] > 0.9 * files[DATA]
    assert set(weights["embedded_bytes"]) == set(PROGRAMS)
    assert all(0 < size < 4096 for size in weights["embedded_bytes"].values())


def test_sessions_get_the_same_values(artifacts, monkeypatch):
    _, artifact = artifacts["ort"]
    given: list[tuple[int, str, object]] = []

    class RecordingOptions(onnxruntime.SessionOptions):
        def add_initializer(self, name, value):
            given.append((id(self), name, value))
            super().add_initializer(name, value)

    monkeypatch.setattr(ort_session.onnxruntime, "SessionOptions", RecordingOptions)
    shared = program(artifact, True)
    shared.decode_session(1)
    shared.decode_session(2)
    values = shared.shared_weights.values
    assert len({options for options, _, _ in given}) == 3  # prefill + 2 decode sessions
    assert len(given) == 3 * len(values)
    assert all(value is values[name] for _, name, value in given)
    report = shared.shared_weights.report()
    assert report["sessions"] == 3 and report["device"] == "cpu"
    size = (artifact.directory / DATA).stat().st_size  # also holds the decoder-only rotary tables
    assert 0.9 * size <= report["bytes"] <= size
    for array, value in zip(shared.shared_weights.memory, values.values()):
        assert value.data_ptr() == array.ctypes.data  # the mapped file itself, no copy
    assert program(artifact, False).shared_weights is None


def test_shared_outputs_equal_unshared_and_eager_tokens(artifacts):
    _, artifact = artifacts["ort"]
    inputs = artifact.example_inputs
    outputs = {share: program(artifact, share)(*inputs) for share in (True, False)}
    for got, want in zip(outputs[True], outputs[False]):
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
    generators = {name: Generator.from_artifact(a, "cpu") for name, (_, a) in artifacts.items()}
    ort_program = generators["ort"].step.program
    assert ort_program.shared_weights is not None  # share_weights=true from the artifact
    prompts = {2: [[5, 17, 99, 3, 250, 7], [42]], 1: [[9, 8, 7]]}
    config = SamplingConfig(max_new_tokens=6)
    for batch, prompt in prompts.items():
        tokens = {name: g.generate(prompt, config).tokens for name, g in generators.items()}
        assert tokens["ort"] == tokens["eager"], batch
    assert sorted(ort_program.decode_sessions) == [1, 2]
    assert ort_program.shared_weights.sessions == 3


def test_changed_or_truncated_data_file_is_refused(artifacts, tmp_path):
    _, artifact = artifacts["ort"]
    changed = shutil.copytree(artifact.directory, tmp_path / "changed")
    data = np.fromfile(changed / DATA, dtype=np.uint8)
    data[len(data) // 2] ^= 0xFF
    (changed / DATA).chmod(0o644)
    data.tofile(changed / DATA)
    with pytest.raises(PeakcError, match=rf"{DATA} was changed \(checksum mismatch\)$"):
        peakc.load(changed)
    truncated = shutil.copytree(artifact.directory, tmp_path / "truncated")
    with open(truncated / DATA, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(PeakcError, match=rf"^{DATA}: initializer .* lies past the file's end"):
        program(artifact, True, truncated)


def test_share_weights_option_error(artifacts):
    _, artifact = artifacts["ort"]
    with pytest.raises(PeakcError, match="share_weights must be auto, true or false; got 'x'"):
        program(artifact, "x")


def test_matmul_nbits_weights_shared(tmp_path):
    """MatMulNBits' packed uint8 weights are shared too; the CPU kernel prepacks them per
    session, from the shared value, and outputs stay equal to the unshared load."""
    source = load_source_for_task("demo:llama", "generate", 32, 2)
    compiled = peakc.compile(
        source,
        pipeline="quantize{method=rtn,bits=4,group_size=32},fuse",
        backend="ort{device=cpu,decode_batches=[1,2],share_weights=true}",
    )
    artifact = peakc.load(compiled.save(tmp_path / "q"))
    assert compiled.contents.report["ort"]["contrib_ops"]["MatMulNBits"] == 14
    shared = program(artifact, True)
    kinds = {
        t.name: t.data_type
        for t in onnx.load(
            str(artifact.directory / PROGRAMS[0]), load_external_data=False
        ).graph.initializer
    }
    uint8 = [n for n in shared.shared_weights.values if kinds[n] == onnx.TensorProto.UINT8]
    assert len(uint8) >= 14  # every MatMulNBits' packed weight
    outputs = {True: shared(*artifact.example_inputs)}
    outputs[False] = program(artifact, False)(*artifact.example_inputs)
    for got, want in zip(outputs[True], outputs[False]):
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
    tokens = {}
    for share in ("true", "false"):
        loaded = peakc.load(artifact.directory)
        loaded._programs["decoder"] = program(loaded, share == "true")
        generator = Generator.from_artifact(loaded, "cpu")
        prompts = [[5, 17, 99, 3, 250, 7], [42, 8]]
        tokens[share] = generator.generate(prompts, SamplingConfig(max_new_tokens=8)).tokens
        assert sorted(generator.step.program.decode_sessions) == [2]
    assert tokens["true"] == tokens["false"]
