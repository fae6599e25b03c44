"""One pipeline, several backends: `--backend eager,ort` lowers one transformed graph into an
artifact per backend (DIR/<backend>), and `peakc bench A B` shows them side by side."""

import json

import pytest
import torch

import peakc
from peakc.backends.base import get_backends
from peakc.cli import main
from peakc.errors import PeakcError

pytest.importorskip("onnxruntime")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 4)

    def forward(self, x):
        return (self.down(torch.nn.functional.gelu(self.up(x))),)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(3, 8)
    compiled = peakc.compile(model, (x,), backend="eager,ort", pipeline="cleanup")
    folder = tmp_path_factory.mktemp("pair") / "both"
    return model, x, compiled, folder, compiled.save(folder)


def test_each_backend_writes_an_artifact_that_loads_alone(pair):
    model, x, _, folder, written = pair
    assert written == {"eager": folder / "eager", "ort": folder / "ort"}
    assert sorted(p.name for p in folder.iterdir()) == ["eager", "ort"]
    with torch.no_grad():
        want = model(x)[0]
    for name, path in written.items():
        artifact = peakc.load(path)
        assert artifact.backend == name
        assert torch.allclose(artifact(x)[0], want, atol=1e-5)


def test_both_record_the_one_pipeline_run(pair):
    _, _, compiled, _, written = pair
    fingerprint = compiled.graph.fingerprint()
    shared = {"backends": ["eager", "ort"], "fingerprint": fingerprint}
    for name, path in written.items():
        manifest = json.loads((path / "manifest.json").read_text())
        report = json.loads((path / "report.json").read_text())
        assert manifest["one_pipeline"] == report["one_pipeline"] == shared
        assert report["fingerprint"] == fingerprint and report["backend"] == name
        assert report["passes"] == compiled[name].records  # the same pass run in both
        lowers = [row["phase"] for row in report["timing"] if row["phase"].startswith("lower")]
        assert lowers == [f"lower ({name})"]
        assert (
            f"lowered by eager, ort (one artifact each, same graph fingerprint {fingerprint})"
            in (path / "report.md").read_text()
        )


def test_single_backend_is_unchanged(tmp_path):
    compiled = peakc.compile(Tiny(), (torch.randn(2, 8),), backend="eager", pipeline="none")
    assert isinstance(compiled, peakc.api.Compiled)
    assert "one_pipeline" not in compiled.contents.report
    assert "one_pipeline" not in compiled.contents.extra_manifest


def test_backend_list_errors_name_the_backend():
    assert [b.name for b in get_backends(["eager", "ort{device=cpu}"])] == ["eager", "ort"]
    with pytest.raises(PeakcError, match="unknown backend 'nosuch'"):
        get_backends("eager,nosuch")
    with pytest.raises(PeakcError, match="backend 'ort' is named twice"):
        get_backends("ort,eager,ort{device=cpu}")
    with pytest.raises(PeakcError, match="backend 'ort': option 'cuda_graph'"):
        get_backends("eager,ort{cuda_graph=2}")


def test_cli_refuses_to_replace_a_folder_that_is_not_artifacts(pair, tmp_path, capsys):
    _, _, compiled, _, _ = pair
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PeakcError, match="already exists"):
        compiled.save(tmp_path / "mine")
    with pytest.raises(PeakcError, match="not a peakc artifact"):
        compiled.save(tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    argv = ["compile", "demo:mlp", "-o", str(tmp_path / "x"), "--backend", "eager,eager"]
    assert main(argv) == 2
    assert "backend 'eager' is named twice" in capsys.readouterr().err


def test_bench_prints_artifacts_side_by_side(pair, capsys):
    _, _, _, _, written = pair
    assert main(["bench", str(written["eager"]), str(written["ort"]), "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[0].split(), lines[1]
    assert header == ["phase", "artifact", str(written["eager"]), "artifact", str(written["ort"])]
    assert row.startswith("forward, batch 3 (ms)") and len(row.split()) == 4 + 2 * 2
    assert lines[2].startswith("median (p90) over 2 repeats on cpu")
    argv = ["bench", str(written["eager"]), str(written["ort"]), "--repeats", "1", "--json"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["target"] for r in results] == [f"artifact {p}" for p in written.values()]
    assert all(r["forward_ms"]["median"] > 0 for r in results)


def test_side_by_side_rows_are_phases_per_batch():
    from peakc.runtime.bench import format_side_by_side

    def run(target, batch, prefill, decode):
        return {
            "target": target,
            "device": "cpu",
            "batch": batch,
            "prompt_len": 4,
            "gen_len": 2,
            "repeats": 3,
            "prefill_ms": {"median": prefill, "p90": prefill},
            "decode_ms_per_step": {"median": decode, "p90": decode},
        }

    results = [run("A", 1, 2.0, 0.5), run("A", 8, 9.0, 0.75), run("B", 1, 1.0, 0.25)]
    lines = format_side_by_side(results).splitlines()
    assert [line.split("  ")[0].strip() for line in lines[1:-1]] == [
        "prefill, batch 1 (ms)",
        "prefill, batch 8 (ms)",
        "decode step, batch 1 (ms)",
        "decode step, batch 8 (ms)",
    ]
    assert lines[3].split()[-4:] == ["0.500", "(0.500)", "0.250", "(0.250)"]
    assert lines[4].split()[-3:] == ["0.750", "(0.750)", "-"]  # B ran batch 1 only
    assert lines[-1] == "median (p90) over 3 repeats on cpu; prompt 4, generate 2"
