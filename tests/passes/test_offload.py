"""offload pass: the placement program against brute force, accelerate's greedy rule, the plan
on a graph, and the errors for budgets that cannot work and bad disk paths."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peakc.errors import PeakcError
from peakc.passes.base import PassContext
from peakc.passes.offload import (
    ALIGN,
    DISK_ALIGN,
    GB,
    OffloadOptions,
    OffloadPass,
    Placement,
    PlacementProblem,
    accelerate_cost,
    accelerate_placement,
    brute_force,
    evaluate,
    solve_placement,
)
from peakc.passes.pipeline import Pipeline

MB = 1e6


@st.composite
def problems(draw) -> PlacementProblem:
    """2-3 units, 2-4 weights (some read by two units), 0-2 cache layers, sizes in whole MB and
    budgets in half MB (no ties within the solver's tolerance)."""
    units = draw(st.integers(2, 3))
    count = draw(st.integers(2, 4))
    weights, readers = {}, {}
    for i in range(count):
        weights[f"w{i}"] = draw(st.integers(1, 8)) * int(MB)
        first = draw(st.integers(0, units - 1))
        second = draw(st.integers(0, units - 1))
        readers[f"w{i}"] = sorted({first, second})
    layers = draw(st.integers(0, 2))
    times = st.floats(1e-5, 2e-3)
    return PlacementProblem(
        units=[f"u{u}" for u in range(units)],
        prefill=[draw(times) for _ in range(units)],
        decode=[draw(times) for _ in range(units)],
        weights=weights,
        readers=readers,
        kv=[draw(st.integers(1, 4)) * int(MB) for _ in range(layers)],
        kv_unit=[draw(st.integers(0, units - 1)) for _ in range(layers)],
        gpu_memory=draw(st.integers(2, 70)) * MB / 2 + MB / 4,
        cpu_memory=draw(st.integers(0, 70)) * MB / 2 + MB / 4,
        disk_memory=draw(st.sampled_from([0, 12, 100])) * MB + MB / 4,
        activation_bytes=draw(st.integers(0, 4)) * MB,
        h2d=draw(st.sampled_from([1e9, 5e9, 20e9])),
        h2d_pageable=1e9,
        disk_read=draw(st.sampled_from([5e8, 2e9])),
        decode_steps=draw(st.integers(0, 20)),
    )


@settings(max_examples=60, deadline=None)
@given(problems())
def test_program_finds_the_brute_force_optimum(problem):
    best = brute_force(problem)
    if best is None:
        with pytest.raises(PeakcError, match="pass 'offload'"):
            solve_placement(problem, gap=1e-7)
        return
    solution = solve_placement(problem, gap=1e-7)
    cost = evaluate(problem, solution.placement)
    assert cost.fits
    assert cost.objective(problem) == pytest.approx(best[1].objective(problem), rel=1e-5)


def two_layer_problem(**budgets) -> PlacementProblem:
    """An embedding, two 4 MB layers and a head; transfers slower than compute."""
    return PlacementProblem(
        units=["prologue", "layers.0", "layers.1", "epilogue"],
        prefill=[1e-4, 2e-3, 2e-3, 1e-3],
        decode=[1e-5, 1e-4, 1e-4, 1e-4],
        weights={"embed": 2_000_000, "l0": 4_000_000, "l1": 4_000_000, "head": 2_000_000},
        readers={"embed": [0], "l0": [1], "l1": [2], "head": [3]},
        h2d=10e9,
        h2d_pageable=4e9,
        disk_read=1e9,
        decode_steps=31,
        **budgets,
    )


def test_accelerate_fills_the_gpu_in_order_less_the_largest_unit_then_cpu_then_disk():
    problem = two_layer_problem(gpu_memory=10e6, cpu_memory=4.5e6, disk_memory=1e9)
    greedy = accelerate_placement(problem)
    # 10 MB less the largest unit (4 MB): embed (2) and layers.0 (4) fit, layers.1 does not;
    # the CPU takes layers.1, and the head no longer fits there: disk.
    assert greedy.weights == {"embed": "gpu", "l0": "gpu", "l1": "cpu", "head": "disk"}
    cost = accelerate_cost(problem, greedy)
    serial = 1e-5 + 1e-4 + (1e-4 + 4e6 / 4e9) + (1e-4 + 2e6 / 4e9 + 2e6 / 1e9)
    assert cost["decode_seconds"] == pytest.approx(serial)


def test_plan_beats_greedy_by_overlapping_and_using_pinned_memory():
    problem = two_layer_problem(gpu_memory=10e6, cpu_memory=14e6, disk_memory=1e9)
    solution = solve_placement(problem)
    plan = evaluate(problem, solution.placement)
    greedy = accelerate_cost(problem, accelerate_placement(problem))
    # two 4 MB buffers and the embedding fill the GPU; the rest streams from pinned memory,
    # each copy hidden behind nothing but itself (0.4 ms) instead of 1 ms of pageable copy
    # followed by compute
    assert solution.placement.weights == {"embed": "gpu", "l0": "cpu", "l1": "cpu", "head": "cpu"}
    assert sum(plan.unit_decode) == pytest.approx(1e-5 + 4e-4 + 4e-4 + 2e-4)
    # as scheduled: the copies back to back (1 ms), then the head's compute (0.1 ms), which
    # nothing hides: the next step's first copy goes into the buffer the head reads
    assert plan.decode_seconds == pytest.approx(4e-4 + 4e-4 + 2e-4 + 1e-4)
    assert plan.tokens_per_second(problem)["decode_tok_s"] > 1.6 * greedy["decode_tok_s"]


def test_unit_time_is_the_largest_of_compute_copy_and_disk_read():
    problem = two_layer_problem(gpu_memory=1e9, cpu_memory=1e9, disk_memory=1e9)
    placement = Placement({"embed": "gpu", "l0": "cpu", "l1": "disk", "head": "gpu"}, [])
    cost = evaluate(problem, placement)
    assert cost.unit_decode == pytest.approx([1e-5, 4e6 / 10e9, 4e6 / 1e9, 1e-4])
    assert cost.buffer_bytes == 4e6 and cost.staging_bytes == 4_001_792  # 977 x DISK_ALIGN


def test_buffers_and_gpu_memory_count_what_the_executor_allocates():
    """Streamed tensors take ALIGN-padded room in the buffers (as the executor lays them out);
    the GPU total adds activations and the reserve to residents and both buffers."""
    from peakc.runtime import offload

    assert (ALIGN, DISK_ALIGN) == (offload.ALIGN, offload.DISK_ALIGN)
    problem = PlacementProblem(
        units=["a", "b"],
        prefill=[1e-3, 1e-3],
        decode=[1e-4, 1e-4],
        weights={"w": 1000, "x": 10, "y": 3000},
        readers={"w": [0], "x": [0], "y": [1]},
        kv=[600],
        kv_unit=[0],
        gpu_memory=1e6,
        cpu_memory=1e6,
        activation_bytes=5000,
        reserve_bytes=700,
    )
    cost = evaluate(problem, Placement({"w": "cpu", "x": "cpu", "y": "gpu"}, ["cpu"]))
    assert cost.buffer_bytes == 1024 + 256 + 2 * 512  # K and V are two tensors
    assert cost.gpu_bytes == 3000 + 2 * cost.buffer_bytes + 5000 + 700
    problem.gpu_memory = cost.gpu_bytes - 1  # one byte short: the program must not take it
    solution = solve_placement(problem, gap=1e-7)
    assert evaluate(problem, solution.placement).fits
    assert solution.placement != Placement({"w": "cpu", "x": "cpu", "y": "gpu"}, ["cpu"])


def test_attention_scratch_is_counted_in_the_activations():
    """peakc.attention_cache copies both caches, repeats them per query group and builds a
    mask and a score matrix inside itself; no node's value shows those bytes."""
    import torch
    import torch.fx as fx

    from peakc.ir import ops  # noqa: F401  (registers peakc::attention_cache)
    from peakc.passes.offload import hidden_scratch

    graph = fx.Graph()
    shapes = {"q": (2, 8, 16, 4), "k": (2, 2, 16, 4), "v": (2, 2, 16, 4)}
    shapes |= {"k_cache": (2, 2, 64, 4), "v_cache": (2, 2, 64, 4), "pos": (2, 16)}
    args = []
    for name, shape in shapes.items():
        node = graph.placeholder(name)
        node.meta["val"] = torch.empty(shape, device="meta")
        args.append(node)
    attention = graph.call_function(torch.ops.peakc.attention_cache.default, (*args, 0.5))
    cache = 2 * 2 * 64 * 4 * 4  # one cache, fp32
    scatter, repeats = 2 * cache, 2 * 4 * cache  # 8 query heads read 2 kv heads
    mask, scores = 2 * 16 * 64, 4 * 2 * 8 * 16 * 64
    assert hidden_scratch(attention) == scatter + repeats + mask + scores
    assert hidden_scratch(args[0]) == 0


@pytest.fixture()
def forward_graph(small_llama):
    return small_llama(0)[1].copy()


def weight_bytes(graph) -> int:
    return sum(t.numel() * t.element_size() for t in graph.weights().values())


def test_pass_records_a_plan_for_every_weight(forward_graph, tmp_path):
    total = weight_bytes(forward_graph)
    options = OffloadOptions(
        gpu_memory=1.2 * total / GB, cpu_memory=0.5 * total / GB, disk_path=str(tmp_path)
    )
    options.reserve = 1e-5
    result = OffloadPass(options).run(forward_graph, PassContext())
    plan = result.graph.info["offload"]
    assert plan["reserve_bytes"] == pytest.approx(1e4) and plan["activation_bytes"] > 0
    assert set(plan["weights"]) == set(forward_graph.weights())
    assert {e["tier"] for e in plan["weights"].values()} <= {"gpu", "cpu", "disk"}
    assert plan["units"][0] == "prologue" and plan["units"][-1] == "epilogue"
    assert plan["predicted"]["gpu_bytes"] <= options.gpu_memory * GB
    assert result.stats["gpu_mb"] > 0 and result.stats["cpu_mb"] + result.stats["disk_mb"] > 0
    assert not result.modified
    assert result.report["predicted"]["decode_tok_s"] >= result.report["accelerate"][
        "decode_tok_s"
    ] * (1 - 1e-6)
    assert [row["unit"] for row in result.report["plan"]] == plan["units"]


def test_budget_below_the_largest_block_and_buffers_names_the_block(forward_graph):
    from peakc.runtime.offload import executor_graph, offload_units

    units = offload_units(executor_graph(forward_graph))
    weights = forward_graph.weights()
    sizes = {u.name: sum(weight_bytes_of(weights[w]) for w in u.weights) for u in units}
    largest = max(sizes, key=sizes.get)
    options = OffloadOptions(gpu_memory=1.5 * sizes[largest] / GB, cpu_memory=1.0, reserve=0.0)
    with pytest.raises(PeakcError, match=re.escape(f"cannot hold block '{largest}'")):
        OffloadPass(options).run(forward_graph, PassContext())


def weight_bytes_of(t) -> int:
    return t.numel() * t.element_size()


def test_weights_that_fit_no_tier_say_what_is_missing(forward_graph):
    total = weight_bytes(forward_graph)
    options = OffloadOptions(gpu_memory=1.2 * total / GB, cpu_memory=1e-6, reserve=0.0)
    with pytest.raises(PeakcError, match="give disk_path for a disk tier"):
        OffloadPass(options).run(forward_graph, PassContext())


def test_bad_disk_paths_and_options_are_one_line_errors(forward_graph, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(PeakcError, match=f"disk_path {missing} is not an existing folder"):
        OffloadPass(OffloadOptions(disk_path=str(missing))).run(forward_graph, PassContext())
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(PeakcError, match="is not an existing folder"):
        OffloadPass(OffloadOptions(disk_path=str(a_file))).run(forward_graph, PassContext())
    with pytest.raises(PeakcError, match="option 'gen_len' must be at least 1"):
        OffloadPass(OffloadOptions(gen_len=0))
    with pytest.raises(PeakcError, match="gpu_memory 900.0 GB exceeds target 'cpu'"):
        OffloadPass(OffloadOptions(gpu_memory=900.0)).run(forward_graph, PassContext())


def test_spec_round_trips():
    spec = 'offload{gpu_memory=8.0,cpu_memory=4.0,disk_path="/tmp/x",gen_len=64}'
    pipeline = Pipeline.parse(spec)
    assert Pipeline.parse(str(pipeline)) == pipeline
    assert pipeline.passes[0].options.gpu_memory == 8.0


def test_schedule_counts_the_step_and_the_host_waiting_for_a_host_tier_cache():
    """A resident unit (1 s) and a streamed one (2 s of copy, 1 s of compute), then 0.5 s of
    the step's own work. Steady state: the copy waits for the streamed unit's last compute
    (its buffer), so a call takes 3 s; when the KV write-back makes the host wait for the
    step, the next copy is issued only after it: 3.5 s."""
    from peakc.passes.offload import pipeline_seconds

    problem = PlacementProblem(
        units=["a", "b"], prefill=[], decode=[], weights={}, readers={}, h2d=1.0
    )
    args = (problem, [1.0, 1.0], [0, 2], [0, 0], 0.5)
    assert pipeline_seconds(*args, sync=False, calls=1) == pytest.approx(3.5)  # from idle
    assert pipeline_seconds(*args, sync=False, calls=3) == pytest.approx(3.0)
    assert pipeline_seconds(*args, sync=True, calls=3) == pytest.approx(3.5)


def test_measured_compute_replaces_the_estimate_in_the_plan(forward_graph, monkeypatch):
    """`compute=measured`: the unit times and the step's own seconds measured on the pass's
    device are what the plan is made from and what its prediction counts."""
    from peakc.runtime import offload as runtime

    seen = {}

    def measure(graph, inputs, device, caches=None, runs=3):
        seen["device"] = device
        units = runtime.offload_units(graph)
        return runtime.ComputeTimes([1e-3 * (i + 1) for i in range(len(units))], 2e-3)

    monkeypatch.setattr(runtime, "measure_compute", measure)
    total = weight_bytes(forward_graph)
    options = OffloadOptions(
        gpu_memory=10 * total / GB, cpu_memory=1.0, reserve=0.0, compute="measured"
    )
    result = OffloadPass(options).run(forward_graph, PassContext(device="cpu"))
    plan = result.graph.info["offload"]
    units = len(plan["units"])
    assert str(seen["device"]) == "cpu" and result.report["compute"] == "measured"
    assert [row["compute_ms"] for row in result.report["plan"]] == [i + 1 for i in range(units)]
    assert plan["step_seconds"] == {"prefill": 2e-3, "decode": 2e-3}
    # everything resident: a call is the units' compute one after another and the step's work
    seconds = sum(1e-3 * (i + 1) for i in range(units)) + 2e-3
    assert plan["predicted"]["decode_seconds"] == pytest.approx(seconds)


def test_linear_wq_scratch_is_what_its_reference_allocates():
    """The planner's activation bytes count the reference linear_wq's transient tensors (the
    int64 codes and zero points the unpacking makes): within 5 % of the live bytes measured
    while it runs (every tensor an aten op returns, until freed)."""
    import weakref

    import torch
    import torch.fx as fx
    from torch.utils._python_dispatch import TorchDispatchMode

    from peakc.ir.ops import LINEAR_WQ, pack_bits
    from peakc.passes.offload import hidden_scratch

    class LiveBytes(TorchDispatchMode):
        live = peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                    size = t.untyped_storage().nbytes()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t.untyped_storage(), self.free, size)
            return out

        def free(self, size):
            self.live -= size

    rows, columns, group = 96, 512, 64
    args = (
        torch.randn(1, columns, dtype=torch.bfloat16),
        pack_bits(torch.randint(0, 16, (rows, columns)), 4),
        torch.rand(rows, columns // group, dtype=torch.bfloat16),
        pack_bits(torch.full((rows, columns // group), 8), 4),
    )
    with LiveBytes() as live:
        LINEAR_WQ.reference(*args, None, None, 4, group, columns)
    graph = fx.Graph()
    nodes = []
    for name, value in zip(("x", "qweight", "scales", "qzeros"), args):
        nodes.append(graph.placeholder(name))
        nodes[-1].meta["val"] = value
    node = graph.call_function(LINEAR_WQ.overload, (*nodes, None, None, 4, group, columns))
    assert hidden_scratch(node) == pytest.approx(live.peak, rel=0.05)


@pytest.fixture(scope="module")
def int4_decoder():
    """demo:llama in bf16 as a 32-slot KV-cache decoder, its layers' linears at 4 bits."""
    from peakc.ir.capture import capture
    from peakc.models import load_source_for_task

    source = load_source_for_task(
        "demo:llama", task="generate", max_seq_len=32, max_batch=1, dtype="bfloat16"
    )
    graph = capture(source.module, source.example_inputs, name="demo", dynamic=source.dynamic)
    graph.info["generation"] = dict(source.generation)
    spec = "quantize{method=rtn,bits=4,group_size=16}"
    return Pipeline.parse(spec).run(graph, PassContext(device="cpu"))[0]


def test_int4_weights_are_planned_at_their_kernel_layout_size(int4_decoder, tmp_path):
    """Linears the Triton kernels take are placed as the repacked tensors the executor streams
    (names and bytes), and their scratch in the activations is the kernels', not the
    reference's dequantization."""
    pytest.importorskip("triton")
    from peakc.passes.offload import build_problem
    from peakc.runtime.offload import executor_graph, kv_layer

    options = OffloadOptions(prompt_len=8, gen_len=8, disk_path=str(tmp_path), reserve=0.0)
    result = OffloadPass(options).run(int4_decoder, PassContext())
    plan = result.graph.info["offload"]
    assert plan["linear_wq"] and set(plan["linear_wq"].values()) == {"triton"}
    assert result.stats["linear_wq.triton"] == len(plan["linear_wq"])
    runnable = executor_graph(int4_decoder)
    streamed = {
        n: t.numel() * t.element_size()
        for n, t in runnable.weights().items()
        if kv_layer(n) is None
    }
    assert {n: e["bytes"] for n, e in plan["weights"].items()} == streamed
    assert any(".triton_qweight" in n for n in streamed)
    assert not any(n.endswith(".qzeros") for n in streamed)

    reference = build_problem(
        int4_decoder, executor_graph(int4_decoder, kernels=False), PassContext(), options
    )
    assert not any(".triton_" in n for n in reference.weights) and not reference.linear_wq
    assert plan["activation_bytes"] < reference.activation_bytes
