"""The block-sequential calibration engine: Hessians, compressed outputs feed the next block."""

import copy
import functools

import torch

from peakc.data import with_sequence_length
from peakc.ir.capture import capture
from peakc.models.demo import demo_llama
from peakc.passes.calibration import calibrate_blocks
from peakc.runtime.blocks import run_graph


@functools.cache
def _captured():
    model, inputs = demo_llama(seed=3, hidden_size=32, intermediate_size=48, num_heads=2)
    return model, capture(model, with_sequence_length(inputs, 12))


def tiny():
    """The model and a fresh copy of its graph (engines replace weights, never mutate them)."""
    model, graph = _captured()
    return model, graph.copy()


def samples(n=3, seq=12):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 256, (1, seq), generator=gen),) for _ in range(n)]


def hooked_inputs(model, module_name, data):
    """The rows a module's forward sees over the samples, via a forward pre-hook."""
    seen = []
    module = model.get_submodule(module_name)
    handle = module.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for (ids,) in data:
            model(ids)
    handle.remove()
    return torch.cat(seen)


def test_hessians_equal_direct_computation_and_are_shared():
    model, graph = tiny()
    data = samples()
    got = {}

    def keep(cal):
        got[cal.block.name] = cal
        return None

    run = calibrate_blocks(graph, data, keep)
    assert run.blocks == ["prologue", "model.layers.0", "model.layers.1"]
    cal = got["model.layers.1"]
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        x = hooked_inputs(model, f"model.layers.1.{name}", data)
        direct = 2 * x.T @ x / x.shape[0]
        torch.testing.assert_close(
            cal.hessians[f"model.layers.1.{name}"], direct, rtol=1e-4, atol=1e-5
        )
    h = cal.hessians
    assert h["model.layers.1.self_attn.q_proj"] is h["model.layers.1.self_attn.v_proj"]
    assert h["model.layers.1.mlp.gate_proj"] is h["model.layers.1.mlp.up_proj"]
    assert cal.tokens == 36


def test_next_block_sees_the_compressed_outputs():
    model, graph = tiny()
    data = samples()
    name = "model.layers.0.mlp.down_proj.weight"
    seen = {}

    def halve_block0(cal):
        seen[cal.block.name] = cal.hessians
        if cal.block.name == "model.layers.0":
            return {name: cal.weight(cal.sites[-1]) * 0.25}
        return None

    calibrate_blocks(graph, data, halve_block0)
    assert torch.equal(graph.get_weight(name), model.get_submodule(name[:-7]).weight * 0.25)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.get_submodule(name[:-7]).weight.mul_(0.25)
    x = hooked_inputs(changed, "model.layers.1.self_attn.q_proj", data)
    expected = 2 * x.T @ x / x.shape[0]
    got = seen["model.layers.1"]["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    x_dense = hooked_inputs(model, "model.layers.1.self_attn.q_proj", data)
    assert not torch.allclose(got, 2 * x_dense.T @ x_dense / x_dense.shape[0], rtol=1e-3)


def test_run_graph_matches_graph_run():
    _, graph = tiny()
    (ids,) = samples(1)[0]
    torch.testing.assert_close(run_graph(graph, (ids,), "cpu")[0], graph.run(ids)[0])


def test_host_streamed_activations_give_the_same_hessians():
    _, graph = tiny()
    data = samples()
    got = {}
    for mode in ("device", "host"):
        run = calibrate_blocks(
            graph,
            data,
            lambda cal, m=mode: got.__setitem__((m, cal.block.name), cal.hessians),
            activations=mode,
        )
        assert run.activations_on == mode
    for name, h in got[("device", "model.layers.1")].items():
        torch.testing.assert_close(got[("host", "model.layers.1")][name], h)
