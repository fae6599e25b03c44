"""Calibration and evaluation text → token windows; perplexity; the eval command."""

import math

import pytest
import torch
import torch.nn.functional as F

import peakc
from peakc.cli import main
from peakc.data import (
    ByteTokenizer,
    TokenText,
    consecutive_windows,
    load_token_text,
    random_windows,
    with_sequence_length,
)
from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.models.demo import demo_llama
from peakc.runtime.evaluate import perplexity


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world. " * 40)
    (tmp_path / "docs" / "b.txt").write_text("déjà vu " * 30)
    return tmp_path / "docs"


def test_folder_is_read_sorted_and_byte_tokenized(corpus):
    text = load_token_text(corpus, ByteTokenizer(256))
    expected = ("hello world. " * 40 + "\n\n" + "déjà vu " * 30 + "\n\n").encode()
    assert text.tokens.tolist() == list(expected)
    assert load_token_text(corpus, ByteTokenizer(100)).tokens.max() < 100


def test_random_windows_are_seeded_slices(corpus):
    text = load_token_text(corpus, ByteTokenizer(256))
    a = random_windows(text, 5, 32, seed=3)
    assert a.shape == (5, 32) and torch.equal(a, random_windows(text, 5, 32, seed=3))
    assert not torch.equal(a, random_windows(text, 5, 32, seed=4))
    joined = bytes(text.tokens.tolist())
    assert all(bytes(w.tolist()) in joined for w in a)


def test_too_short_text_is_a_clear_error(corpus):
    text = TokenText(torch.arange(10), "tiny.txt", "bytes")
    with pytest.raises(
        PeakcError, match="tiny.txt has 10 tokens, fewer than one window of seq_len=16"
    ):
        random_windows(text, 4, 16)
    with pytest.raises(PeakcError, match="fewer than one window"):
        consecutive_windows(text, 16)
    with pytest.raises(PeakcError, match="not found"):
        load_token_text(corpus / "missing", ByteTokenizer(256))


def test_consecutive_windows_do_not_overlap():
    text = TokenText(torch.arange(100), "t", "bytes")
    w = consecutive_windows(text, 16)
    assert w.shape == (6, 16) and torch.equal(w.flatten(), torch.arange(96))
    assert consecutive_windows(text, 16, limit=2).shape == (2, 16)


def test_perplexity_matches_a_direct_computation():
    model, inputs = demo_llama(seed=0, hidden_size=32, intermediate_size=48, num_heads=2)
    graph = capture(model, with_sequence_length(inputs, 20))
    windows = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = torch.cat([model(w[None]) for w in windows])
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1))
    result = perplexity(graph, windows)
    assert result.tokens == 57 and math.isclose(result.ppl, math.exp(float(nll)), rel_tol=1e-5)


@pytest.mark.parametrize(
    "backend,pipeline,rel",
    [("eager", "none", 1e-5), ("ort", "default", 1e-4)],  # ort: ONNX, its own session
)
def test_eval_command_same_for_source_and_artifact(
    corpus, tmp_path, capsys, backend, pipeline, rel
):
    model, inputs = demo_llama()
    compiled = peakc.compile(
        model, with_sequence_length(inputs, 32), pipeline=pipeline, backend=backend
    )
    compiled.save(tmp_path / "art")
    assert main(["eval", "demo:llama", "--ppl", str(corpus), "--seq-len", "32"]) == 0
    source_line = capsys.readouterr().out
    assert main(["eval", str(tmp_path / "art"), "--ppl", str(corpus)]) == 0
    artifact_line = capsys.readouterr().out
    ppl = [float(line.split("perplexity ")[1].split()[0]) for line in (source_line, artifact_line)]
    assert "windows of 32 tokens" in artifact_line and ppl[0] == pytest.approx(ppl[1], rel=rel)
    assert main(["eval", str(tmp_path / "art"), "--ppl", str(corpus), "--seq-len", "16"]) == 2
    assert "captured at sequence length 32, not 16" in capsys.readouterr().err


def test_compile_with_calib_data_prunes(corpus, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(
        [
            "compile",
            "demo:llama",
            "-o",
            str(out),
            "--seq-len",
            "32",
            "--calib-data",
            str(corpus),
            "--pipeline",
            "prune{nsamples=4}",
        ]
    )
    assert code == 0
    loaded = peakc.load(out)
    assert loaded.example_inputs[0].shape == (1, 32)
    assert loaded.manifest["sparsity"]["model.layers.0.mlp.up_proj"]["sparsity"] == 0.5


def test_with_sequence_length_tiles_ids():
    ids = torch.arange(5)[None]
    assert with_sequence_length((ids,), 12)[0].tolist() == [[0, 1, 2, 3, 4] * 2 + [0, 1]]
