"""Greedy generation from a SmolLM2-135M artifact equals transformers' own generate."""

import pytest
import torch

import peakc
from peakc.cli import main
from peakc.runtime.generate import Generator, SamplingConfig

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


@pytest.mark.slow
def test_greedy_tokens_match_transformers(tmp_path, smollm2_gguf, capsys):
    gguf = smollm2_gguf
    out = tmp_path / "smol"
    argv = [
        "compile",
        f"gguf:{gguf}",
        "-o",
        str(out),
        "--task",
        "generate",
        "--max-seq-len",
        "128",
        "--max-batch",
        "4",
        "--no-parity",
        "--dtype",
        "float32",
    ]  # transformers' reference below runs in float32
    assert main(argv) == 0
    generator = Generator.from_artifact(peakc.load(out), "cpu")
    tokenizer = generator.tokenizer
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    ours = generator.generate(encoded, SamplingConfig(max_new_tokens=32)).tokens

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        theirs = model.generate(
            **batch,
            max_new_tokens=32,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )
    width = batch.input_ids.shape[1]
    for i, tokens in enumerate(ours):
        assert tokens == theirs[i, width:].tolist(), f"prompt {i} differs"

    # The CLI needs nothing but the artifact: its tokenizer turns text into tokens and back.
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", PROMPTS[0], "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(PROMPTS[0]) and len(captured.out) > len(PROMPTS[0]) + 2
    expected = PROMPTS[0] + tokenizer.decode(ours[0][:8], skip_special_tokens=True)
    assert captured.out.strip() == expected.strip()
    assert "tokens/s on cpu" in captured.err
