import json
import zipfile

import pytest
import torch

import peakc
from peakc.errors import PeakcError
from peakc.runtime import artifact as art


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llama):
    model, inputs = llama
    directory = tmp_path_factory.mktemp("a") / "llama"
    peakc.compile(model, inputs, source="demo:llama").save(directory)
    return directory


@pytest.fixture()
def copy_of(saved, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def test_layout_and_manifest(saved):
    names = sorted(p.name for p in saved.iterdir())
    assert names == [
        "forward.pt2",
        "inputs.safetensors",
        "manifest.json",
        "report.json",
        "report.md",
        "weights.safetensors",
    ]
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format_version"] == art.FORMAT_VERSION
    assert manifest["pipeline"] == "cleanup,fuse"
    assert manifest["backend"] == "eager"
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    prog = manifest["programs"]["forward"]
    assert prog["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [1, 16]}]
    assert prog["outputs"][0]["shape"] == [1, 16, 256]
    report = json.loads((saved / "report.json").read_text())
    assert report["passes"][1]["stats"]["fused.rms_norm"] == 5
    assert report["ops"] == {
        name: "reference"
        for name in ("attention", "glu", "rms_norm", "rotary_embedding", "skip_rms_norm")
    }


def test_load_runs_and_matches(saved, llama):
    model, inputs = llama
    loaded = peakc.load(saved)
    (out,) = loaded(*inputs)
    with torch.no_grad():
        torch.testing.assert_close(out, model(*inputs), rtol=1e-6, atol=1e-6)
    other = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(other)[0], model(other), rtol=1e-6, atol=1e-6)


def test_program_archive_holds_no_pickles(saved):
    with zipfile.ZipFile(saved / "forward.pt2") as archive:
        for info in archive.infolist():
            assert not info.filename.endswith(".pt") or info.file_size == 0, info.filename


def test_wrong_input_shape_is_named(saved):
    with pytest.raises(
        PeakcError, match=r"input 'input_ids': expected int64\[1, 16\], got int64\[1, 8\]"
    ):
        peakc.load(saved)(torch.zeros(1, 8, dtype=torch.long))


def test_changed_file_is_refused(copy_of):
    with open(copy_of / "weights.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(PeakcError, match="weights.safetensors was changed"):
        peakc.load(copy_of)


def test_missing_and_extra_files_are_refused(copy_of):
    (copy_of / "notes.txt").write_text("hi")
    with pytest.raises(PeakcError, match="unexpected file: notes.txt"):
        peakc.load(copy_of)
    (copy_of / "notes.txt").unlink()
    (copy_of / "report.md").unlink()
    with pytest.raises(PeakcError, match="incomplete: report.md is missing"):
        peakc.load(copy_of)


def test_incompatible_version_is_refused_and_version_1_still_reads(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["format_version"] = 1  # written before zero inputs could be omitted
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    assert peakc.load(copy_of).manifest["format_version"] == 1
    manifest["format_version"] = 99
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PeakcError, match="format version 99; this peakc .* reads versions 1 and 2"):
        peakc.load(copy_of)


def test_program_format_without_a_loader_is_named(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["backend"] = "tflite"
    manifest["programs"]["forward"]["format"] = "tflite-flatbuffer"
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    loaded = peakc.load(copy_of)
    with pytest.raises(
        PeakcError, match="no loader for program format 'tflite-flatbuffer' \\(backend 'tflite'\\)"
    ):
        loaded.program()


def test_registered_program_format_is_used(copy_of, monkeypatch):
    monkeypatch.setitem(art._PROGRAM_LOADERS, "echo", lambda path, runtime: lambda *xs: xs[-1:])
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["programs"]["forward"]["format"] = "echo"
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    loaded = peakc.load(copy_of)
    (out,) = loaded(*loaded.example_inputs)
    assert torch.equal(out, loaded.example_inputs[0])


def test_not_an_artifact(tmp_path):
    with pytest.raises(PeakcError, match="artifact folder not found"):
        peakc.load(tmp_path / "nope")
    with pytest.raises(PeakcError, match="manifest.json is missing"):
        peakc.load(tmp_path)


def test_pickled_payload_is_refused(copy_of):
    # Rebuild the archive with a pickled weight file added and the checksum updated:
    # the checksum passes, the pickle check must still refuse it.
    path = copy_of / "forward.pt2"
    with zipfile.ZipFile(path) as src:
        entries = {i.filename: src.read(i.filename) for i in src.infolist()}
    prefix = next(iter(entries)).split("/")[0]
    entries[f"{prefix}/data/weights/w0.pt"] = b"\x80\x02cos\nsystem\n."
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in entries.items():
            dst.writestr(name, data)
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["files"]["forward.pt2"] = art.sha256_file(path)
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PeakcError, match="refusing archive entry .*w0.pt"):
        peakc.load(copy_of)(*peakc.load(copy_of).example_inputs)


def test_existing_output_needs_force(saved, llama, tmp_path):
    model, inputs = llama
    compiled = peakc.compile(model, inputs, pipeline="none")
    target = tmp_path / "out"
    compiled.save(target)
    with pytest.raises(PeakcError, match="already exists"):
        compiled.save(target)
    compiled.save(target, force=True)
    assert json.loads((target / "manifest.json").read_text())["pipeline"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_failed_write_leaves_nothing(llama, tmp_path, monkeypatch):
    model, inputs = llama
    compiled = peakc.compile(model, inputs, pipeline="none")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(art, "_make_readable", fail)
    with pytest.raises(OSError, match="disk full"):
        compiled.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
