"""OWL allocation: outlier scores, the dense pre-pass, and the sparsity profile it gives."""

import re

import pytest
import torch

from peakc.errors import PeakcError
from peakc.passes.base import PassContext
from peakc.passes.calibration import default_targets
from peakc.passes.pipeline import Pipeline
from peakc.passes.prune import PruneOptions, PrunePass
from peakc.passes.prune.owl import (
    inverse_diagonal,
    measure_outliers,
    obs_scores,
    outlier_ratio,
    wanda_scores,
)
from peakc.passes.prune.profile import spread_sparsities
from peakc.runtime.samples import calibration_samples

SEQ = 16
WINDOWS = torch.randint(0, 256, (4, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama(small_llama):
    return small_llama(3)


def test_obs_score_on_a_hand_made_hessian():
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # H⁻¹ = [[2, -1], [-1, 2]] / 3
    w = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    got = obs_scores(w, inverse_diagonal(h, 0.0, "x"))
    torch.testing.assert_close(got, w.abs() / (2.0 / 3.0) ** 0.5)


def test_obs_score_is_wanda_for_a_diagonal_hessian_and_zero_for_dead_inputs():
    h = torch.diag(torch.tensor([4.0, 0.25, 0.0]))
    w = torch.tensor([[1.0, -2.0, 5.0], [-3.0, 0.5, 1.0]])
    got = obs_scores(w, inverse_diagonal(h, 0.0, "x"))
    torch.testing.assert_close(got, wanda_scores(w, h))
    assert got[:, 2].eq(0).all()


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([[1.0, 1.0, 1.0, 9.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0]])]
    assert outlier_ratio(scores, 3.0) == 1 / 8  # mean 1.5: only 9 is above 4.5


@pytest.mark.parametrize("shape", ["linear", "rank"])
def test_allocation_keeps_the_weighted_mean_and_gives_outliers_density(shape):
    ratios = [0.01, 0.30, 0.02, 0.05, 0.03]  # one extreme unit
    params = [10, 10, 10, 10, 10]
    got = spread_sparsities(ratios, params, 0.5, 0.05, shape)
    assert sum(got) / len(got) == pytest.approx(0.5)
    assert max(got) - min(got) == pytest.approx(0.1)
    order = sorted(range(5), key=ratios.__getitem__)
    assert [got[i] for i in order] == sorted(got, reverse=True)
    if shape == "rank":  # evenly spread: exactly S − λ .. S + λ
        assert sorted(got) == pytest.approx([0.45, 0.475, 0.5, 0.525, 0.55])
    else:  # the min-max map lets one extreme unit pull the rest above S
        assert min(got) < 0.45 and sorted(got)[1] > 0.5


def test_rank_allocation_shares_ranks_on_ties_and_weights_by_size():
    got = spread_sparsities([0.1, 0.1, 0.3], [1, 1, 2], 0.5, 0.1, "rank")
    assert got[0] == got[1]
    assert (got[0] + got[1] + 2 * got[2]) / 4 == pytest.approx(0.5)


def hooked_inputs(model, data):
    """Every layer linear's inputs over the samples, from the dense torch model."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and default_targets(name):

            def hook(m, args, name=name):
                seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for (ids,) in data:
            model(ids)
    for h in handles:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.mark.parametrize("score", ["wanda", "obs"])
def test_prepass_ratios_are_the_dense_models(llama, score):
    model, graph = llama
    data = calibration_samples(graph, WINDOWS, 4, 0, 0, "test")
    profile = measure_outliers(graph, data, default_targets, threshold=2.0, score=score)
    assert len(profile.units) == 3 and len(profile.units[0]) == 7
    inputs = hooked_inputs(model, data)
    modules = dict(model.named_modules())
    for unit, ratio in zip(profile.units, profile.ratios):
        scores = []
        for name in unit:
            x = inputs[name].double()
            h = (2 * x.T @ x / x.shape[0]).float()
            w = modules[name].weight.detach()
            if score == "obs":
                scores.append(obs_scores(w, inverse_diagonal(h, 0.01, name)))
            else:
                scores.append(wanda_scores(w, h))
        assert ratio == pytest.approx(outlier_ratio(scores, 2.0), abs=2e-4)


@pytest.mark.parametrize("score", ["wanda", "obs"])
def test_rank_profile_spans_s_plus_minus_lambda_with_exact_overall_sparsity(llama, score):
    _, graph = llama
    options = PruneOptions(
        sparsity=0.5,
        nsamples=4,
        sparsity_profile="owl",
        owl_score=score,
        owl_shape="rank",
        owl_lambda=0.06,
        owl_threshold=2.0,
    )
    ctx = PassContext(calibration_data=WINDOWS)
    result = PrunePass(options).run(graph.copy(), ctx)
    assert abs(result.stats["sparsity"] - 0.5) < 1e-3
    per_block: dict[str, list[float]] = {}
    for node in result.graph.call_nodes():
        if "peakc_sparsity" in node.meta:
            block = ".".join(node.meta["peakc_module"].split(".")[:3])
            per_block.setdefault(block, []).append(node.meta["peakc_sparsity"]["sparsity"])
    assert len(per_block) == 3
    for values in per_block.values():  # one target per block, within [S − λ, S + λ]
        assert max(values) - min(values) < 0.01
        assert 0.44 - 0.005 <= values[0] <= 0.56 + 0.005
    spread = sorted(v[0] for v in per_block.values())
    assert spread[0] == pytest.approx(0.44, abs=0.005)
    assert spread[-1] == pytest.approx(0.56, abs=0.005)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("prune{sparsity_profile=owl,owl_lambda=-0.1}", "'owl_lambda' must be in [0, 0.5)"),
        ("prune{sparsity_profile=owl,owl_threshold=0}", "'owl_threshold' must be > 0"),
        ("prune{sparsity_profile=owl,owl_score=grad}", "owl_score"),
    ],
)
def test_bad_owl_options_are_clear_errors(spec, message):
    with pytest.raises(PeakcError, match=re.escape(message)):
        Pipeline.parse(spec)
