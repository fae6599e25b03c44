"""Calibration and evaluation text: local files or folders → token ids → windows.

Text is tokenized with the model's own tokenizer (a Hugging Face tokenizer saved with the
source or the artifact). Models without one (the demo models) use `ByteTokenizer`: every
UTF-8 byte is one token, taken modulo the vocabulary size; it is exact when the vocabulary
has at least 256 entries and is documented as a fallback, not a real tokenizer.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from peakc.errors import PeakcError


class TextTokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...


@dataclass
class ByteTokenizer:
    """Fallback for models without a tokenizer: one token per UTF-8 byte (mod vocab_size)."""

    vocab_size: int
    name: str = "bytes"

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]


@dataclass
class HFTokenizer:
    """A saved Hugging Face tokenizer; encodes without special tokens (plain running text)."""

    tokenizer: object
    name: str = "hf"

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class TokenText:
    """A corpus as one long run of token ids, with where it came from."""

    tokens: torch.Tensor  # int64[n]
    source: str
    tokenizer: str

    def __len__(self) -> int:
        return int(self.tokens.numel())


def load_tokenizer(saved: dict[str, bytes] | Path | None, vocab_size: int) -> TextTokenizer:
    """The model's tokenizer from its saved files (a dict of `tokenizer/NAME` → bytes, or a
    folder); ByteTokenizer when there is none."""
    if saved is None or (isinstance(saved, dict) and not saved):
        return ByteTokenizer(vocab_size)
    if isinstance(saved, Path) and not saved.is_dir():
        return ByteTokenizer(vocab_size)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise PeakcError(
            "the model's tokenizer needs transformers: pip install 'peakc[hf]'"
        ) from None
    if isinstance(saved, dict):
        with tempfile.TemporaryDirectory() as tmp:
            for rel, data in saved.items():
                (Path(tmp) / Path(rel).name).write_bytes(data)
            tok = AutoTokenizer.from_pretrained(tmp)
    else:
        tok = AutoTokenizer.from_pretrained(str(saved))
    return HFTokenizer(tok, name=type(tok).__name__)


def load_token_text(path: str | Path, tokenizer: TextTokenizer) -> TokenText:
    """Read and tokenize a file or folder (one encode call per file, joined)."""
    path = Path(path)
    if not path.exists():
        raise PeakcError(f"text data not found: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    ids: list[int] = []
    for f in files:
        text = _read_text(f)
        if text.strip():
            ids.extend(tokenizer.encode(text + "\n\n"))
    if not ids:
        raise PeakcError(f"text data {path} has no text")
    return TokenText(torch.tensor(ids, dtype=torch.int64), str(path), tokenizer.name)


def _read_text(path: Path) -> str:
    """A text file's contents; a binary or non-UTF-8 file is an error naming it, not text
    scored with replacement characters."""
    data = path.read_bytes()
    if b"\0" in data:
        raise PeakcError(f"text data {path} is a binary file (it contains NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PeakcError(
            f"text data {path} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x})"
        ) from None


def random_windows(text: TokenText, nsamples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seq_len` tokens at seeded random offsets: int64[nsamples, seq_len]."""
    if nsamples < 1 or seq_len < 1:
        raise PeakcError(
            f"calibration needs nsamples >= 1 and seq_len >= 1, got {nsamples}, {seq_len}"
        )
    n = len(text)
    if n < seq_len:
        raise PeakcError(
            f"calibration text {text.source} has {n} tokens, fewer than one window of "
            f"seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (nsamples,), generator=gen)
    return torch.stack([text.tokens[s : s + seq_len] for s in starts.tolist()])


def consecutive_windows(text: TokenText, seq_len: int, limit: int = 0) -> torch.Tensor:
    """Non-overlapping windows from the start (the tail shorter than seq_len is dropped)."""
    count = len(text) // seq_len
    if count == 0:
        raise PeakcError(
            f"evaluation text {text.source} has {len(text)} tokens, fewer than one window of "
            f"seq_len={seq_len}"
        )
    if limit:
        count = min(count, limit)
    return text.tokens[: count * seq_len].view(count, seq_len)


def calibration_windows(
    data: object, nsamples: int, seq_len: int, seed: int, owner: str
) -> torch.Tensor:
    """Windows from ctx.calibration_data: a TokenText (sampled here) or a ready int tensor."""
    if data is None:
        raise PeakcError(f"{owner} needs calibration data (use --calib-data PATH)")
    if isinstance(data, TokenText):
        return random_windows(data, nsamples, seq_len, seed)
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        if data.shape[1] != seq_len:
            raise PeakcError(
                f"{owner}: calibration windows have {data.shape[1]} tokens, expected {seq_len}"
            )
        if data.shape[0] < nsamples:
            raise PeakcError(
                f"{owner}: calibration tensor has {data.shape[0]} windows, nsamples={nsamples}"
            )
        return data[:nsamples]
    raise PeakcError(
        f"{owner}: calibration data must be peakc.data.TokenText or an int tensor "
        f"[nsamples, seq_len], got {type(data).__name__}"
    )


def with_sequence_length(
    inputs: tuple[torch.Tensor, ...], seq_len: int
) -> tuple[torch.Tensor, ...]:
    """Example token ids stretched or cut to `seq_len` (tiling the existing ids), for capture
    at a calibration or evaluation length."""
    if not inputs or inputs[0].dtype != torch.int64 or inputs[0].dim() != 2:
        raise PeakcError("--seq-len applies to models whose first input is token ids [batch, seq]")
    ids = inputs[0]
    reps = -(-seq_len // ids.shape[1])
    return (ids.repeat(1, reps)[:, :seq_len].contiguous(), *inputs[1:])


def model_vocab_size(model: object) -> int:
    """The vocabulary size of a module (its first embedding) or a Graph (its logits' width)."""
    if isinstance(model, torch.nn.Module):
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                return module.num_embeddings
        raise PeakcError("the model has no token embedding, so text cannot be tokenized for it")
    outputs = model.output_nodes()
    val = outputs[0].meta.get("val") if outputs else None
    if not isinstance(val, torch.Tensor):
        raise PeakcError("the graph's first output has no recorded shape (expected logits)")
    return int(val.shape[-1])


def source_token_text(path: str | Path, source: object) -> TokenText:
    """Tokenize a file or folder for a peakc.models.ModelSource, with its own tokenizer (the
    source's saved tokenizer files, or an artifact's tokenizer/ folder), bytes otherwise."""
    model = source.graph if source.graph is not None else source.module
    saved = source.tokenizer_files or None
    if saved is None and source.spec.startswith("artifact:"):
        saved = Path(source.spec.partition(":")[2]) / "tokenizer"
    return load_token_text(path, load_tokenizer(saved, model_vocab_size(model)))
