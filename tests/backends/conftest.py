"""Fixtures shared by the backend tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def compressed_kernel_results() -> dict:
    """The low-bit and 2:4 kernels against their references under TRITON_INTERPRET=1, run once
    in a fresh interpreter (tests/backends/triton_compressed_cases.py) for every test using it."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    script = Path(__file__).with_name("triton_compressed_cases.py")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
