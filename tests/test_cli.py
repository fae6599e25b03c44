"""The command line: the README's main job, and every bad input as a one-line error, exit 2."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peakc.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "llama"
    assert main(["compile", "demo:llama", "-o", str(out)]) == 0
    return out


def test_compile_run_inspect(compiled, capsys, tmp_path):
    capsys.readouterr()
    assert main(["run", str(compiled), "--output", str(tmp_path / "o.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "output_0: float32[1, 16, 256]" in out
    assert (tmp_path / "o.safetensors").is_file()
    assert main(["inspect", str(compiled)]) == 0
    out = capsys.readouterr().out
    assert "pipeline   cleanup,fuse" in out and "fused.rms_norm=5" in out
    assert main(["inspect", str(compiled), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["manifest"]["backend"] == "eager"


def test_run_with_input_file(compiled, capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"input_0": torch.arange(16).reshape(1, 16)}, str(tmp_path / "in.safetensors"))
    assert main(["run", str(compiled), "--input", str(tmp_path / "in.safetensors")]) == 0
    assert "output_0" in capsys.readouterr().out


def test_passes_lists_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup" in out and "fuse" in out and "rules: str = all" in out


def test_plugin_pass_through_cli(tmp_path, capsys):
    out = tmp_path / "custom"
    plugin = ROOT / "examples" / "custom_pass.py"
    args = [
        "compile",
        "demo:llama",
        "-o",
        str(out),
        "--plugin",
        str(plugin),
        "--pipeline",
        "cleanup,count_ops{fold_mul_one=true},fuse",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][1]["name"] == "count_ops"
    assert report["passes"][1]["stats"]["ops.linear.default"] == 15
    assert main(["passes", "--plugin", str(plugin)]) == 0
    assert "count_ops" in capsys.readouterr().out


def test_py_source_and_dump_ir(tmp_path):
    model_file = tmp_path / "mymodel.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch

        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), (torch.randn(2, 8),)
    """)
    )
    dump = tmp_path / "ir"
    out = tmp_path / "o"
    assert main(["compile", f"py:{model_file}:build", "-o", str(out), "--dump-ir", str(dump)]) == 0
    assert (dump / "000_captured.txt").is_file() and (dump / "002_fuse.txt").is_file()


BAD_INPUTS = [
    (["compile", "demo:llama", "-o", "{tmp}/x", "--pipeline", "nosuch"], "unknown pass 'nosuch'"),
    (
        ["compile", "demo:llama", "-o", "{tmp}/x", "--pipeline", "fuse{color=red}"],
        "pass 'fuse' has no option 'color'",
    ),
    (
        ["compile", "demo:llama", "-o", "{tmp}/x", "--pipeline", "cleanup,{"],
        "malformed pipeline spec at column 9",
    ),
    (["compile", "gguf:{tmp}/missing.gguf", "-o", "{tmp}/x"], "GGUF file not found"),
    (["compile", "hf:{tmp}", "-o", "{tmp}/x"], "is not a Hugging Face model folder"),
    (["compile", "demo:nosuch", "-o", "{tmp}/x"], "unknown demo"),
    (["compile", "weird", "-o", "{tmp}/x"], "expected KIND:VALUE"),
    (["compile", "demo:mlp", "-o", "{tmp}/x", "--target", "tpu-v9"], "unknown target 'tpu-v9'"),
    (["run", "{tmp}/nothing"], "artifact folder not found"),
    (["run", "{tmp}", "--input", "{tmp}/none.safetensors"], "manifest.json is missing"),
    (
        ["compile", "demo:mlp", "-o", "{tmp}/x", "--plugin", "{tmp}/none.py"],
        "plug-in file not found",
    ),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("peakc: error: ")
    assert not (tmp_path / "x").exists()


def test_unexportable_model(tmp_path, capsys):
    model_file = tmp_path / "bad.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch

        class Bad(torch.nn.Module):
            def forward(self, x):
                return x.nonzero().sum() if x.sum() > 0 else x

        def build():
            return Bad(), (torch.randn(4),)
    """)
    )
    assert main(["compile", f"py:{model_file}:build", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cannot export py:" in err and "bad.py:6 in forward" in err
    assert not (tmp_path / "x").exists()


def test_existing_output_needs_force(compiled, capsys):
    assert main(["compile", "demo:llama", "-o", str(compiled)]) == 2
    assert "already exists (use --force" in capsys.readouterr().err


def test_tampered_artifact_via_cli(compiled, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(compiled, copy)
    (copy / "report.md").write_text("edited")
    assert main(["run", str(copy)]) == 2
    assert "report.md was changed" in capsys.readouterr().err
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(copy)]) == 2
    assert "format version 2" in capsys.readouterr().err


def test_failing_pass_leaves_reproducer_not_artifact(tmp_path, capsys):
    plugin = tmp_path / "boom.py"
    plugin.write_text(
        textwrap.dedent('''
        import peakc

        @peakc.register_pass
        class Boom(peakc.Pass):
            """Fails."""
            name = "boom"

            def run(self, graph, ctx):
                raise ValueError("no good")
    ''')
    )
    out = tmp_path / "out"
    argv = [
        "compile",
        "demo:mlp",
        "-o",
        str(out),
        "--plugin",
        str(plugin),
        "--pipeline",
        "cleanup,boom,fuse",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pass 'boom' (#2) failed after [cleanup]: no good" in err
    assert not out.exists()
    repro = tmp_path / "out.reproducer"
    assert (repro / "pipeline.txt").read_text().strip() == "boom,fuse"
    # The reproducer's program compiles again from the artifact: source.
    assert (
        main(
            [
                "compile",
                f"artifact:{repro / 'program'}",
                "-o",
                str(tmp_path / "again"),
                "--pipeline",
                "fuse",
            ]
        )
        == 0
    )


def test_console_script_and_debug(tmp_path):
    """The installed entry point: exit code 2 and one line; --debug shows the traceback."""
    base = [sys.executable, "-m", "peakc.cli"]
    plain = subprocess.run(
        [*base, "compile", "demo:mlp", "-o", str(tmp_path / "x"), "--pipeline", "nosuch"],
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 2
    assert (
        plain.stderr.strip().splitlines() == [plain.stderr.strip()]
        and "Traceback" not in plain.stderr
    )
    debug = subprocess.run(
        [
            *base,
            "--debug",
            "compile",
            "demo:mlp",
            "-o",
            str(tmp_path / "x"),
            "--pipeline",
            "nosuch",
        ],
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
