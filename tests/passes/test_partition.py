"""partition: the dynamic program against brute force, memory limits, the block DAG, the plan."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peakc.cost_model.hardware import resolve_profile
from peakc.errors import PeakcError
from peakc.ir.stages import live_across, split_stages, stage_units
from peakc.passes.base import PassContext
from peakc.passes.partition import (
    CostTable,
    block_dag,
    brute_force_partition,
    cut_bytes,
    equal_blocks_cut,
    equal_params_cut,
    objective_value,
    plan_for,
    solve_partition,
)
from peakc.passes.pipeline import Pipeline


def table_of(seconds, weights, cuts, link=1.0, names=None) -> CostTable:
    n = len(seconds)
    return CostTable(
        names=names or [f"u{i}" for i in range(n)],
        seconds=list(seconds),
        weights=list(weights),
        kv_cache=[0.0] * n,
        working=[1.0] * n,
        cut_bytes=list(cuts),
        link_bandwidth=link,
    )


@st.composite
def problems(draw):
    n = draw(st.integers(2, 7))
    seconds = draw(st.lists(st.floats(0.01, 10.0), min_size=n, max_size=n))
    weights = draw(st.lists(st.floats(1.0, 20.0), min_size=n, max_size=n))
    cuts = draw(st.lists(st.floats(0.0, 3.0), min_size=n, max_size=n))
    stages = draw(st.integers(1, n))
    limit = draw(st.one_of(st.just(math.inf), st.floats(10.0, 80.0)))
    objective = draw(st.sampled_from(["throughput", "latency"]))
    schedule = draw(st.sampled_from(["gpipe", "1f1b"]))
    microbatches = draw(st.integers(1, 4))
    return table_of(seconds, weights, cuts), stages, objective, microbatches, schedule, limit


@settings(max_examples=150, deadline=None)
@given(problems())
def test_dynamic_program_matches_brute_force(problem):
    table, stages, objective, microbatches, schedule, limit = problem
    best = brute_force_partition(table, stages, objective, microbatches, schedule, limit)
    if best is None:
        with pytest.raises(PeakcError, match="fits? the memory limit"):
            solve_partition(table, stages, objective, microbatches, schedule, limit)
        return
    plan = solve_partition(table, stages, objective, microbatches, schedule, limit)
    assert max(plan.memory) <= limit
    assert len(plan.boundaries) == stages + 1
    assert objective_value(plan, objective, microbatches) == pytest.approx(
        objective_value(best, objective, microbatches), rel=1e-9
    )
    if objective == "throughput" and limit == math.inf:  # never worse than the baselines
        for cut in (equal_blocks_cut(table, stages), equal_params_cut(table, stages)):
            baseline = plan_for(table, cut, schedule, microbatches, limit)
            assert plan.bottleneck <= baseline.bottleneck * (1 + 1e-9)


def test_heavy_head_is_balanced_where_equal_blocks_is_not():
    # an 8B-like shape: embedding cheap, 8 equal layers, a head costing two layers
    names = ["prologue", *(f"model.layers.{i}" for i in range(8)), "epilogue"]
    table = table_of([0.1] + [1.0] * 8 + [2.0], [1.0] * 10, [0.0] * 10, names=names)
    plan = solve_partition(table, 2)
    equal = plan_for(table, equal_blocks_cut(table, 2), "1f1b", 1, math.inf)
    assert equal.boundaries == [0, 5, 10]
    assert plan.imbalance < 1.05 < equal.imbalance


def test_more_stages_than_blocks_is_an_error():
    with pytest.raises(PeakcError, match="stages=4 but the graph has only 3 blocks"):
        solve_partition(table_of([1, 1, 1], [1, 1, 1], [0, 0, 0]), 4)


def test_memory_limit_no_cut_meets_names_the_largest_block():
    table = table_of([1, 1, 1], [5, 30, 5], [0, 0, 0], names=["prologue", "layer", "epilogue"])
    with pytest.raises(PeakcError, match="block 'layer' alone does not fit.*largest block 'layer'"):
        solve_partition(table, 2, limit=20)
    with pytest.raises(PeakcError, match="no cut into 2 stages fits the memory limit"):
        solve_partition(table, 2, limit=35)  # each block fits, but never two of them together
    assert solve_partition(table, 3, limit=35).boundaries == [0, 1, 2, 3]


def test_gpipe_holds_every_microbatch_in_flight():
    table = table_of([1, 1], [1, 1], [0, 10])
    # the second stage receives 10 bytes per microbatch: 4 in flight under gpipe, 1 under 1f1b
    assert plan_for(table, [0, 1, 2], "gpipe", 4, math.inf).memory[1] == 1 + 1 + 40
    assert plan_for(table, [0, 1, 2], "1f1b", 4, math.inf).memory[1] == 1 + 1 + 10


@pytest.fixture(scope="module")
def decoder_graph():
    from peakc.ir.capture import capture
    from peakc.models import load_source_for_task

    source = load_source_for_task("demo:llama", "generate", max_seq_len=32, max_batch=2)
    graph = capture(source.module, source.example_inputs, dynamic=source.dynamic)
    graph.info["generation"] = source.generation
    return graph


def run(graph, spec: str, target: str = "h200"):
    return Pipeline.parse(spec).run(graph.copy(), PassContext(target=resolve_profile(target)))


def test_units_are_whole_layers(decoder_graph):
    names = [u.name for u in stage_units(decoder_graph)]
    assert names == ["prologue", "model.layers.0", "model.layers.1", "epilogue"]


def test_cut_sizes_come_from_the_block_dag(decoder_graph):
    from peakc.cost_model.predict import concrete

    shaped = concrete(
        decoder_graph, [(tuple(t.shape), t.dtype, t.device) for t in decoder_graph.example_inputs]
    )
    units = stage_units(shaped)
    dag = block_dag(shaped, units)
    assert dag.has_edge("model.layers.0", "model.layers.1")
    sizes = cut_bytes(dag, len(units))
    (live,) = live_across(shaped, units, [2])
    expected = sum(
        n.meta["val"].numel() * n.meta["val"].element_size()
        for n in live
        if hasattr(n.meta["val"], "numel")
    )
    assert sizes[2] == expected > 0
    # the hidden state of [2, 8, 64] floats crosses every layer cut (the cache does not)
    assert 2 * 8 * 64 * 4 <= sizes[2] < 2 * 8 * 64 * 4 * 4


def test_pass_records_plan_and_baselines(decoder_graph):
    graph, records = run(decoder_graph, "partition{stages=2,schedule=gpipe,microbatches=2}")
    plan = graph.info["partition"]
    assert plan["world_size"] == 2 and plan["boundaries"] == [0, 2, 4]
    stats, report = records[-1]["stats"], records[-1]["report"]
    assert stats["bubble_fraction"] == pytest.approx(1 / 3, abs=1e-4)
    assert stats["imbalance"] >= 1.0
    assert set(report["baselines"]) == {"equal-blocks", "equal-params"}
    assert [row["stage"] for row in report["predicted"]["stages"]] == [0, 1]
    assert records[-1]["modified"] is False


def test_auto_takes_the_fewest_stages_that_fit(decoder_graph):
    graph, records = run(decoder_graph, "partition")
    assert graph.info["partition"]["world_size"] == 1
    one = records[-1]["report"]["predicted"]["stages"][0]["memory_gib"]
    graph, records = run(decoder_graph, f"partition{{memory_limit={one * 0.8}}}")
    assert graph.info["partition"]["world_size"] >= 2
    assert all(r["memory_gib"] <= one * 0.8 for r in records[-1]["report"]["predicted"]["stages"])


def test_pass_errors_name_the_fault(decoder_graph):
    with pytest.raises(PeakcError, match="stages=5 but the graph has only 4 blocks"):
        run(decoder_graph, "partition{stages=5}")
    with pytest.raises(PeakcError, match=r"largest block '[\w.]+' needs"):
        run(decoder_graph, "partition{stages=2,memory_limit=0.00001}")
    with pytest.raises(PeakcError, match="has no 'nvlink' bandwidth"):
        run(decoder_graph, "partition{stages=2,link=nvlink}", target="cpu")
    with pytest.raises(PeakcError, match="microbatches a multiple of stages"):
        Pipeline.parse("partition{stages=2,schedule=interleaved,microbatches=3}")


def test_interleaved_gives_each_rank_two_chunks(decoder_graph):
    graph, _ = run(decoder_graph, "partition{stages=2,schedule=interleaved,microbatches=2}")
    plan = graph.info["partition"]
    assert plan["world_size"] == 2 and plan["boundaries"] == [0, 1, 2, 3, 4]


def test_measured_balance_reports_both_cuts(decoder_graph):
    graph, records = run(decoder_graph, "partition{stages=2,balance=measured}")
    report = records[-1]["report"]
    assert graph.info["partition"]["balance"] == "measured"
    assert report["measured"]["boundaries"] == graph.info["partition"]["boundaries"]
    assert report["predicted_cut_measured"]["boundaries"] == report["predicted"]["boundaries"]
    assert all(row["predicted_ms"] > 0 for row in report["measured"]["stages"])


def test_stages_chain_to_the_whole_graph(decoder_graph):
    import torch

    whole = decoder_graph.run()
    carried, new_k = (), []
    for stage in split_stages(decoder_graph, [0, 1, 3, 4]):
        inputs = stage.example_inputs
        out = stage.run(*(carried or inputs[:2]), *inputs[len(carried or inputs[:2]) :])
        if stage.info["stage"]["layers"]:
            *carried, k, _ = out
            new_k.append(k)
        else:
            carried = out
        carried = tuple(carried)
    assert torch.equal(carried[0], whole[0])
    assert torch.equal(torch.cat(new_k), whole[1])


def test_a_backend_without_stages_is_refused_before_capture():
    """ort lowers one program: a partition plan is refused, not silently dropped."""
    import peakc

    with pytest.raises(PeakcError, match="backend 'ort' does not lower pipeline stages"):
        peakc.compile("demo:llama", pipeline="partition{stages=2}", backend="ort")
