"""Hugging Face sources: a local model folder (`hf:PATH`) or a GGUF file (`gguf:PATH`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from peakc.errors import PeakcError

EXAMPLE_SEQ_LEN = 16


class CausalLMLogits(torch.nn.Module):
    """Forward returns only the logits; children keep the HF model's module paths."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "hf_model", hf_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=input_ids, use_cache=False, return_dict=True).logits


def _require_transformers(spec: str):
    try:
        import transformers
    except ImportError:
        raise PeakcError(f"model '{spec}' needs transformers: pip install 'peakc[hf]'") from None
    return transformers


def load_hf(spec: str, path_text: str, gguf: bool) -> ModelSource:  # noqa: F821
    from peakc.models import ModelSource

    path = Path(path_text)
    if gguf:
        if not path.is_file():
            raise PeakcError(f"model '{spec}': GGUF file not found: {path}")
    elif not (path / "config.json").is_file():
        raise PeakcError(
            f"model '{spec}': {path} is not a Hugging Face model folder (no config.json)"
        )
    transformers = _require_transformers(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        if gguf:
            kwargs = {"gguf_file": path.name}
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), dtype=torch.float32, **kwargs
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32
            )
            tokenizer = _optional_tokenizer(transformers, path)
    except PeakcError:
        raise
    except Exception as exc:
        raise PeakcError(f"model '{spec}': transformers could not load it: {exc}") from exc
    model.eval()
    model.config.use_cache = False
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, EXAMPLE_SEQ_LEN), generator=torch.Generator().manual_seed(0))
    source = ModelSource(spec, CausalLMLogits(model), (ids,))
    source.tokenizer_files = _tokenizer_files(tokenizer)
    source.native_dtype = gguf_dtype(path) if gguf else config_dtype(path)
    return source


def config_dtype(folder: Path) -> str:
    """The dtype a Hugging Face folder's config.json declares (`dtype`, formerly
    `torch_dtype`); float32 when it declares none."""
    import json

    config = json.loads((folder / "config.json").read_text())
    declared = config.get("dtype") or config.get("torch_dtype") or "float32"
    return declared if declared in ("float32", "bfloat16", "float16") else "float32"


def gguf_dtype(path: Path) -> str:
    """The float dtype a GGUF file's weights come closest to: float32 or float16 when every
    tensor is stored so, bfloat16 when any is bfloat16 or quantized (4-bit blocks and the like
    dequantize to more precision than they hold, and bf16 keeps float32's range)."""
    from gguf import GGUFReader

    kinds = {tensor.tensor_type.name for tensor in GGUFReader(str(path)).tensors}
    if kinds <= {"F32"}:
        return "float32"
    if kinds <= {"F32", "F16"}:
        return "float16"
    return "bfloat16"


def _optional_tokenizer(transformers, path: Path):
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception:
        return None


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer's saved files, for the artifact's `tokenizer/` folder."""
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {
            f"tokenizer/{p.name}": p.read_bytes()
            for p in sorted(Path(tmp).iterdir())
            if p.is_file()
        }
