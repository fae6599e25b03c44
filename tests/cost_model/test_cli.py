"""`peakc estimate`: JSON output, tables, plot, and one-line errors."""

import json

import pytest

from peakc.cli import main


def test_estimate_json_on_demo_llama(capsys):
    assert main(["estimate", "demo:llama", "--json", "--batch", "2", "--seq", "32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == "h100-sxm"
    for phase in ("prefill", "decode"):
        est = data[phase]
        assert est["batch"] == 2 and est["seq"] == 32
        assert sum(b["time"] for b in est["blocks"]) == pytest.approx(est["total_time_s"])
        assert est["memory"]["kv_cache"] == 2 * 2 * 2 * 32 * 2 * 16 * 4
        assert est["top_nodes"] and est["kernels"] > 0
    assert data["prefill"]["total_flops"] > data["decode"]["total_flops"]


def test_estimate_tables_with_pipeline(capsys):
    assert main(["estimate", "demo:llama", "--pipeline", "fuse", "--target", "a100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "per block" in out and "model.layers.1" in out and "top 10 nodes" in out
    assert "prefill:" in out and "decode:" in out


def test_unknown_target_is_one_line(capsys):
    assert main(["estimate", "demo:llama", "--target", "tpu-v9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peakc: error: unknown target 'tpu-v9'") and "\n" not in err


def test_bad_profile_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "peak_flops": {"fp32": 1e12}}))
    assert main(["estimate", "demo:mlp", "--target", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing figure 'memory_bandwidth'" in err and "\n" not in err


def test_batch_on_a_non_token_model_is_refused(capsys):
    assert main(["estimate", "demo:mlp", "--batch", "4"]) == 2
    assert (
        "does not take token ids (batch, seq): --batch/--seq/--context cannot re-shape it"
        in capsys.readouterr().err
    )


def test_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "roofline.png"
    assert main(["estimate", "demo:llama", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_runtime_flag(capsys):
    assert main(["estimate", "demo:llama", "--json", "--runtime", "graph"]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert main(["estimate", "demo:llama", "--json"]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert graph["runtime"] == "graph" and eager["runtime"] == "eager"
    for phase in ("prefill", "decode"):
        assert graph[phase]["total_time_s"] == pytest.approx(graph[phase]["device_time_s"])
        assert eager[phase]["total_time_s"] > graph[phase]["total_time_s"]


def test_context_sets_the_decode_phase_only(capsys):
    assert main(["estimate", "demo:llama", "--json", "--seq", "16", "--context", "48"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prefill"]["seq"] == 16 and data["decode"]["seq"] == 48
