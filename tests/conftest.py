"""Shared fixtures: small captured models, reused across tests to keep the suite fast."""

from __future__ import annotations

import functools

import pytest
import torch

from peakc.ir import capture
from peakc.models.demo import demo_llama, demo_mlp


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked slow (minutes: real SmolLM2 compiles) run first, so that with
    `-n 2` they start at once on their own workers instead of ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def llama():
    model, inputs = demo_llama()
    return model, inputs


@pytest.fixture(scope="session")
def llama_graph(llama):
    model, inputs = llama
    return capture(model, inputs, name="demo:llama")


@pytest.fixture()
def graph(llama_graph):
    """A fresh copy per test, so tests may rewrite it."""
    return llama_graph.copy()


@pytest.fixture(scope="session")
def small_llama():
    """seed -> (model, graph): a 3-layer, 32-wide Llama captured at 16 tokens (cached)."""
    from peakc.data import with_sequence_length

    @functools.cache
    def build(seed: int):
        model, inputs = demo_llama(
            seed=seed, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=3
        )
        return model, capture(model, with_sequence_length(inputs, 16))

    return build


@pytest.fixture(scope="session")
def mlp():
    return demo_mlp()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
