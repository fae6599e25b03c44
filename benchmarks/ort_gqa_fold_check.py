"""gqa_fold on a device (one command for the GPU machine): compile-time parity (prefill, first
prompt) with the fold on and off, then greedy tokens for prompts of different lengths in one
batch on the static decode programs (CUDA graphs on CUDA, batch 3) and on the dynamic decoder
(batch 2), compared with fold_rotary=false and with the eager backend. A tiny random
transformers Llama (head dim 64, like llama-1b), fp16 on CUDA, fp32 on the CPU.

    PYTHONPATH=$PWD:/tmp/ortsite python3 benchmarks/ort_gqa_fold_check.py cuda
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers

import peakc
from peakc.backends.ort.session import OrtProgram
from peakc.models import load_source_for_task
from peakc.runtime.generate import Generator, SamplingConfig

PROMPTS = {
    3: [[5, 17, 99, 3, 250, 7, 1, 4, 9, 11], [42, 8], [1, 2, 3, 4, 5]],
    2: [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16]],
}


def make_folder(work: Path) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(work / "hf")
    return work / "hf"


def run(device: str) -> None:
    dtype = "float16" if device == "cuda" else "float32"
    work = Path(tempfile.mkdtemp())
    folder = make_folder(work)
    config = SamplingConfig(max_new_tokens=16)
    graph = ",cuda_graph=true" if device == "cuda" else ""
    backends = {
        "eager": "eager",
        "fold": f"ort{{device={device}{graph},decode_batches=[1,3]}}",
        "nofold": f"ort{{device={device}{graph},decode_batches=[1,3],fold_rotary=false}}",
    }
    tokens, reports = {}, {}
    for name, backend in backends.items():
        source = load_source_for_task(f"hf:{folder}", "generate", 64, 3, dtype)
        compiled = peakc.compile(
            source,
            backend=backend,
        )
        if name != "eager":
            reports[name] = compiled.contents.report["ort"]
        artifact = peakc.load(compiled.save(work / name))
        layout = artifact.manifest["generation"]
        tokens[name, 3] = Generator.from_artifact(artifact, device).generate(PROMPTS[3], config)
        if name == "eager":
            step = Generator.from_artifact(artifact, device)
        else:  # no static program for batch 2, no CUDA graph: the dynamic decoder decodes
            program = OrtProgram(artifact.directory / "decoder.onnx", device, "false", None)
            step = Generator(program.cache_owning_step(layout), layout, device)
        tokens[name, 2] = step.generate(PROMPTS[2], config)
    for name, report in reports.items():
        print(f"{name}: compile parity {report['parity_rel_error']:.2e}, {report['gqa_fold']}")
    for batch in (3, 2):
        want = tokens["eager", batch].tokens
        for name in ("fold", "nofold"):
            got = tokens[name, batch].tokens
            same = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y))
            equal = got == tokens["nofold", batch].tokens
            print(
                f"batch {batch} {name}: {same}/{sum(map(len, want))} tokens equal eager; "
                f"all equal fold_rotary=false: {equal}"
            )


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "cuda")
