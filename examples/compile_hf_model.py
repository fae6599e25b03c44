"""Compile a local Hugging Face causal LM folder into an artifact and compare with transformers.

    python examples/compile_hf_model.py            # builds a small random Llama folder first
    python examples/compile_hf_model.py PATH OUT   # any local Llama-architecture folder

Nothing is downloaded: the default builds a tiny random-weight Llama with transformers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers

import peakc
from peakc.models import load_source


def tiny_llama_folder(directory: Path) -> Path:
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
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="peakc-example-"))
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else tiny_llama_folder(work / "tiny-llama")
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else work / "artifact"

    source = load_source(f"hf:{folder}")
    compiled = peakc.compile(
        source.module, source.example_inputs, pipeline="cleanup,fuse", source=f"hf:{folder}"
    )
    compiled.save(out)
    artifact = peakc.load(out)

    ids = source.example_inputs[0]
    (logits,) = artifact(ids)
    with torch.no_grad():
        reference = source.module(ids)
    err = (logits - reference).abs().max().item()
    print(f"artifact: {out}")
    passes = [r["pass"] for r in compiled.records]
    print(f"passes: {passes}, max |artifact - transformers| = {err:.2e}")


if __name__ == "__main__":
    main()
