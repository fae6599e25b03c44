"""Cost model accuracy: predicted against measured time for single ops and whole models.

The peer is eager PyTorch, measured two ways with CUDA events (median of repeats):
- graph (the headline): the eager op or forward captured in a CUDA graph and replayed, so
  the host is off the critical path; inputs and weights rotate among copies larger than the
  L2 cache. Predicted by `estimate(..., runtime="graph")` (per-kernel device time + gaps).
- eager: single ops called back to back (predicted by the eager estimate's steady-state
  time), whole models one forward at a time from an idle device (the eager estimate's
  total: host issue and device work overlapped).
Predictions come from the built-in profile for the device and from a profile calibrated by
`peakc.cost_model.calibrate` in the same run, whose sweeps use other shapes than these.

    python benchmarks/cost_model_accuracy.py --out DIR          # GPU
    python benchmarks/cost_model_accuracy.py --tiny --out DIR   # CPU, tiny shapes (debug)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peakc.cost_model.calibrate import fit_for_device, measure
from peakc.cost_model.estimate import estimate
from peakc.cost_model.hardware import BUILTIN_PROFILES, HardwareProfile
from peakc.cost_model.phases import token_inputs
from peakc.cost_model.timing import copies_for, count_kernels, device_seconds
from peakc.ir import capture
from peakc.models.demo import LlamaConfig, LlamaForCausalLM, RMSNorm, rotate_half

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- single ops as small modules ------------------------------------------------------------


class Gemm(nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(x)


class SiluMul(nn.Module):
    def forward(self, a, b):
        return F.silu(a) * b


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


class Attention(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


class Rope(nn.Module):
    def forward(self, x, cos, sin):
        return x * cos + rotate_half(x) * sin


class GeluChain(nn.Module):
    def forward(self, x, y, z):
        return F.gelu(x) * y + z


def op_cases(tiny: bool) -> list[tuple[str, Callable[[], nn.Module], list[tuple]]]:
    """(name, module factory, input specs (shape, dtype)) of every single-op case."""
    cases = []
    if tiny:
        gemm_shapes = {"t": [(64, 64), (64, 256)]}
        tokens = {"bf16": [1, 32], "fp32": [1, 64], "fp16": [16]}
        hidden, ffn, heads, hd, seqs = 64, 256, 4, 16, [32, 64]
    else:
        gemm_shapes = {
            "7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
            "1b": [(2048, 2048), (2048, 8192), (8192, 2048)],
        }
        tokens = {"bf16": [1, 128, 512, 4096], "fp16": [16, 2048], "fp32": [1, 256, 4096]}
        hidden, ffn, heads, hd, seqs = 4096, 11008, 32, 128, [512, 2048]
    for tag, shapes in gemm_shapes.items():
        for k, n in shapes:
            toks = tokens["bf16"] if tag in ("7b", "t") else tokens["bf16"][::2] + [4096]
            for m in sorted(set(toks)):
                cases.append(
                    (
                        f"gemm {tag} {k}x{n} bf16 m={m}",
                        lambda k=k, n=n: Gemm(k, n),
                        [((m, k), "bf16")],
                    )
                )
    k, n = gemm_shapes[next(iter(gemm_shapes))][1]
    for m in tokens["fp16"]:
        cases.append((f"gemm {k}x{n} fp16 m={m}", lambda k=k, n=n: Gemm(k, n), [((m, k), "fp16")]))
    k, n = gemm_shapes[next(iter(gemm_shapes))][0]
    for m in tokens["fp32"]:
        cases.append((f"gemm {k}x{n} fp32 m={m}", lambda k=k, n=n: Gemm(k, n), [((m, k), "fp32")]))
    for m in [1, 512, 4096] if not tiny else [1, 32]:
        cases.append(
            (
                f"rmsnorm {hidden} bf16 m={m}",
                lambda: RMSNorm(hidden, 1e-6),
                [((1, m, hidden), "bf16")],
            )
        )
        cases.append(
            (f"silu*mul {ffn} bf16 m={m}", SiluMul, [((1, m, ffn), "bf16"), ((1, m, ffn), "bf16")])
        )
    for s in seqs:
        cases.append((f"softmax h={heads} {s}x{s} bf16", Softmax, [((1, heads, s, s), "bf16")]))
        cases.append(
            (
                f"attention prefill h={heads} s={s} bf16",
                lambda: Attention(True),
                [((1, heads, s, hd), "bf16")] * 3,
            )
        )
        cases.append(
            (
                f"rope h={heads} s={s} bf16",
                Rope,
                [((1, heads, s, hd), "bf16"), ((s, hd), "bf16"), ((s, hd), "bf16")],
            )
        )
        cases.append((f"gelu*y+z {s}x{ffn} bf16", GeluChain, [((s, ffn), "bf16")] * 3))
    if not tiny:
        cases.append(
            (
                "attention prefill h=9 d=64 s=2048 bf16",
                lambda: Attention(True),
                [((1, 9, 2048, 64), "bf16")] * 3,
            )
        )
    for b, ctx in [(1, 1024), (1, 4096), (8, 2048)] if not tiny else [(1, 64), (2, 128)]:
        cases.append(
            (
                f"attention decode b={b} ctx={ctx} bf16",
                lambda: Attention(False),
                [
                    ((b, heads, 1, hd), "bf16"),
                    ((b, heads, ctx, hd), "bf16"),
                    ((b, heads, ctx, hd), "bf16"),
                ],
            )
        )
    return cases


# --- timing ---------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, per_sample: int, repeats: int) -> float:
    """Median seconds per call over `repeats` samples of `per_sample` back-to-back calls."""
    samples = []
    for _ in range(repeats):
        sync(device)
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(per_sample):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / per_sample)
        else:
            start = time.perf_counter()
            for _ in range(per_sample):
                fn()
            samples.append((time.perf_counter() - start) / per_sample)
    return statistics.median(samples)


def measure_op(module: nn.Module, inputs: tuple, device: str) -> float:
    """Steady-state seconds per eager call, back to back, median of 7 samples."""
    with torch.inference_mode():
        for _ in range(3):
            module(*inputs)
        once = timed(lambda: module(*inputs), device, 1, 3)
        per = int(min(max(3e-3 / max(once, 1e-7), 3), 300))
        return timed(lambda: module(*inputs), device, per, 7)


def measure_op_graph(factory: Callable[[], nn.Module], specs: list, device: str) -> float:
    """Device seconds per call: a CUDA graph replay of calls rotating over copies past L2."""
    module = factory().to(device=device, dtype=DT[specs[0][1]])
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    nbytes += sum(torch.Size(s).numel() * DT[d].itemsize for s, d in specs)
    count = copies_for(nbytes) if device == "cuda" else 1
    modules = [module] + [
        factory().to(device=device, dtype=DT[specs[0][1]]) for _ in range(count - 1)
    ]
    sets = [
        tuple(torch.randn(s, dtype=DT[d], device=device) for s, d in specs) for _ in range(count)
    ]
    with torch.no_grad():
        return device_seconds(
            [lambda m=m, x=x: m(*x) for m, x in zip(modules, sets)], device, 2e-3, repeats=5
        )


# --- whole models ---------------------------------------------------------------------------


def model_configs(tiny: bool) -> dict[str, LlamaConfig]:
    if tiny:
        return {
            "tiny-a": LlamaConfig(
                vocab_size=256,
                hidden_size=64,
                intermediate_size=128,
                num_layers=2,
                num_heads=4,
                num_kv_heads=2,
                max_positions=256,
            ),
            "tiny-b": LlamaConfig(
                vocab_size=512,
                hidden_size=96,
                intermediate_size=256,
                num_layers=3,
                num_heads=6,
                num_kv_heads=3,
                max_positions=256,
            ),
            "tiny-c": LlamaConfig(
                vocab_size=256,
                hidden_size=128,
                intermediate_size=256,
                num_layers=2,
                num_heads=4,
                num_kv_heads=4,
                max_positions=256,
            ),
        }
    return {
        "smollm2-135m-shape": LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            max_positions=4096,
        ),
        "llama-1b-shape": LlamaConfig(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            max_positions=4096,
        ),
        "llama-7b-shape": LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            max_positions=4096,
        ),
    }


def build_model(cfg: LlamaConfig, device: str, dtype: torch.dtype) -> nn.Module:
    """The demo Llama architecture with random weights made on `device` (no host copy)."""
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    gen = torch.Generator(device=device if device != "meta" else "cpu").manual_seed(0)
    if device != "meta":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
    return model


def decode_step(model: LlamaForCausalLM, ids: torch.Tensor, cache: list, pos: int):
    """One eager decode step: the demo model's layers over a preallocated KV cache."""
    inner = model.model
    cos, sin = inner.cos_cached[pos : pos + 1], inner.sin_cached[pos : pos + 1]
    x = inner.embed_tokens(ids)
    b = ids.shape[0]
    for layer, (k_cache, v_cache) in zip(inner.layers, cache):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache[:, :, pos : pos + 1].copy_(k)
        v_cache[:, :, pos : pos + 1].copy_(v)
        out = F.scaled_dot_product_attention(
            q,
            k_cache[:, :, : pos + 1],
            v_cache[:, :, : pos + 1],
            enable_gqa=attn.num_heads != attn.num_kv_heads,
        )
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(inner.norm(x))


def measure_model(
    cfg: LlamaConfig, device: str, dtype: torch.dtype, batch: int, seq: int, ctx: int
) -> dict[str, float]:
    """Prefill and decode-step seconds: CUDA graph replays and eager forwards; kernel counts."""
    model = build_model(cfg, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    head_dim = cfg.hidden_size // cfg.num_heads
    cache = [
        tuple(
            torch.randn(batch, cfg.num_kv_heads, ctx, head_dim, device=device, dtype=dtype)
            for _ in range(2)
        )
        for _ in range(cfg.num_layers)
    ]
    step_ids = ids[:, :1].contiguous()
    phases = {
        "prefill": lambda: model(ids),
        "decode": lambda: decode_step(model, step_ids, cache, ctx - 1),
    }
    out: dict[str, float] = {}
    with torch.no_grad():
        for phase, fn in phases.items():
            for _ in range(2):
                fn()
            try:
                out[f"{phase}_graph"] = device_seconds([fn], device, 1e-3, repeats=7)
            except RuntimeError as exc:  # reported in the row, left out of the MAPE
                print(f"  CUDA graph capture of {phase} failed: {str(exc)[:200]}", flush=True)
                out[f"{phase}_graph"] = math.nan
            out[f"{phase}_eager"] = timed(fn, device, 1, 5 if phase == "prefill" else 15)
            out[f"{phase}_kernels"] = count_kernels(fn, 1) if device == "cuda" else 0.0
    return out  # the model and cache are freed when this frame ends


# --- the run --------------------------------------------------------------------------------


def mape(rows: list[dict], key: str, measured: str = "measured_s") -> float:
    kept = [r for r in rows if not math.isnan(r[measured])]
    return 100 * statistics.mean(abs(r[key] - r[measured]) / r[measured] for r in kept)


def by_op(est) -> dict[str, float]:
    """Predicted device seconds per op name (where a model's time goes)."""
    out: dict[str, float] = {}
    for n in est.nodes:
        out[n.op] = out.get(n.op, 0.0) + n.device_time
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: debug the script")
    ap.add_argument("--out", default="cost_model_accuracy_out")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu":
        torch.set_num_threads(1)  # a shared CPU box: parallel kernels wait on busy cores
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    label = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    builtin_name = next(
        (
            n
            for k, n in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80gb"))
            if k in label.lower()
        ),
        "cpu",
    )
    builtin = BUILTIN_PROFILES[builtin_name]
    print(f"device {label}; built-in profile {builtin_name}; torch {torch.__version__}", flush=True)
    measurements = measure(device, tiny=args.tiny, progress=False)
    (out / "calibration_measurements.json").write_text(json.dumps(asdict(measurements)))
    calibrated = fit_for_device(measurements, device)
    calibrated.save(out / "profile.json")
    print(
        f"calibrated in {time.perf_counter() - started:.0f} s: "
        f"{ {k: round(v / 1e12, 1) for k, v in calibrated.peak_flops.items()} } TFLOP/s, "
        f"{calibrated.memory_bandwidth / 1e9:.0f} GB/s, launch "
        f"{ {k: round(v * 1e6, 1) for k, v in calibrated.launch_overhead_by_kind.items()} } us,"
        f" view {calibrated.view_overhead * 1e6:.2f} us, kernel gap "
        f"{calibrated.kernel_gap * 1e6:.2f} us, eager kernels {calibrated.eager_kernels}",
        flush=True,
    )
    profiles: dict[str, HardwareProfile] = {"builtin": builtin, "calibrated": calibrated}

    op_rows = []
    for name, factory, specs in op_cases(args.tiny):
        with torch.device("meta"):
            meta_module = factory()
        meta_inputs = tuple(torch.empty(s, dtype=DT[d], device="meta") for s, d in specs)
        meta_module = meta_module.to(meta_inputs[0].dtype)
        graph = capture(meta_module, meta_inputs, name=name)
        row = {"name": name}
        for key, profile in profiles.items():
            row[key + "_s"] = estimate(graph, profile, runtime="graph").total_time
            row[key + "_eager_s"] = estimate(graph, profile, runtime="eager").steady_state_time
        row["kernels_predicted"] = estimate(graph, profiles["calibrated"]).kernels
        row["measured_s"] = measure_op_graph(factory, specs, device)
        module = factory().to(device=device, dtype=DT[specs[0][1]])
        inputs = tuple(torch.randn(s, dtype=DT[d], device=device) for s, d in specs)
        row["measured_eager_s"] = measure_op(module, inputs, device)
        del module, inputs
        op_rows.append(row)
        print(
            f"  {name:<44} graph {row['measured_s'] * 1e6:9.1f} us  builtin "
            f"{row['builtin_s'] * 1e6:9.1f}  calibrated {row['calibrated_s'] * 1e6:9.1f}  | "
            f"eager {row['measured_eager_s'] * 1e6:9.1f}  calibrated "
            f"{row['calibrated_eager_s'] * 1e6:9.1f}",
            flush=True,
        )

    model_rows = []
    dtype = torch.float32 if args.tiny else torch.bfloat16
    seq = 32 if args.tiny else args.seq
    for name, cfg in model_configs(args.tiny).items():
        meta_model = build_model(cfg, "meta", dtype)
        example = (torch.zeros(1, 4, dtype=torch.long),)
        measured = measure_model(cfg, device, dtype, args.batch, seq, seq)
        if device == "cuda":
            torch.cuda.empty_cache()
        for phase in ("prefill", "decode"):
            tokens = seq if phase == "prefill" else 1
            graph = capture(
                meta_model,
                token_inputs(meta_model, example, args.batch, tokens),
                name=f"{name} {phase}",
            )
            kv_len = seq if phase == "decode" else None
            row = {
                "name": f"{name} {phase} b={args.batch} {'seq' if phase == 'prefill' else 'ctx'}"
                f"={seq}",
                "measured_s": measured[f"{phase}_graph"],
                "measured_eager_s": measured[f"{phase}_eager"],
                "kernels_measured": measured[f"{phase}_kernels"],
            }
            for key, profile in profiles.items():
                est = estimate(
                    graph,
                    profile,
                    phase=phase,
                    batch=args.batch,
                    seq=seq,
                    kv_len=kv_len,
                    runtime="graph",
                )
                eager = estimate(
                    graph,
                    profile,
                    phase=phase,
                    batch=args.batch,
                    seq=seq,
                    kv_len=kv_len,
                    runtime="eager",
                )
                row[key + "_s"] = est.total_time
                row[key + "_eager_s"] = eager.total_time
                row["kernels_predicted"] = est.kernels
                row[key + "_detail"] = {
                    "host_time_s": eager.host_time,
                    "device_s": est.device_time,
                    "by_op_class_s": by_op(est),
                    "top_nodes": [
                        (n.name, n.op, n.shape, n.device_time, n.bound) for n in est.top_nodes(12)
                    ],
                }
            model_rows.append(row)
            print(
                f"  {row['name']:<44} graph {row['measured_s'] * 1e3:9.3f} ms  builtin "
                f"{row['builtin_s'] * 1e3:9.3f}  calibrated {row['calibrated_s'] * 1e3:9.3f}"
                f"  | eager {row['measured_eager_s'] * 1e3:9.3f}  calibrated "
                f"{row['calibrated_eager_s'] * 1e3:9.3f}  | kernels measured "
                f"{row['kernels_measured']:.0f} predicted {row['kernels_predicted']}",
                flush=True,
            )

    summary = {
        "device": label,
        "torch": torch.__version__,
        "builtin_profile": builtin_name,
        "ops": len(op_rows),
        "models": len(model_rows),
        "op_mape_builtin": mape(op_rows, "builtin_s"),
        "op_mape_calibrated": mape(op_rows, "calibrated_s"),
        "model_mape_builtin": mape(model_rows, "builtin_s"),
        "model_mape_calibrated": mape(model_rows, "calibrated_s"),
        "op_mape_eager_builtin": mape(op_rows, "builtin_eager_s", "measured_eager_s"),
        "op_mape_eager_calibrated": mape(op_rows, "calibrated_eager_s", "measured_eager_s"),
        "model_mape_eager_builtin": mape(model_rows, "builtin_eager_s", "measured_eager_s"),
        "model_mape_eager_calibrated": mape(model_rows, "calibrated_eager_s", "measured_eager_s"),
        "seconds": time.perf_counter() - started,
    }
    (out / "cost_model_accuracy.json").write_text(
        json.dumps({"summary": summary, "ops": op_rows, "models": model_rows}, indent=2)
    )
    print(
        f"\n{'case (graph replay)':<46}{'measured':>11}{'builtin':>9}{'calib.':>11}"
        f"{'err%':>7} |{'eager':>11}{'calib.':>11}{'err%':>7}"
    )
    for row in op_rows + model_rows:
        m, e = row["measured_s"], row["measured_eager_s"]
        print(
            f"{row['name']:<46}{m * 1e6:>9.1f}us{100 * (row['builtin_s'] - m) / m:>+9.1f}"
            f"{row['calibrated_s'] * 1e6:>9.1f}us{100 * (row['calibrated_s'] - m) / m:>+7.1f} |"
            f"{e * 1e6:>9.1f}us{row['calibrated_eager_s'] * 1e6:>9.1f}us"
            f"{100 * (row['calibrated_eager_s'] - e) / e:>+7.1f}"
        )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
