"""Models and references for benchmarks/ort_backend.py: the Llama-shaped configs, the Hugging
Face folder every peer builds from (random weights, or SmolLM2-135M's real weights from its
GGUF file), the transformers model's own greedy decode (timed, with its tokens) and the
comparison of a peer's tokens with it, and GPU memory in use as the driver sees it."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

CONFIGS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=512),
    "diag": dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=512),
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152),
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256),
    "llama-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sync(device: str) -> float:
    """Wait for the device, then the host clock."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def gpu_used_bytes() -> int:
    """Bytes in use on the current GPU (all allocators: torch's, onnxruntime's), 0 without one."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return total - free


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def llama_config(name: str):
    """The transformers LlamaConfig of a named shape."""
    import transformers

    c = CONFIGS[name]
    return transformers.LlamaConfig(
        vocab_size=c["vocab"],
        hidden_size=c["hidden"],
        intermediate_size=c["ffn"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=name == "smollm2-135m",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def random_model(name: str, device: str, dtype: torch.dtype):
    """A LlamaForCausalLM with random weights, created directly on `device` in `dtype`."""
    import transformers

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(llama_config(name))
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def gguf_model(path: Path, name: str, device: str, dtype: torch.dtype):
    """The GGUF file's model, dequantized by transformers (in float32: in other dtypes it keeps
    the packed weights), copied into a plain LlamaForCausalLM (a GGUF-loaded model does not
    save) in `dtype` on `device`; its shape must be the named config's."""
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = type(loaded)(type(loaded.config).from_dict(settings))
    model.load_state_dict(loaded.state_dict())
    del loaded
    c, cfg = CONFIGS[name], model.config
    got = dict(
        hidden=cfg.hidden_size,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        ffn=cfg.intermediate_size,
        vocab=cfg.vocab_size,
    )
    if got != c:
        raise ValueError(f"{path.name}: shape {got} is not config {name}'s {c}")
    return model.to(device=device, dtype=dtype).eval()


def word_level_tokenizer(vocab: int):
    """A tokenizer over names t0..t{vocab-1} (GenAI's builder wants one in the folder)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0"
    )


def gguf_tokenizer(path: Path):
    """The GGUF file's own tokenizer, or None when transformers cannot build it."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:  # noqa: BLE001 - the WordLevel tokenizer serves instead
        return None


def make_hf_folder(
    name: str, folder: Path, device: str, dtype: torch.dtype, gguf: Path | None = None
) -> tuple:
    """Create the model (random, or from `gguf`), save it with a tokenizer as a Hugging Face
    folder; returns (model on `device`, what was saved)."""
    model = gguf_model(gguf, name, device, dtype) if gguf else random_model(name, device, dtype)
    model.config.use_cache = True
    model.save_pretrained(folder)
    _legacy_rope_theta(folder / "config.json")
    tokenizer = gguf_tokenizer(gguf) if gguf else None
    kind = "gguf" if tokenizer is not None else "word-level"
    saved_ok = False
    if tokenizer is not None:
        try:
            tokenizer.save_pretrained(folder)
            saved_ok = _loads_tokenizer(folder)
        except Exception:  # noqa: BLE001 - fall back below
            saved_ok = False
    if not saved_ok:
        kind = "word-level"
        word_level_tokenizer(model.config.vocab_size).save_pretrained(folder)
    info = {
        "weights": f"gguf:{gguf.name}" if gguf else "random (seed 0)",
        "tokenizer": kind,
        "dtype": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    return model, info


def _legacy_rope_theta(path: Path) -> None:
    """Also write rope_theta at the top level of config.json: transformers 5 keeps it only in
    rope_parameters, and builders written for 4.x read `config.rope_theta` (else 10000)."""
    settings = json.loads(path.read_text())
    theta = (settings.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in settings:
        settings["rope_theta"] = theta
        path.write_text(json.dumps(settings, indent=2))


def _loads_tokenizer(folder: Path) -> bool:
    import transformers

    try:
        transformers.AutoTokenizer.from_pretrained(str(folder))
        return True
    except Exception:  # noqa: BLE001 - any failure means the builder would fail too
        return False


def load_hf_model(folder: Path, device: str, dtype: torch.dtype):
    """The saved folder's model straight in `dtype` on `device` (one copy in host memory)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model.to(device).eval()


def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    """`batch` prompts of `length` random token ids (seed 0; the first 3 ids left out)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def eager_decode(model, ids: torch.Tensor, gen_len: int, device: str) -> tuple:
    """transformers forward with its DynamicCache: prefill, then greedy steps; returns
    (prefill s, decode s per token, new tokens per sequence)."""
    t0 = sync(device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = sync(device)
        tokens = [token]
        cache = out.past_key_values
        for _ in range(gen_len - 1):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
    t2 = sync(device)
    return t1 - t0, (t2 - t1) / max(gen_len - 1, 1), torch.cat(tokens, 1).tolist()


def rates(pre: list[float], dec: list[float], batch: int) -> dict:
    """Medians as prefill ms, decode ms/token and tokens/s (the whole batch)."""
    step = statistics.median(dec)
    return {
        "prefill_ms": round(1e3 * statistics.median(pre), 3),
        "decode_ms_per_token": round(1e3 * step, 4),
        "tokens_per_s": round(batch / step, 1),
    }


def time_eager(model, args, device: str, timed: bool = True) -> tuple[dict, dict]:
    """Eager timings per batch (when `timed`) and its greedy tokens (every peer's reference)."""
    row: dict = {}
    tokens: dict = {}
    vocab = model.config.vocab_size
    for batch in args.batches:
        ids = torch.tensor(prompts(vocab, batch, args.prompt_len), device=device)
        _, _, tokens[f"b{batch}"] = eager_decode(model, ids, args.gen_len, device)
        if not timed:
            continue
        runs = [eager_decode(model, ids, args.gen_len, device) for _ in range(args.repeats)]
        row[f"b{batch}"] = rates([r[0] for r in runs], [r[1] for r in runs], batch)
    return row, tokens


def compare_tokens(got: list[list[int]], want: list[list[int]]) -> dict:
    """Per sequence the index of the first new token that differs from the reference (-1: all
    equal over the shorter length); all_match when every sequence matches in full."""
    first = []
    for g, w in zip(got, want):
        diff = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), -1)
        if diff == -1 and len(g) != len(w):
            diff = min(len(g), len(w))
        first.append(diff)
    same = len(got) == len(want) and all(d == -1 for d in first)
    return {"first_diff": first, "all_match": same}
