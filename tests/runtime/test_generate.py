"""Generation: capture with a KV cache, prefill + decode, sampling, limits, the CLI."""

import json

import pytest
import torch

import peakc
from peakc.cli import main
from peakc.errors import PeakcError
from peakc.models import load_source_for_task
from peakc.models.demo import demo_llama
from peakc.runtime.generate import Generator, SamplingConfig, sample


@pytest.fixture(scope="module")
def gen_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "llama"
    argv = [
        "compile",
        "demo:llama",
        "-o",
        str(out),
        "--task",
        "generate",
        "--max-seq-len",
        "48",
        "--max-batch",
        "3",
    ]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def generator(gen_artifact):
    return Generator.from_artifact(peakc.load(gen_artifact), "cpu")


def greedy_by_recompute(model, prompt, steps):
    """Reference: re-run the whole sequence through the plain model for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_manifest_records_program_and_limits(gen_artifact):
    manifest = json.loads((gen_artifact / "manifest.json").read_text())
    program = manifest["programs"]["decoder"]
    assert program["inputs"][0]["shape"] == ["batch", "seq"]
    assert program["dynamic"]["dims"] == {"batch": [1, 3], "seq": [1, 48]}
    # Prefill and decode: two programs from one transformed graph, sharing the weights file.
    assert list(manifest["programs"]) == ["decoder", "decode_step"]
    step = manifest["programs"]["decode_step"]
    assert step["inputs"][0]["shape"] == ["batch", 1]
    assert step["outputs"][0]["shape"] == ["batch", 1, 256]
    assert step["weights"] == program["weights"]
    assert step["dynamic"]["dims"] == {"batch": [1, 3]}
    assert manifest["generation"]["max_seq_len"] == 48
    assert manifest["generation"]["num_layers"] == 2
    report = json.loads((gen_artifact / "report.json").read_text())
    assert report["ops"]["attention_cache"] == "reference"
    assert report["passes"][1]["stats"]["fused.rms_norm"] == 5


def test_zero_cache_is_described_not_stored(gen_artifact, tmp_path):
    """The example KV cache is all zeros: the manifest gives its dtype and shape, the inputs
    file holds only ids and positions, and load/run rebuild the same inputs and outputs."""
    from safetensors.torch import load_file

    manifest = json.loads((gen_artifact / "manifest.json").read_text())
    source = load_source_for_task("demo:llama", "generate", 48, 3)
    ids, positions, k_cache, v_cache = source.example_inputs
    assert set(load_file(str(gen_artifact / "inputs.safetensors"))) == {"input_0", "input_1"}
    assert manifest["zero_inputs"] == {
        "input_2": {"dtype": "float32", "shape": list(k_cache.shape)},
        "input_3": {"dtype": "float32", "shape": list(v_cache.shape)},
    }
    assert "inputs.safetensors" in manifest["files"]  # still checksummed
    loaded = peakc.load(gen_artifact)
    for got, want in zip(loaded.example_inputs, source.example_inputs, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    with torch.no_grad():
        want = source.module(*source.example_inputs)
    for got, expected in zip(loaded(), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert main(["run", str(gen_artifact), "--output", str(tmp_path / "o.safetensors")]) == 0
    outputs = load_file(str(tmp_path / "o.safetensors"))
    torch.testing.assert_close(outputs["output_0"], want[0], rtol=1e-5, atol=1e-5)


def test_greedy_equals_full_recompute(generator):
    model, _ = demo_llama()
    prompts = [[5, 17, 99, 3, 250, 7], [42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    result = generator.generate(prompts, SamplingConfig(max_new_tokens=12))
    for prompt, tokens in zip(prompts, result.tokens):
        assert tokens == greedy_by_recompute(model, prompt, 12)
    # The batch (prompts of different lengths) gives what each prompt gives alone.
    alone = generator.generate([prompts[1]], SamplingConfig(max_new_tokens=12)).tokens[0]
    assert alone == result.tokens[1]


def test_stop_tokens_and_streaming(generator):
    first = generator.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=8)).tokens[0]
    stop = first[3]
    seen = []
    result = generator.generate(
        [[5, 6, 7], [9, 9]], SamplingConfig(max_new_tokens=8, stop_tokens=(stop,)), seen.append
    )
    assert result.tokens[0] == first[: first.index(stop) + 1]
    assert [step[0] for step in seen if step[0] is not None] == result.tokens[0]
    assert all(len(step) == 2 for step in seen)


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(4, 50)
    config = SamplingConfig(temperature=0.8, top_k=3, seed=1)
    draws = [sample(logits, config, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    top3 = logits.topk(3).indices
    for _ in range(20):
        tokens = sample(logits, config, None)
        assert all(int(t) in top3[i].tolist() for i, t in enumerate(tokens))
    nucleus = SamplingConfig(temperature=1.0, top_p=1e-6)
    assert torch.equal(sample(logits, nucleus, None), logits.argmax(-1))


def test_sampled_generation_reproducible(generator):
    config = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    a = generator.generate([[1, 2, 3]], config).tokens
    b = generator.generate([[1, 2, 3]], config).tokens
    assert a == b


@pytest.mark.parametrize(
    ("prompts", "new", "message"),
    [
        ([[1] * 40], 10, "prompt 0 has 40 tokens; with 10 new tokens it exceeds the cache of 48"),
        ([[]], 4, "prompt 0 is empty"),
        ([[1], [2], [3], [4]], 4, "batch of 4 prompts exceeds the captured limit 3"),
        ([], 4, "no prompts given"),
    ],
)
def test_bad_requests(generator, prompts, new, message):
    with pytest.raises(PeakcError, match=message):
        generator.generate(prompts, SamplingConfig(max_new_tokens=new))


def test_text_needs_tokenizer(generator, gen_artifact, capsys):
    with pytest.raises(PeakcError, match="has no tokenizer"):
        generator.generate_text(["hello"], SamplingConfig())
    assert main(["generate", str(gen_artifact), "--prompt", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_forward_artifact_cannot_generate(tmp_path, capsys):
    out = tmp_path / "fwd"
    assert main(["compile", "demo:mlp", "-o", str(out)]) == 0
    assert main(["generate", str(out), "--prompt", "hi"]) == 2
    assert "no decoder program: compile it with --task generate" in capsys.readouterr().err


def test_unsupported_architecture_is_named():
    with pytest.raises(PeakcError, match="generation capture supports model types"):
        load_source_for_task("demo:mlp", "generate")


def test_bench_json(gen_artifact, capsys):
    argv = [
        "bench",
        str(gen_artifact),
        "--batch",
        "2",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--repeats",
        "2",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch"] == 2 and result["decode_tokens_per_s"] > 0
    assert result["prefill_ms"]["median"] > 0
    source = [
        "bench",
        "demo:llama",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--repeats",
        "2",
        "--json",
    ]
    assert main(source) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "eager demo:llama" and result["decode_tokens_per_s"] > 0


def test_pruned_decoder_generates(tmp_path):
    """Calibrating passes run on the decoder program (prefill windows from an empty cache)."""
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    out = tmp_path / "pruned"
    argv = [
        "compile",
        "demo:llama",
        "-o",
        str(out),
        "--task",
        "generate",
        "--max-seq-len",
        "48",
        "--max-batch",
        "2",
        "--calib-data",
        str(text),
        "--pipeline",
        "prune{method=sparsegpt,sparsity=0.5,nsamples=4,seq_len=24},cleanup,fuse",
    ]
    assert main(argv) == 0
    artifact = peakc.load(out)
    assert artifact.manifest["sparsity"]["model.layers.0.mlp.down_proj"]["sparsity"] == 0.5
    weight = artifact.weights["model.layers.1.self_attn.o_proj.weight"]
    assert (weight == 0).float().mean().item() == 0.5
    tokens = (
        Generator.from_artifact(artifact, "cpu")
        .generate([[3, 4, 5]], SamplingConfig(max_new_tokens=6))
        .tokens
    )
    assert len(tokens[0]) == 6


def test_quantized_decoder_generates(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    out = tmp_path / "q4"
    argv = [
        "compile",
        "demo:llama",
        "-o",
        str(out),
        "--task",
        "generate",
        "--max-seq-len",
        "48",
        "--max-batch",
        "2",
        "--calib-data",
        str(text),
        "--pipeline",
        "quantize{method=gptq,bits=4,group_size=16,nsamples=4,seq_len=24},fuse",
    ]
    assert main(argv) == 0
    artifact = peakc.load(out)
    report = json.loads((out / "report.json").read_text())
    assert report["ops"]["linear_wq"] == "reference"
    tokens = (
        Generator.from_artifact(artifact, "cpu")
        .generate([[3, 4, 5], [9]], SamplingConfig(max_new_tokens=6))
        .tokens
    )
    assert [len(t) for t in tokens] == [6, 6]
