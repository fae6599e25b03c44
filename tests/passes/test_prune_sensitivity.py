"""Sensitivity profile: the block probes' losses, and the allocation the pass makes from them."""

import re

import pytest
import torch

from peakc.errors import PeakcError
from peakc.passes.base import PassContext
from peakc.passes.calibration import default_targets, linear_sites, variant_losses
from peakc.passes.pipeline import Pipeline
from peakc.passes.prune import PruneOptions, PrunePass, block_pruner
from peakc.passes.prune.pattern import parse_pattern
from peakc.passes.prune.sensitivity import measure_sensitivity, sample_nll
from peakc.runtime.blocks import last_use, peak_bytes, run_graph
from peakc.runtime.samples import calibration_samples

SEQ = 16
WINDOWS = torch.randint(0, 256, (6, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def graph(small_llama):
    return small_llama(5)[1]


def scaled_blocks(graph) -> dict[int, dict]:
    """One variant per block with target linears: all of them scaled by 4."""
    variants = {}
    for index, block in enumerate(graph.blocks()):
        sites = linear_sites(graph, block.nodes, default_targets)
        if sites:
            variants[index] = {s.weight: graph.get_weight(s.weight) * 4.0 for s in sites}
    return variants


def direct_loss(graph, samples) -> float:
    return sum(sample_nll(run_graph(graph, s, "cpu")[0], s) for s in samples)


def test_variant_losses_equal_whole_forwards_with_one_block_changed(graph):
    samples = calibration_samples(graph, WINDOWS, 6, 0, 0, "test")
    variants = scaled_blocks(graph)
    assert len(variants) == 3
    base, losses = variant_losses(graph, samples, variants, sample_nll)
    assert base == pytest.approx(direct_loss(graph, samples), rel=1e-5)
    for index, weights in variants.items():
        changed = graph.copy()
        for name, value in weights.items():
            changed.set_weight(name, value)
        assert losses[index] == pytest.approx(direct_loss(changed, samples), rel=1e-5)
        assert abs(losses[index] - base) > 1e-3 * base  # the change did matter


def test_probes_keep_only_the_values_alive_between_blocks(graph):
    """What decides whether every probe's activations stay on the device: between two blocks
    only the values later blocks read are alive, and the probes never keep logits."""
    blocks = graph.blocks()
    logits = graph.output_nodes()[0]
    hidden = blocks[1].outputs[0].meta["val"]
    size = logits.meta["val"].numel() * logits.meta["val"].element_size()
    needed = last_use(graph, blocks)
    assert peak_bytes(blocks, needed) >= size
    kept = peak_bytes(blocks, needed, skip=(logits,))
    assert hidden.numel() * hidden.element_size() <= kept < size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_give_the_interpreters_losses(graph):
    samples = calibration_samples(graph, WINDOWS, 6, 0, 0, "test")
    variants = scaled_blocks(graph)
    run = dict(device="cuda")
    replayed = variant_losses(graph, samples, variants, sample_nll, cuda_graphs=True, **run)
    interpreted = variant_losses(graph, samples, variants, sample_nll, cuda_graphs=False, **run)
    assert replayed[0] == pytest.approx(interpreted[0], rel=1e-5)
    for index, value in interpreted[1].items():
        assert replayed[1][index] == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_most_sensitive_block_keeps_most_at_exact_overall_sparsity(graph, method):
    samples = calibration_samples(graph, WINDOWS, 6, 0, 0, "test")
    o = PruneOptions(method=method, sparsity=0.5, nsamples=6)
    measured = measure_sensitivity(
        graph,
        samples,
        default_targets,
        block_pruner(o, parse_pattern("unstructured")),
        target=0.5,
        step=0.1,
    )
    assert len(measured.units) == 3 and all(len(u) == 7 for u in measured.units)
    assert len(set(measured.rises)) == 3  # (a random model: rises of either sign)

    ctx = PassContext(calibration_data=WINDOWS)
    options = PruneOptions(
        method=method,
        sparsity=0.5,
        nsamples=6,
        sparsity_profile="sensitivity",
        sensitivity_lambda=0.06,
    )
    result = PrunePass(options).run(graph.copy(), ctx)
    assert result.stats["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert result.stats["profile_s"] > 0
    per_block = {}
    for node in result.graph.call_nodes():
        if "peakc_sparsity" in node.meta:
            block = ".".join(node.meta["peakc_module"].split(".")[:3])
            per_block.setdefault(block, []).append(node.meta["peakc_sparsity"]["sparsity"])
    scores = {  # each layer records its block's measured loss rise
        node.meta["peakc_sparsity"]["profile_score"]
        for node in result.graph.call_nodes()
        if "peakc_sparsity" in node.meta
    }
    assert len(scores) == 3
    achieved = [sum(v) / len(v) for v in per_block.values()]
    by_rise = sorted(range(3), key=measured.rises.__getitem__)
    assert [round(achieved[i], 2) for i in by_rise] == [0.56, 0.5, 0.44]


def test_probe_samples_limit_the_scoring_windows(graph):
    samples = calibration_samples(graph, WINDOWS, 6, 0, 0, "test")
    o = PruneOptions(sparsity=0.5, nsamples=6)
    prune_block = block_pruner(o, parse_pattern("unstructured"))
    two = measure_sensitivity(
        graph, samples, default_targets, prune_block, target=0.5, step=0.1, probe_samples=2
    )
    every = measure_sensitivity(graph, samples, default_targets, prune_block, target=0.5, step=0.1)
    assert two.rises != every.rises and len(two.rises) == len(every.rises) == 3


@pytest.mark.parametrize(
    "spec, message",
    [
        ("prune{sparsity_profile=sensitivity,sensitivity_lambda=0.5}", "'sensitivity_lambda'"),
        ("prune{sparsity_profile=sensitivity,sensitivity_step=0}", "'sensitivity_step'"),
        ("prune{sparsity_profile=sensitivity,sensitivity_nsamples=-1}", "'sensitivity_nsamples'"),
        ("prune{pattern=2:4,sparsity_profile=sensitivity}", "sensitivity applies to unstructured"),
    ],
)
def test_bad_sensitivity_options_are_clear_errors(spec, message):
    with pytest.raises(PeakcError, match=re.escape(message)):
        Pipeline.parse(spec)
