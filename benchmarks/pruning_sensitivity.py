"""Which blocks of SmolLM2-135M can take more sparsity, and which dense-model measure says so.

Same model, windows and perplexity as benchmarks/pruning_quality.py (its docstring). Steps:
1. Dense-model measures per block (transformer layer), all from the calibration windows:
   OWL outlier ratios (Wanda score M=5, OBS score M=2), block influence (1 - cos between the
   block's residual input and output, as ShortGPT defines it), the block's relative update
   ‖h_out - h_in‖ / ‖h_in‖, and SparseGPT's relative reconstruction error ‖ΔW·X‖²/‖W·X‖² at
   50 % and 60 % on dense inputs (parameter-weighted over the block's linears).
2. Probe: SparseGPT with block i at 60 % and every other block at 50 %, for each i; the
   validation perplexity's rise over uniform 50 % is block i's sensitivity.
3. Spearman rank correlation of every measure with the probed sensitivity.
4. Allocations (same 50 % overall, blocks spread by rank over [50 - λ, 50 + λ]) ordered by the
   probe itself, by depth, by each measure, and by OWL's ratios reversed; each pruned with
   calibration seed 0 and scored on validation and evaluation windows; the best on validation
   re-run with seeds 1 and 2 against uniform's three seeds.

    python benchmarks/pruning_sensitivity.py --gguf FILE --windows windows.safetensors \
        --device cuda --out sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from pruning_quality import NSAMPLES, SEQ_LEN, find_gguf, windows
from scipy.stats import spearmanr

from peakc.data import with_sequence_length
from peakc.ir.capture import capture
from peakc.passes.calibration import (
    calibrate_blocks,
    default_targets,
    linear_sites,
    target_selector,
)
from peakc.passes.compress import block_compressor
from peakc.passes.prune import PruneOptions, prune_solver
from peakc.passes.prune.owl import measure_outliers
from peakc.passes.prune.pattern import parse_pattern
from peakc.passes.prune.profile import spread_sparsities
from peakc.runtime.evaluate import perplexity
from peakc.runtime.samples import calibration_samples

TARGET, PROBE = 0.5, 0.6


def prune(graph, sparsity: dict[str, float], samples, device: str, select):
    """A SparseGPT-pruned copy of `graph` with one sparsity per linear (module path)."""
    pruned = graph.copy()
    compress = block_compressor(
        prune_solver(PruneOptions(), parse_pattern("unstructured"), sparsity)
    )
    calibrate_blocks(pruned, samples, compress, select=select, device=device)
    return pruned


def reconstruction_errors(
    graph, units, params, samples, device, sparsity: float, select
) -> list[float]:
    """Per block: SparseGPT's relative error at `sparsity` on the DENSE model's inputs."""
    errors: dict[str, float] = {}
    solver = prune_solver(
        PruneOptions(), parse_pattern("unstructured"), {m: sparsity for unit in units for m in unit}
    )
    compress = block_compressor(solver, errors)

    def measure_only(cal):
        compress(cal)  # records the error; returning nothing keeps the weights dense

    calibrate_blocks(graph.copy(), samples, measure_only, select=select, device=device)
    sites = linear_sites(graph, list(graph.graph.nodes), select)
    sizes = {s.module: graph.get_weight(s.weight).numel() for s in sites}
    return [sum(errors[m] * sizes[m] for m in unit) / p for unit, p in zip(units, params)]


def residual_measures(hf_model, data: torch.Tensor, device: str) -> tuple[list, list]:
    """Per decoder layer: block influence 1 - cos(h_in, h_out) and ‖h_out - h_in‖/‖h_in‖."""
    layers = hf_model.model.layers
    sums = [[0.0, 0.0, 0] for _ in layers]
    hooks = []

    def hook(i):
        def on_forward(module, args, kwargs, output):
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = (output[0] if isinstance(output, tuple) else output).float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            rel = (h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp(min=1e-6)
            sums[i][0] += float((1 - cos).sum())
            sums[i][1] += float(rel.sum())
            sums[i][2] += cos.numel()

        return on_forward

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    model = hf_model.to(device)
    try:
        with torch.no_grad():
            for ids in data[:8]:
                model(input_ids=ids.view(1, -1).to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        hf_model.to("cpu")
    return [s[0] / s[2] for s in sums], [s[1] / s[2] for s in sums]


def allocation(units, params, score: list[float], lam: float) -> dict[str, float]:
    """Higher score → lower sparsity; blocks by rank over [S - λ, S + λ], mean exactly S."""
    per_block = spread_sparsities(score, params, TARGET, lam, "rank")
    return {m: s for unit, s in zip(units, per_block) for m in unit}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--windows", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget-s", type=float, default=500.0)
    parser.add_argument("--lambdas", default="0.02,0.05", help="for the probe and depth orders")
    parser.add_argument("--smoke", action="store_true", help="2 windows, blocks 0-2: code paths")
    args = parser.parse_args()
    started = time.perf_counter()

    from peakc.models.hf import load_hf

    gguf = args.gguf or find_gguf()
    source = load_hf(f"gguf:{gguf}", str(gguf), gguf=True)
    data = windows(source, args)
    select, nsamples = default_targets, NSAMPLES
    if args.smoke:
        data = {k: v[:2] for k, v in data.items()}
        select, nsamples = target_selector(r"layers\.[012]\.", "smoke"), 2
    graph = capture(source.module, with_sequence_length(source.example_inputs, SEQ_LEN))
    dev = args.device
    keys = {0: "calibration", 1: "calibration_s1", 2: "calibration_s2"}
    calib = {
        s: calibration_samples(graph, data[k], nsamples, 0, 0, "prune") for s, k in keys.items()
    }
    result: dict = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"}

    def score(pruned) -> tuple[float, float]:
        return (
            perplexity(pruned, data["validation"], dev).ppl,
            perplexity(pruned, data["evaluation"], dev).ppl,
        )

    # 1. dense measures
    wanda = measure_outliers(graph, calib[0], select, threshold=5.0, device=dev)
    obs = measure_outliers(graph, calib[0], select, threshold=2.0, score="obs", device=dev)
    units, params = wanda.units, wanda.params
    n = len(units)
    bi, rel = residual_measures(source.module.hf_model, data["calibration"], dev)
    errors = {
        s: reconstruction_errors(graph, units, params, calib[0], dev, s, select)
        for s in (TARGET, PROBE)
    }
    measures = {
        "owl_wanda_M5": wanda.ratios,
        "owl_obs_M2": obs.ratios,
        "block_influence": bi[:n],
        "relative_update": rel[:n],
        "recon_err_50": errors[TARGET],
        "recon_err_60": errors[PROBE],
        "recon_err_slope": [b - a for a, b in zip(errors[TARGET], errors[PROBE])],
    }
    print(f"measures done at {time.perf_counter() - started:.0f} s", flush=True)

    # 2. uniform baseline and the per-block probe (validation windows only)
    uniform = {m: TARGET for unit in units for m in unit}
    base_val, base_eval = score(prune(graph, uniform, calib[0], dev, select))
    print(f"uniform seed 0: validation {base_val:.3f} eval {base_eval:.3f}", flush=True)
    probe = []
    for i, unit in enumerate(units):
        sparsity = dict(uniform, **{m: PROBE for m in unit})
        pruned = prune(graph, sparsity, calib[0], dev, select)
        probe.append(perplexity(pruned, data["validation"], dev).ppl - base_val)
        print(f"probe block {i}: {probe[-1]:+.3f}", flush=True)
    result.update(measures=measures, probe=probe, uniform_seed0=[base_val, base_eval])

    # 3. rank correlation of each measure with the probe
    corr = {k: float(spearmanr(v, probe).statistic) for k, v in measures.items()}
    result["spearman_with_probe"] = corr

    # 4. allocations: a higher score keeps more; each measure in the direction the probe agrees
    # with, OWL's Wanda ratios as OWL uses them too, and both depth orders
    candidates = {
        "probe": probe,
        "shallow keeps more": [float(-i) for i in range(n)],
        "deep keeps more": [float(i) for i in range(n)],
        "owl_wanda_M5 (as OWL)": measures["owl_wanda_M5"],
    }
    for k, v in measures.items():
        ordered = [x * (1 if corr[k] >= 0 else -1) for x in v]
        if ordered not in candidates.values():
            candidates[k if corr[k] >= 0 else f"{k} reversed"] = ordered
    lambdas = [float(x) for x in args.lambdas.split(",")]
    runs = [(name, lam) for lam in lambdas for name in ("probe", "shallow keeps more")]
    runs += [(name, 0.03) for name in candidates if name not in ("probe", "shallow keeps more")]
    rows = [dict(config="uniform", lam=0.0, seed=0, validation=base_val, ppl=base_eval)]
    per_run = 0.0
    for name, lam in runs:
        if time.perf_counter() - started > args.budget_s - 60:
            print(f"{name} λ={lam}: skipped (budget)", flush=True)
            continue
        t0 = time.perf_counter()
        alloc = allocation(units, params, candidates[name], lam)
        val, ev = score(prune(graph, alloc, calib[0], dev, select))
        rows.append(dict(config=name, lam=lam, seed=0, validation=val, ppl=ev))
        per_run = time.perf_counter() - t0
        print(json.dumps(rows[-1]), flush=True)
    best = min((r for r in rows if r["config"] != "uniform"), key=lambda r: r["validation"])
    for seed in (1, 2):
        if time.perf_counter() - started > args.budget_s - 2 * per_run:
            print(f"seed {seed}: skipped (budget)", flush=True)
            break
        v, e = score(prune(graph, uniform, calib[seed], dev, select))
        rows.append(dict(config="uniform", lam=0.0, seed=seed, validation=v, ppl=e))
        alloc = allocation(units, params, candidates[best["config"]], best["lam"])
        v, e = score(prune(graph, alloc, calib[seed], dev, select))
        rows.append(dict(config=best["config"], lam=best["lam"], seed=seed, validation=v, ppl=e))
    result["rows"] = rows
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))

    print(f"\n{gguf.name} on {result['device']}, {time.perf_counter() - started:.0f} s")
    print("| block | probe Δval | " + " | ".join(measures) + " |")
    for i in range(n):
        cells = " | ".join(f"{measures[k][i]:.4g}" for k in measures)
        print(f"| {i} | {probe[i]:+.3f} | {cells} |")
    print("\nspearman with probe: " + ", ".join(f"{k} {v:+.2f}" for k, v in corr.items()))
    print("\n| allocation | λ | seed | validation ppl | eval ppl |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['lam']} | {r['seed']} | {r['validation']:.3f} | {r['ppl']:.3f} |"
        )


if __name__ == "__main__":
    main()
