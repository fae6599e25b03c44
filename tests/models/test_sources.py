"""Model sources: hf: on a random-config Llama folder, gguf: on the real SmolLM2 file."""

import json

import pytest
import torch

import peakc
from peakc.cli import main
from peakc.errors import PeakcError
from peakc.models import load_source

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(directory)
    return directory


def test_hf_folder_compiles_and_matches_transformers(tiny_llama_dir, tmp_path):
    out = tmp_path / "art"
    assert main(["compile", f"hf:{tiny_llama_dir}", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][1]["stats"]["fused.rms_norm"] == 5
    artifact = peakc.load(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(artifact(ids)[0], expected, rtol=1e-5, atol=1e-5)
    weights = set(artifact.weights)
    assert "model.layers.1.mlp.down_proj.weight" in weights


def test_py_source_errors():
    with pytest.raises(PeakcError, match="cannot import module 'no_such_module_xyz'"):
        load_source("py:no_such_module_xyz:build")
    with pytest.raises(PeakcError, match="has no function 'nope'"):
        load_source("py:peakc.models.demo:nope")
    with pytest.raises(PeakcError, match=r"must return \(nn.Module, example_inputs\)"):
        load_source("py:peakc.models.demo:LlamaConfig")


def test_gguf_dtype_is_the_files_own(smollm2_gguf, tiny_llama_dir):
    """--dtype auto: a quantized GGUF (Q4_1 blocks) comes out bfloat16, a folder as declared."""
    from peakc.models.hf import config_dtype, gguf_dtype

    assert gguf_dtype(smollm2_gguf) == "bfloat16"
    assert config_dtype(tiny_llama_dir) == "float32"


@pytest.mark.slow
def test_gguf_smollm2_compiles_and_runs(tmp_path, smollm2_gguf):
    gguf = smollm2_gguf
    out = tmp_path / "smol"
    assert main(["compile", f"gguf:{gguf}", "-o", str(out), "--no-parity"]) == 0
    artifact = peakc.load(out)
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][1]["stats"]["fused.rms_norm"] == 61  # 2 per layer x 30 + final
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    ids = torch.nn.functional.pad(ids, (16 - ids.shape[1], 0), value=tokenizer.eos_token_id or 0)
    (logits,) = artifact(ids)
    assert logits.shape == (1, 16, 49152) and torch.isfinite(logits).all()


def test_compile_takes_a_model_source_whole(tmp_path):
    """peakc.compile(source): the source's inputs, dynamic dims and cache layout come along
    (a generation artifact); passing them again beside it is an error."""
    from peakc.models import load_source_for_task

    source = load_source_for_task("demo:llama", "generate", 32, 2, "float32")
    compiled = peakc.compile(source, backend="eager")
    artifact = peakc.load(compiled.save(tmp_path / "art"))
    assert artifact.manifest["generation"]["max_seq_len"] == 32
    with pytest.raises(PeakcError, match="ModelSource carries"):
        peakc.compile(source, source.example_inputs)
