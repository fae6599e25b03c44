"""Start-up: `peakc --help` and building the parser import neither torch nor transformers nor
onnx, and Ctrl-C at any moment is one line and exit code 130, never a traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest

from peakc.cli import main


def test_help_starts_fast_without_torch():
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "peakc.cli", "--help"], capture_output=True)
    seconds = time.perf_counter() - started
    assert run.returncode == 0 and b"compile" in run.stdout
    assert seconds < 2.0, f"peakc --help took {seconds:.2f} s"


def test_cli_imports_no_heavy_module():
    code = (
        "import sys, peakc, peakc.cli\n"
        "peakc.cli.build_parser().parse_args(['passes'])\n"
        "heavy = ('torch', 'transformers', 'onnx', 'onnxruntime')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


def test_passes_lists_every_pass_fast_without_torch():
    """`peakc passes` imports the pass declarations only (0.4 s on a 2-core machine; the bound
    is generous for a busy one): the solvers, torch and the cost model load when a pass runs."""
    code = (
        "import sys, time\n"
        "started = time.perf_counter()\n"
        "from peakc.cli import main\n"
        "assert main(['passes']) == 0\n"
        "heavy = ('torch', 'transformers', 'onnx', 'scipy', 'networkx')\n"
        "print('heavy:', ','.join(m for m in heavy if m in sys.modules))\n"
        "print('seconds:', time.perf_counter() - started)\n"
    )
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert run.returncode == 0, run.stderr
    assert "heavy: \n" in run.stdout and "quantize" in run.stdout and "prune" in run.stdout
    assert seconds < 2.5, f"peakc passes took {seconds:.2f} s"


def test_inspect_reads_the_manifest_without_torch(tmp_path):
    out = tmp_path / "mlp"
    assert main(["compile", "demo:mlp", "-o", str(out), "--pipeline", "none"]) == 0
    code = (
        "import sys\n"
        "from peakc.cli import main\n"
        f"assert main(['inspect', {str(out)!r}]) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "checksums verified" in run.stdout and run.stdout.strip().endswith("False")


def test_lazy_public_names():
    import peakc

    assert peakc.compile.__module__ == "peakc.api" and peakc.Pipeline.__name__ == "Pipeline"
    assert peakc.ir.Graph.__name__ == "Graph"
    with pytest.raises(AttributeError):
        peakc.nosuch  # noqa: B018


def test_interrupt_while_parsing_or_importing_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("peakc.cli.build_parser", interrupted)
    assert main(["passes"]) == 130
    assert capsys.readouterr().err == "peakc: interrupted\n"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_ctrl_c_during_imports_prints_no_traceback(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "peakc.cli", "compile", "demo:mlp", "-o", str(tmp_path / "x")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # past the interpreter's start, inside torch's import or the compile
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    assert proc.returncode in (130, 0), err  # 0: it finished before the signal came
