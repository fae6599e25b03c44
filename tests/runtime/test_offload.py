"""The offload executor on a simulated device: outputs equal to the plain graph (a forward and
greedy generation) with weights on every tier, the order of copies, disk reads and compute,
the artifact path, and the errors for plans from elsewhere and bad disk paths."""

import collections
import mmap
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


def test_disk_tier_is_read_from_the_disk_every_step(forward, tmp_path):
    """Once read, the disk tier's pages leave the page cache (mapped pages too: the tier is
    memory-mapped), so the next step reads the disk, as the plan assumes."""
    probe = tmp_path / "probe"
    probe.write_bytes(bytes(1 << 16))
    with open(probe, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if page_cache_share([probe]) > 0:
        pytest.skip(f"the filesystem of {tmp_path} keeps dropped pages (tmpfs?)")
    graph = executor_graph(forward)
    executor = OffloadExecutor(graph, streamed_plan(graph, tmp_path), SimulatedTransfers())
    # no readahead: in this tiny file it would cache tensors read earlier in the step again
    executor.disk.map.madvise(mmap.MADV_RANDOM)
    for _ in range(2):
        executor(*forward.example_inputs)
        assert page_cache_share([executor.disk.path]) == 0
    executor.close()


def test_decoder_compiled_with_the_offload_pass_runs_from_its_artifact(decoder, tmp_path):
    """The pass plans the decoder (KV cache per layer), the manifest keeps the plan, and the
    executor built from the artifact generates what the captured decoder does."""
    weights = sum(t.numel() * t.element_size() for t in decoder.weights().values())
    spec = (
        f"offload{{gpu_memory={1.3 * weights / 1e9},cpu_memory={0.6 * weights / 1e9},"
        f'disk_path="{tmp_path}",batch=2,prompt_len=8,gen_len=8,reserve=1e-5}}'
    )
    compiled = peakc.compile(
        decoder.copy(), pipeline=spec, generation=decoder.info["generation"], parity=False
    )
    artifact = peakc.load(compiled.save(tmp_path / "artifact"))
    plan = artifact.manifest["offload"]
    assert set(plan["kv_cache"]) == {"0", "1"}
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
