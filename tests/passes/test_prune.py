"""The prune pass end to end on a tiny Llama: options, errors, marks, artifacts."""

import json

import pytest
import torch

import peakc
from peakc.data import with_sequence_length
from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.models.demo import demo_llama, demo_mlp
from peakc.passes.base import PassContext
from peakc.passes.pipeline import Pipeline
from peakc.passes.prune import PruneOptions, PrunePass

SEQ = 16
WINDOWS = torch.randint(0, 256, (8, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama():
    model, inputs = demo_llama(seed=1, hidden_size=32, intermediate_size=64, num_heads=2)
    return model, with_sequence_length(inputs, SEQ)


@pytest.fixture(scope="module")
def graph(llama):
    return capture(*llama)


def prune(graph, **options):
    ctx = PassContext(calibration_data=WINDOWS)
    return PrunePass(PruneOptions(nsamples=8, **options)).run(graph.copy(), ctx)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("prune{sparsity=1.0}", "'sparsity' must be in [0, 1)"),
        ("prune{sparsity=-0.1}", "'sparsity' must be in [0, 1)"),
        ("prune{pattern=4:4}", "0 < N < M"),
        ("prune{pattern=5:4}", "0 < N < M"),
        ("prune{pattern=dense}", "unstructured or N:M"),
        ("prune{pattern=2:4,block_size=6}", "multiple of M=4"),
        ("prune{pattern=2:4,sparsity_profile=owl}", "owl applies to unstructured"),
        ("prune{damp=-1.0}", "'damp' must be >= 0"),
    ],
)
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises(PeakcError, match=message.replace("[", r"\[").replace(")", r"\)")):
        Pipeline.parse(spec)


def test_sparsegpt_without_calibration_data_says_how_to_give_it():
    pipe = Pipeline.parse("prune")
    with pytest.raises(PeakcError, match="needs calibration_data.*--calib-data"):
        pipe.check(PassContext())
    Pipeline.parse("prune{method=magnitude}").check(PassContext())  # magnitude needs none


def test_pattern_that_does_not_divide_a_layer_names_it():
    model, inputs = demo_mlp()
    graph = capture(model, inputs)
    with pytest.raises(PeakcError, match="3:5 does not divide layer layers.0's input size 32"):
        prune(graph, method="magnitude", pattern="3:5", block_size=5)


def test_seq_len_other_than_captured_is_explained(graph):
    with pytest.raises(PeakcError, match="captured at sequence length 16.*--seq-len 32"):
        prune(graph, seq_len=32)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_targets_pruned_exactly_head_and_embedding_untouched(graph, method, pattern):
    result = prune(graph, method=method, pattern=pattern)
    out = result.graph
    assert result.modified and result.stats["layers"] == 14
    assert result.stats["sparsity"] == 0.5
    for name, w in out.weights().items():
        if name.endswith("_proj.weight"):
            assert int((w == 0).sum()) == w.numel() // 2, name
            if pattern == "2:4":
                assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
        else:
            assert torch.equal(w, graph.get_weight(name)), name
    if method == "sparsegpt":
        assert 0 < result.stats["recon_error.mean"] < 1


def test_sparsegpt_keeps_outputs_closer_than_magnitude(graph):
    ref = graph.run(WINDOWS[:1])[0]
    err = {}
    for method in ("magnitude", "sparsegpt"):
        out = prune(graph, method=method).graph.run(WINDOWS[:1])[0]
        err[method] = float((out - ref).norm() / ref.norm())
    assert err["sparsegpt"] < err["magnitude"]


def test_targets_regex_limits_the_layers(graph):
    result = prune(graph, method="magnitude", targets=r"mlp\.down_proj")
    assert result.stats["layers"] == 2


def test_owl_keeps_overall_sparsity_and_varies_layers(graph):
    result = prune(graph, sparsity=0.6, sparsity_profile="owl", owl_lambda=0.1)
    assert abs(result.stats["sparsity"] - 0.6) < 2e-3
    assert result.stats["sparsity.max"] - result.stats["sparsity.min"] > 0.05


def test_owl_per_linear_varies_linears_within_a_block(graph):
    result = prune(graph, sparsity=0.6, sparsity_profile="owl", owl_granularity="linear")
    assert abs(result.stats["sparsity"] - 0.6) < 2e-3
    per_linear = {
        n.meta["peakc_module"]: n.meta["peakc_sparsity"]["sparsity"]
        for n in result.graph.call_nodes()
        if "peakc_sparsity" in n.meta and n.meta["peakc_module"].startswith("model.layers.0.")
    }
    assert max(per_linear.values()) - min(per_linear.values()) > 0.05


def test_pruned_artifact_saves_loads_runs_and_records_the_mask(llama, tmp_path):
    model, inputs = llama
    compiled = peakc.compile(
        model, inputs, pipeline="prune{pattern=2:4,nsamples=8}", calibration_data=WINDOWS
    )
    marks = [
        n.meta["peakc_sparsity"] for n in compiled.graph.call_nodes() if "peakc_sparsity" in n.meta
    ]
    assert len(marks) == 14 and all(m["pattern"] == "2:4" for m in marks)
    path = compiled.save(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    q = manifest["sparsity"]["model.layers.0.self_attn.q_proj"]
    assert q["pattern"] == "2:4" and q["sparsity"] == 0.5 and q["method"] == "sparsegpt"
    loaded = peakc.load(path)
    torch.testing.assert_close(loaded(inputs[0])[0], compiled(inputs[0])[0])
    w = loaded.weights["model.layers.1.mlp.down_proj.weight"]
    assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_sparsity_zero_changes_nothing(graph):
    result = prune(graph, method="magnitude", sparsity=0.0)
    assert not result.modified and result.report == {}
    assert not any("peakc_sparsity" in n.meta for n in result.graph.call_nodes())
    for name, w in result.graph.weights().items():
        assert torch.equal(w, graph.get_weight(name)), name


def test_targets_matching_nothing_is_an_error_naming_the_filter(graph):
    needle = "'prune': option 'targets' 'nothing_here' matches no linear"
    with pytest.raises(PeakcError, match=needle):
        prune(graph, method="magnitude", targets="nothing_here")


@pytest.mark.parametrize(
    "spec", ["prune{pattern=2:4,sparsity=0.6}", "prune{pattern=1:4,sparsity=0.3}"]
)
def test_nm_pattern_with_another_sparsity_is_an_error_naming_both(spec):
    needle = r"option 'sparsity' \(0\.\d\) disagrees with option 'pattern' \(\d:4"
    with pytest.raises(PeakcError, match=needle):
        Pipeline.parse(spec)


def test_nm_pattern_alone_or_with_its_own_sparsity_is_accepted():
    for spec in ("prune{pattern=1:4}", "prune{pattern=1:4,sparsity=0.75}", "prune{pattern=2:4}"):
        Pipeline.parse(spec)


def test_report_holds_the_predicted_cost_before_and_after(graph):
    result = prune(graph, method="magnitude")
    cost = result.report["cost"]
    assert cost["before"]["target"] == cost["after"]["target"] == "cpu"
    assert cost["before"]["prefill"]["ms"] > 0 and cost["after"]["prefill"]["ms"] > 0
