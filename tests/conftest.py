"""Shared fixtures: small captured models, reused across tests to keep the suite fast."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peakc.ir import capture
from peakc.models.demo import demo_llama, demo_mlp


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked slow (minutes: real SmolLM2 compiles) run first, so that with
    `-n 2` they start at once on their own workers instead of ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def interpreted():
    """`run(script, *args, timeout=600, env=None)`: the dict a script prints on its last
    `RESULT <json>` line, run in a fresh interpreter under TRITON_INTERPRET=1 (set before any
    kernel is decorated, hence the subprocess) from the repository root; `env` adds variables.
    A failing script fails the test with the end of its stderr."""

    def run(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> dict:
        variables = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-c", script, *map(str, args)],
            cwd=ROOT,
            env=variables,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stderr[-4000:]
        return json.loads(lines[-1].removeprefix("RESULT "))

    return run


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
