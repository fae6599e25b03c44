"""The offload executor on a simulated device: outputs equal to the plain graph (a forward and
greedy generation) with weights on every tier, the order of copies, disk reads and compute,
the artifact path, and the errors for plans from elsewhere and bad disk paths."""

import collections
import os

import pytest
import torch

import peakc
from peakc.errors import PeakcError
from peakc.ir.capture import capture
from peakc.models import load_source_for_task
from peakc.runtime import offload
from peakc.runtime.generate import Generator, SamplingConfig
from peakc.runtime.offload import (
    OffloadExecutor,
    OffloadStep,
    SimulatedTransfers,
    executor_graph,
    kv_layer,
    offload_step,
    offload_units,
    page_cache_share,
)

TIERS = ("gpu", "cpu", "disk")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]


@pytest.fixture(scope="module")
def decoder():
    """demo:llama (2 layers) captured as a KV-cache decoder with a 32-slot cache."""
    source = load_source_for_task("demo:llama", task="generate", max_seq_len=32, max_batch=2)
    graph = capture(source.module, source.example_inputs, name="demo", dynamic=source.dynamic)
    graph.info["generation"] = dict(source.generation)
    return graph


def plan_for(graph, tier_of, kv_tiers=(), disk_path="", gpu_memory=1e12, target="cpu", kv_bytes=0):
    """A plan by hand: `tier_of(index, name)` for each weight, `kv_tiers` per cache layer
    (each of `kv_bytes`, K and V together)."""
    weights = {
        name: {"tier": tier_of(i, name), "bytes": t.numel() * t.element_size()}
        for i, (name, t) in enumerate(graph.weights().items())
        if kv_layer(name) is None
    }
    return {
        "format": 1,
        "target": target,
        "gpu_memory": gpu_memory,
        "cpu_memory": 1e12,
        "disk_path": str(disk_path),
        "weights": weights,
        "kv_cache": {
            str(layer): {"tier": tier, "bytes": kv_bytes} for layer, tier in enumerate(kv_tiers)
        },
    }


def every_tier(index, name):
    return TIERS[index % 3]


def greedy(step, layout, device="cpu"):
    return Generator(step, layout, device).generate(PROMPTS, SamplingConfig(max_new_tokens=4))


def test_greedy_generation_equals_the_plain_graph_with_every_tier(decoder, tmp_path):
    graph = executor_graph(decoder)
    plan = plan_for(graph, every_tier, kv_tiers=("cpu", "gpu"), disk_path=tmp_path)
    executor = OffloadExecutor(graph, plan, SimulatedTransfers())
    assert set(plan["weights"][n]["tier"] for n in plan["weights"]) == set(TIERS)
    layout = decoder.info["generation"]
    ours = greedy(OffloadStep(executor, layout), layout)
    expected = greedy(lambda *inputs: decoder.run(*inputs), layout)
    assert ours.tokens == expected.tokens
    assert executor.kv_tensor("offload_kv.k0").device.type == "cpu"  # the host tier
    executor.close()
    assert list(tmp_path.iterdir()) == []


def test_device_holds_residents_caches_and_two_buffers_never_more(decoder):
    """The layers stream (layer 0 with its cache from the host), the rest is resident. The
    buffers are sized for layer 0 with its cache from the start: placing the caches when a
    generation begins must not grow them (the H200 run held four buffers for a moment and
    went over the budget), nor must a second generation."""
    graph = executor_graph(decoder)
    layout = decoder.info["generation"]
    batch = len(PROMPTS)
    kv_bytes = 2 * batch * layout["num_kv_heads"] * layout["max_seq_len"] * layout["head_dim"] * 4
    plan = plan_for(
        graph,
        lambda i, name: "cpu" if ".layers." in name else "gpu",
        kv_tiers=("cpu", "gpu"),
        kv_bytes=kv_bytes,
    )
    sim = SimulatedTransfers()
    executor = OffloadExecutor(graph, plan, sim)
    slots = executor.slots
    step = OffloadStep(executor, layout)
    for _ in range(2):
        greedy(step, layout)
    assert executor.slots is slots  # sized once
    resident = sum(e["bytes"] for e in plan["weights"].values() if e["tier"] == "gpu")
    buffer = max(lay.size for lay in executor.layouts)
    assert slots[0].numel() == buffer
    assert sim.memory_peak() == resident + kv_bytes + 2 * buffer  # layer 1's cache is resident
    assert sim.held == sim.memory_peak()
    executor.close()


@pytest.fixture()
def forward(small_llama):
    return small_llama(0)[1]


def streamed_plan(graph, disk_path):
    """Every tier, every unit streamed: norm weights resident, the rest of even units on the
    CPU tier, of odd units on disk."""
    unit_of = {w: i for i, u in enumerate(offload_units(graph)) for w in u.weights}

    def tier(index, name):
        return "gpu" if name.endswith("norm.weight") else ("cpu", "disk")[unit_of[name] % 2]

    return plan_for(graph, tier, disk_path=disk_path)


def test_forward_equals_the_graph_and_transfers_overlap_compute_in_order(forward, tmp_path):
    graph = executor_graph(forward)
    units = [u.name for u in offload_units(graph)]
    sim = SimulatedTransfers(h2d_bandwidth=1e8, disk_bandwidth=2e8, default_compute=1e-3)
    plan = streamed_plan(graph, tmp_path)
    assert {e["tier"] for e in plan["weights"].values()} == set(TIERS)
    executor = OffloadExecutor(graph, plan, sim)
    torch.testing.assert_close(executor(*forward.example_inputs), forward.run(), rtol=0, atol=0)

    ops = collections.defaultdict(dict)
    for entry in sim.schedule:
        ops[entry.kind][entry.label] = entry
    compute, copy, read = ops["compute"], ops["copy"], ops["read"]
    assert list(compute) == units and list(copy) == units  # each unit streamed once, in order
    assert sorted(read) == sorted(units[1::2])  # odd units come from disk
    for k, unit in enumerate(units):
        assert copy[unit].end <= compute[unit].start  # a unit computes on what was copied
        if unit in read:
            assert read[unit].end <= copy[unit].start  # copied from staging once it is read
        if k + 1 < len(units):  # the next unit's copy runs while this one computes
            assert copy[units[k + 1]].start < compute[unit].end
        if k + 2 < len(units):  # ...but not into the buffer this unit still reads
            assert copy[units[k + 2]].start >= compute[unit].end
            if unit in read and units[k + 2] in read:  # nor into the staging it was copied from
                assert read[units[k + 2]].start >= copy[unit].end
    serial = sum(e.end - e.start for e in sim.schedule)
    assert compute[units[-1]].end < 0.8 * serial
    executor.close()


def test_the_pass_predicts_the_schedule_the_executor_runs(forward, tmp_path):
    """`pipeline_seconds` (what the plan's tokens/s come from) is the executor's own schedule:
    on the simulated device, the first call takes the predicted prefill and the third the
    predicted decode step, with units mixing resident, pinned and disk tensors, some waiting
    on compute and some on transfers."""
    from peakc.passes.base import PassContext
    from peakc.passes.offload import OffloadOptions, Placement, build_problem, evaluate

    graph = executor_graph(forward)
    plan = plan_for(graph, every_tier, disk_path=tmp_path)
    problem = build_problem(forward, graph, PassContext(), OffloadOptions())
    problem.h2d, problem.disk_read = 2e8, 5e7
    problem.prefill = [3e-4, 1e-3, 5e-5, 4e-4, 2e-4]
    problem.decode = [1e-5, 2e-5, 4e-4, 1e-5, 3e-4]
    placement = Placement({n: plan["weights"][n]["tier"] for n in problem.weights}, [])
    cost = evaluate(problem, placement)
    for phase, calls, predicted in (
        (problem.prefill, 1, cost.prefill_seconds),
        (problem.decode, 3, cost.decode_seconds),
    ):
        sim = SimulatedTransfers(
            h2d_bandwidth=problem.h2d,
            disk_bandwidth=problem.disk_read,
            compute_seconds=dict(zip(problem.units, phase)),
        )
        executor = OffloadExecutor(graph, plan, sim)
        ends = [0.0]
        for _ in range(calls):
            executor(*forward.example_inputs)
            ends.append(sim.schedule[-1].end)
        executor.close()
        assert {e.kind for e in sim.schedule} == {"copy", "read", "compute"}
        assert ends[-1] - ends[-2] == pytest.approx(predicted, rel=1e-9)


def test_measured_compute_times_each_unit_and_the_step_around_them(decoder, monkeypatch):
    """On a fake clock that only the units' nodes and the KV write-back move: each unit gets
    its own time, the step the write-back's, and the layers (same weight shapes) share one
    set of device weights."""
    from types import SimpleNamespace

    from peakc.runtime import blocks

    graph = executor_graph(decoder)
    units = offload_units(graph)
    cost = {u.block.nodes[0]: 1.0 + i for i, u in enumerate(units)}
    now = [0.0]
    run_nodes, write_back = blocks.run_nodes, offload.write_back

    def timed_nodes(nodes, *args, **kwargs):
        now[0] += cost.get(nodes[0], 0.0)
        return run_nodes(nodes, *args, **kwargs)

    def timed_write_back(*args):
        now[0] += 0.5
        return write_back(*args)

    moved = collections.Counter()
    get_weight = graph.get_weight

    def counted(name):
        moved[name] += 1
        return get_weight(name)

    monkeypatch.setattr(blocks, "run_nodes", timed_nodes)
    monkeypatch.setattr(offload, "write_back", timed_write_back)
    monkeypatch.setattr(offload, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(graph, "get_weight", counted)
    caches = offload.layer_caches(decoder.info["generation"], 1)
    ids = torch.zeros(1, 1, dtype=torch.long)
    times = offload.measure_compute(graph, (ids, torch.full((1, 1), 5)), "cpu", caches, runs=3)
    assert times.units == [1.0, 2.0, 3.0, 4.0] and times.step == 0.5
    # every weight is read once for its shape; layer 0's are also moved in each of the 4 runs
    # (a warm-up and 3 timed), layer 1 runs on them
    assert {moved[w] for w in units[1].weights if kv_layer(w) is None} == {5}
    assert {moved[w] for w in units[2].weights if kv_layer(w) is None} == {1}


@pytest.mark.parametrize("reads", ["direct", "buffered"])
def test_disk_tier_is_read_from_the_disk_every_step(forward, tmp_path, monkeypatch, reads):
    """Every step reads the disk tier from the disk, as the plan assumes: O_DIRECT reads never
    put it in the page cache, buffered ones drop their pages once read."""
    probe = tmp_path / "probe"
    probe.write_bytes(bytes(1 << 16))
    with open(probe, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if page_cache_share([probe]) > 0:
        pytest.skip(f"the filesystem of {tmp_path} keeps dropped pages (tmpfs?)")
    if reads == "buffered":
        monkeypatch.setattr(offload, "open_direct", lambda path: None)
    graph = executor_graph(forward)
    executor = OffloadExecutor(graph, streamed_plan(graph, tmp_path), SimulatedTransfers())
    if executor.disk.reads != reads:
        executor.close()
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    for _ in range(2):
        outputs = executor(*forward.example_inputs)
        torch.testing.assert_close(outputs, forward.run(), rtol=0, atol=0)
        assert page_cache_share([executor.disk.path]) == 0
    executor.close()


def test_disk_reads_are_chunked_over_threads_and_short_reads_are_errors(tmp_path, monkeypatch):
    """Tensors of any size come back whole through reads of READ_CHUNK bytes on several
    threads, into aligned staging (direct) and misaligned staging (buffered); a file cut
    short is an error naming it, not a half-filled buffer used as weights."""
    monkeypatch.setattr(offload, "READ_CHUNK", 2 * offload.DISK_ALIGN)
    tensors = {
        "a": torch.randn(3000),  # 12000 bytes: two chunks and a part
        "b": torch.arange(7, dtype=torch.int16),
        "c": torch.randn(64, 33, dtype=torch.bfloat16),
    }
    disk = offload.DiskTier(tmp_path, tensors, threads=3)
    assert [disk.spans[n][0] % offload.DISK_ALIGN for n in tensors] == [0, 0, 0]
    staging = offload.disk_aligned(sum(disk.room(n) for n in tensors) + 1)
    for shift in (0, 1):  # 1: no destination is aligned, every read goes buffered
        items, at = [], shift
        for name in tensors:
            items.append((name, staging[at : at + disk.room(name)]))
            at += disk.room(name)
        disk.read_into(items)
        for (_, dst), tensor in zip(items, tensors.values()):
            size = tensor.numel() * tensor.element_size()
            assert torch.equal(dst[:size], offload.as_bytes(tensor))
    os.truncate(disk.path, disk.spans["c"][0] + 100)
    with pytest.raises(PeakcError, match=f"the disk tier {disk.path} ended at byte"):
        disk.read_into([("c", staging[: disk.room("c")])])
    disk.close()
    assert list(tmp_path.iterdir()) == []


def test_decoder_compiled_with_the_offload_pass_runs_from_its_artifact(decoder, tmp_path):
    """The pass plans the decoder (KV cache per layer, compute measured on this CPU), the
    manifest keeps the plan, and the executor built from the artifact generates what the
    captured decoder does."""
    weights = sum(t.numel() * t.element_size() for t in decoder.weights().values())
    spec = (
        f"offload{{gpu_memory={1.3 * weights / 1e9},cpu_memory={0.6 * weights / 1e9},"
        f'disk_path="{tmp_path}",batch=2,prompt_len=8,gen_len=8,reserve=1e-5,compute=measured}}'
    )
    compiled = peakc.compile(
        decoder.copy(), pipeline=spec, generation=decoder.info["generation"], parity=False
    )
    artifact = peakc.load(compiled.save(tmp_path / "artifact"))
    plan = artifact.manifest["offload"]
    assert set(plan["kv_cache"]) == {"0", "1"}
    assert plan["compute"] == "measured" and plan["step_seconds"]["decode"] > 0
    assert {e["tier"] for e in plan["weights"].values()} > {"gpu"}
    layout = artifact.manifest["generation"]
    sim = SimulatedTransfers()
    step = offload_step(artifact, sim)
    assert greedy(step, layout).tokens == greedy(lambda *i: decoder.run(*i), layout).tokens
    # what the simulated device held at most is what the plan counted, which leaves the
    # activations and the reserve their room in gpu_memory
    assert sim.memory_peak() == plan["predicted"]["held_bytes"]
    overhead = plan["activation_bytes"] + plan["reserve_bytes"]
    assert sim.memory_peak() + overhead <= plan["gpu_memory"]
    step.executor.close()


def test_workload_beyond_the_cache_is_refused(decoder):
    with pytest.raises(PeakcError, match="prompt_len 30 \\+ gen_len 8 exceeds the KV cache of 32"):
        peakc.compile(
            decoder.copy(),
            pipeline="offload{prompt_len=30,gen_len=8}",
            generation=decoder.info["generation"],
            parity=False,
        )


def test_plans_from_another_model_or_machine_are_refused(forward):
    graph = executor_graph(forward)
    plan = plan_for(graph, lambda i, n: "gpu")
    name = next(iter(plan["weights"]))
    other = {**plan, "weights": {**plan["weights"], name: {"tier": "gpu", "bytes": 4}}}
    with pytest.raises(PeakcError, match=f"weight '{name}' has 4 bytes .* another model"):
        OffloadExecutor(graph, other, SimulatedTransfers())
    renamed = {**plan, "weights": {k + "x": v for k, v in plan["weights"].items()}}
    with pytest.raises(PeakcError, match="has no tier for weight"):
        OffloadExecutor(graph, renamed, SimulatedTransfers())
    with pytest.raises(PeakcError, match="made for target 'h100-sxm', not for simulated device"):
        OffloadExecutor(graph, {**plan, "target": "h100-sxm"}, SimulatedTransfers())
    with pytest.raises(PeakcError, match="gpu_memory 2.00 GB .* has 1.00 GB"):
        OffloadExecutor(graph, {**plan, "gpu_memory": 2e9}, SimulatedTransfers(memory=10**9))


def test_disk_tier_without_space_or_folder_fails_and_writes_nothing(forward, tmp_path, monkeypatch):
    graph = executor_graph(forward)
    plan = plan_for(graph, lambda i, n: "disk", disk_path=tmp_path)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(offload.shutil, "disk_usage", lambda path: usage(10**6, 10**6, 1000))
    with pytest.raises(PeakcError, match=f"disk_path {tmp_path} has 1e-06 GB free|0.00 GB free"):
        OffloadExecutor(graph, plan, SimulatedTransfers())
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(PeakcError, match="disk_path .*nowhere is not a folder"):
        OffloadExecutor(
            graph, {**plan, "disk_path": str(tmp_path / "nowhere")}, SimulatedTransfers()
        )


def test_a_decoder_step_before_begin_is_an_error(decoder):
    graph = executor_graph(decoder)
    executor = OffloadExecutor(
        graph, plan_for(graph, lambda i, n: "gpu", ("gpu", "gpu")), SimulatedTransfers()
    )
    ids = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(PeakcError, match="KV cache 'offload_kv.k0' is not placed"):
        executor(ids, ids)
