"""`peakc compile`'s output: a progress line per phase and pass with its time, the report's
timing table over the whole compile, and predicted costs before and after a pass."""

import json
import textwrap

import pytest

from peakc.cli import main

COST_PASS = textwrap.dedent('''
    """A plug-in pass that records the predicted cost before and after, as prune does."""
    from dataclasses import dataclass

    import peakc


    @dataclass
    class NoOptions:
        pass


    @peakc.register_pass
    class RecordCost(peakc.Pass):
        """Change nothing; record the cost model's prediction around it."""

        name = "record_cost"
        Options = NoOptions

        def run(self, graph, ctx):
            cost = ctx.cost.phases(graph).to_dict()
            report = {"cost": {"before": cost, "after": cost}}
            return peakc.PassResult(graph, modified=False, report=report)
''')


def test_phases_and_timing_cover_the_compile(tmp_path, capsys):
    out = tmp_path / "mlp"
    assert main(["compile", "demo:mlp", "-o", str(out), "--pipeline", "cleanup,fuse"]) == 0
    err = capsys.readouterr().err
    for line in ("load demo:mlp", "capture", "pass 1: cleanup", "pass 2: fuse", "lower (eager)"):
        assert line in err
    assert "save" in err and "compiled in" in err
    report = json.loads((out / "report.json").read_text())
    phases = [row["phase"] for row in report["timing"]]
    assert phases[:2] == ["load", "capture"]
    assert {"pass cleanup", "pass fuse", "lower (eager)", "save"} <= set(phases)
    assert phases[-1] == "save"
    total = sum(row["seconds"] for row in report["timing"])
    assert report["total_seconds"] == pytest.approx(total, abs=1e-3)
    md = (out / "report.md").read_text()
    assert "## time" in md and "| save |" in md and "| **total** |" in md


def test_predicted_cost_before_and_after(tmp_path, capsys):
    plugin = tmp_path / "record_cost.py"
    plugin.write_text(COST_PASS)
    out = tmp_path / "llama"
    argv = ["compile", "demo:llama", "-o", str(out), "--plugin", str(plugin)]
    assert main([*argv, "--pipeline", "record_cost", "--target", "h200"]) == 0
    err = capsys.readouterr().err
    assert "predicted on h200" in err and "prefill" in err and " ms" in err and " MB" in err
    report = json.loads((out / "report.json").read_text())
    cost = report["passes"][0]["report"]["cost"]
    assert cost["before"]["target"] == "h200"
    md = (out / "report.md").read_text()
    assert "## predicted cost on h200" in md
    row = next(line for line in md.splitlines() if line.startswith("| `record_cost` | prefill"))
    ms = cost["before"]["prefill"]["ms"]
    assert f"| {ms:.3f} | {ms:.3f} |" in row
