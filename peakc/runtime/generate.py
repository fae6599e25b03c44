"""Generator: prefill and decode over an artifact's decoder program with a preallocated cache.

The decoder program (see peakc/models/kv_cache.py) maps (input_ids, positions, k_cache,
v_cache) to (logits, new_k, new_v); the generator writes new_k/new_v into the cache slots
given by `positions` after each step. A program may instead offer a step that keeps the cache
itself (`CacheOwningStep`, e.g. the ort backend's shared GroupQueryAttention buffers): then
the generator calls `begin(batch)` and `step(ids, positions) -> logits`. Prompts of
different lengths are right-padded in one prefill: padded slots hold garbage that no real
query can see (a query at position p sees slots <= p, and decode overwrites slot p before
reading it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from peakc.errors import PeakcError
from peakc.runtime.kv_cache import empty_cache


@dataclass
class SamplingConfig:
    """Greedy when temperature is 0; otherwise temperature, then top-k, then top-p."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise PeakcError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PeakcError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise PeakcError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise PeakcError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (stop token included when hit)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@runtime_checkable
class CacheOwningStep(Protocol):
    """A decoder step that holds the KV cache: begin(batch), then (ids, positions) -> logits."""

    def begin(self, batch: int) -> None: ...

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...


class Generator:
    """Generate from a decoder step function and its cache layout (an artifact or a module)."""

    def __init__(
        self,
        step: StepFn,
        layout: dict[str, Any],
        device: str | torch.device = "cpu",
        tokenizer: Any = None,
    ) -> None:
        self.step = step
        self.layout = layout
        self.device = torch.device(device)
        self.tokenizer = tokenizer

    @classmethod
    def from_artifact(cls, artifact: Any, device: str | torch.device | None = None) -> Generator:
        """A generator over a loaded artifact's decoder program (weights moved to `device`)."""
        layout = artifact.manifest.get("generation")
        if layout is None:
            raise PeakcError(
                f"artifact {artifact.directory} has no decoder program: compile it with "
                "--task generate"
            )
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if "offload" in artifact.manifest and device.type == "cuda":  # weights across tiers
            from peakc.runtime.offload import offload_step

            step = offload_step(artifact, device)
            return cls(step, layout, device, load_tokenizer(artifact.directory))
        program = place_on_device(artifact.program("decoder"), device)
        owning = getattr(program, "cache_owning_step", None)
        step = owning(layout) if owning is not None else None
        if step is not None:
            return cls(step, layout, device, load_tokenizer(artifact.directory))
        weights = [w.to(device) for w in artifact.weight_list("decoder")]
        decode = program
        if "decode_step" in artifact.manifest["programs"]:  # one token per sequence
            decode = place_on_device(artifact.program("decode_step"), device)
            if (
                artifact.manifest["programs"]["decode_step"]["weights"]
                != artifact.manifest["programs"]["decoder"]["weights"]
            ):
                raise PeakcError(f"artifact {artifact.directory}: programs disagree on weights")

        def step(ids, positions, k_cache, v_cache):
            run = decode if ids.shape[1] == 1 else program
            with torch.no_grad():
                return run(*weights, ids, positions, k_cache, v_cache)

        return cls(step, layout, device, load_tokenizer(artifact.directory))

    # --- limits -----------------------------------------------------------------------------

    def check_request(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise PeakcError("no prompts given")
        limit = self.layout["max_batch"]
        if len(prompts) > limit:
            raise PeakcError(f"batch of {len(prompts)} prompts exceeds the captured limit {limit}")
        cache = self.layout["max_seq_len"]
        vocab = self.layout["vocab_size"]
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise PeakcError(f"prompt {i} is empty")
            outside = [t for t in prompt if not 0 <= t < vocab]
            if outside:
                raise PeakcError(
                    f"prompt {i}: token id {outside[0]} is outside the vocabulary (0..{vocab - 1})"
                )
            if len(prompt) + max_new_tokens > cache:
                raise PeakcError(
                    f"prompt {i} has {len(prompt)} tokens; with {max_new_tokens} new tokens it "
                    f"exceeds the cache of {cache} tokens"
                )

    # --- generation -------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        config: SamplingConfig,
        on_tokens: Callable[[list[int | None]], None] | None = None,
    ) -> GenerationResult:
        """Token ids in, new token ids out; `on_tokens` gets each step's tokens (None when done)."""
        config.validate()
        self.check_request(prompts, config.max_new_tokens)
        batch = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        ids = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        for b, prompt in enumerate(prompts):
            ids[b, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        positions = torch.arange(width, device=self.device).expand(batch, width).contiguous()
        k_cache, v_cache = self.empty_cache(batch)
        generator = None
        if config.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(config.seed if config.seed is not None else 0)
        stop = set(config.stop_tokens)

        start = _now(self.device)
        logits = self.run_step(ids, positions, k_cache, v_cache)
        last = logits[torch.arange(batch, device=self.device), lengths - 1]
        tokens = sample(last, config, generator)
        prefill_seconds = _now(self.device) - start

        start = _now(self.device)
        current = lengths.clone()
        if not stop and on_tokens is None:
            out = self.decode_fixed(tokens, current, config, generator, k_cache, v_cache)
            steps = config.max_new_tokens - 1
            return GenerationResult(out, prefill_seconds, _now(self.device) - start, steps)
        out: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        steps = 0
        while True:
            step_tokens = tokens.tolist()
            shown: list[int | None] = []
            for b, token in enumerate(step_tokens):
                if done[b]:
                    shown.append(None)
                    continue
                out[b].append(token)
                shown.append(token)
                if token in stop or len(out[b]) >= config.max_new_tokens:
                    done[b] = True
            if on_tokens is not None:
                on_tokens(shown)
            if all(done):
                break
            positions = current.view(batch, 1)
            logits = self.run_step(tokens.view(batch, 1), positions, k_cache, v_cache)
            tokens = sample(logits[:, -1], config, generator)
            current += 1
            steps += 1
        decode_seconds = _now(self.device) - start
        return GenerationResult(out, prefill_seconds, decode_seconds, steps)

    def decode_fixed(
        self, tokens, current, config: SamplingConfig, generator, k_cache, v_cache
    ) -> list[list[int]]:
        """max_new_tokens for every sequence (no stop tokens, no streaming): the tokens stay on
        the device until the end, so the host never waits on a step to read them."""
        batch = tokens.shape[0]
        new = [tokens]
        for _ in range(config.max_new_tokens - 1):
            logits = self.run_step(tokens.view(batch, 1), current.view(batch, 1), k_cache, v_cache)
            tokens = sample(logits[:, -1], config, generator)
            new.append(tokens)
            current += 1
        return torch.stack(new, dim=1).tolist()

    def empty_cache(self, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Zero keys and values for `batch` sequences; (None, None) after `begin(batch)` when the
        step keeps the cache itself."""
        if isinstance(self.step, CacheOwningStep):
            self.step.begin(batch)
            return None, None
        k_cache = empty_cache(self.layout, batch, self.device)
        return k_cache, torch.zeros_like(k_cache)

    def prefill_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, vocab] of one prefill of `ids` [B, S] from an empty cache: what a
        perplexity window of a decoder artifact is scored on."""
        batch, seq = ids.shape
        if seq > self.layout["max_seq_len"]:
            raise PeakcError(
                f"a window of {seq} tokens exceeds the cache of {self.layout['max_seq_len']}"
            )
        ids = ids.to(self.device)
        positions = torch.arange(seq, device=self.device).expand(batch, seq).contiguous()
        k_cache, v_cache = self.empty_cache(batch)
        with torch.no_grad():
            return self.run_step(ids, positions, k_cache, v_cache)

    def run_step(self, ids, positions, k_cache, v_cache) -> torch.Tensor:
        """One decoder call; the cache is written by the step itself or from new_k/new_v."""
        if k_cache is None:
            return self.step(ids, positions)
        logits, new_k, new_v = self.step(ids, positions, k_cache, v_cache)
        write_cache(k_cache, v_cache, new_k, new_v, positions)
        return logits

    def chat_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as one user message in the tokenizer's chat template, ending where the
        assistant's answer begins (what an Instruct model was trained to continue)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise PeakcError("this artifact's tokenizer has no chat template: drop --chat")
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            for prompt in prompts
        ]

    def generate_text(
        self, prompts: Sequence[str], config: SamplingConfig, on_text: Callable | None = None
    ) -> list[str]:
        """Text in, text out, through the artifact's tokenizer; streams through `on_text`."""
        if self.tokenizer is None:
            raise PeakcError("this artifact has no tokenizer: pass token ids instead of text")
        if not config.stop_tokens and self.tokenizer.eos_token_id is not None:
            config.stop_tokens = (self.tokenizer.eos_token_id,)
        encoded = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise PeakcError(f"prompt {i} is empty")
        streamed: list[list[int]] = [[] for _ in prompts]
        printed = [""] * len(prompts)

        def on_tokens(step_tokens: list[int | None]) -> None:
            if on_text is None:
                return
            for b, token in enumerate(step_tokens):
                if token is None:
                    continue
                streamed[b].append(token)
                text = self.tokenizer.decode(streamed[b], skip_special_tokens=True)
                if len(text) > len(printed[b]):
                    on_text(b, text[len(printed[b]) :])
                    printed[b] = text

        self.last_result = self.generate(encoded, config, on_tokens)
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in self.last_result.tokens]


def place_on_device(program: Any, device: torch.device) -> Any:
    """Point `device=` arguments baked into an exported graph (e.g. a rotary table's `.to(cpu)`
    at capture time) at the device the program runs on."""
    import torch.fx as fx

    if not isinstance(program, fx.GraphModule) or device.type == "cpu":
        return program
    changed = False
    for node in program.graph.nodes:
        if node.op == "call_function" and node.kwargs.get("device") is not None:
            node.kwargs = {**node.kwargs, "device": device}
            changed = True
    if changed:
        program.recompile()
    return program


def write_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write a step's keys and values [L, B, H, S, D] into the cache slots `positions` [B, S]."""
    layers, batch, heads, seq, dim = new_k.shape
    slots = positions.view(1, batch, 1, seq, 1).expand(layers, batch, heads, seq, dim)
    k_cache.scatter_(3, slots, new_k.to(k_cache.dtype))
    v_cache.scatter_(3, slots, new_v.to(v_cache.dtype))


def sample(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row of `logits` [B, V]."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / config.temperature
    if config.top_k > 0:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative - sorted_scores.softmax(dim=-1) >= config.top_p  # keep the first
        sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved in an artifact's `tokenizer/` folder, or None."""
    folder = Path(directory) / "tokenizer"
    if not folder.is_dir():
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise PeakcError(
            "reading the artifact's tokenizer needs transformers: pip install 'peakc[hf]'"
        ) from None
    return AutoTokenizer.from_pretrained(str(folder))


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
