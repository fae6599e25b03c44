"""`peakc passes` and `peakc backends`: options with types, choices and defaults, wrapped to
the terminal's width; one pass or backend in full by name."""

import pytest

from peakc.cli import main


def test_passes_shows_choices_and_whole_descriptions(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "rules: str = all" in out
    assert "method: magnitude|sparsegpt = sparsegpt" in out  # a Literal shows its choices
    assert "sparsity_profile: uniform|owl|sensitivity = uniform" in out
    assert "kernel: auto|torch|triton = auto" in out and "sym: bool = false" in out
    assert "sensitivity profile)." in out  # prune's description, not cut mid-sentence


def test_passes_wraps_to_the_terminal_width(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "72")
    assert main(["passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and max(len(line) for line in lines) <= 72
    # the description column, read top to bottom, holds prune's whole first paragraph
    cells = [line.split("│") for line in lines if line.count("│") == 4]
    described = " ".join(" ".join(cell[3].split()) for cell in cells if cell[3].strip())
    assert "uniform, OWL or sensitivity profile)." in described


def test_one_pass_in_full(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    assert main(["passes", "prune"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pass prune\n")
    assert "Prune linear layers (magnitude or SparseGPT" in out
    for option in ("method", "sparsity_profile", "owl_shape", "sensitivity_nsamples"):
        assert f"\n{option} " in out
    assert "magnitude|sparsegpt" in out and "uniform|owl|sensitivity" in out
    assert "0: the graph's captured sequence length" in out  # the field's comment
    assert "quantize" not in out.split("\n", 1)[0]


def test_unknown_pass_is_one_line(capsys):
    assert main(["passes", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peakc: error: unknown pass 'nosuch' (known: ") and "\n" not in err


def _backends_have_options() -> bool:
    from peakc.backends.base import load_builtin_backends

    try:
        backends = load_builtin_backends()
    except Exception:
        return False
    return all(hasattr(cls, "Options") for cls in backends.values())


def test_backends_lists_every_backend_with_options(capsys, monkeypatch):
    if not _backends_have_options():
        pytest.skip("backends without typed Options")
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "eager" in out and "ort" in out
    assert "device: " in out  # ort's options, in the passes' format
    assert main(["backends", "ort"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backend ort\n") and "\ndevice " in out
    assert main(["backends", "tpu"]) == 2
    assert "unknown backend 'tpu'" in capsys.readouterr().err
