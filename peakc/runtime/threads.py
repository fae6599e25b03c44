"""CPU threads for running artifacts: a default that does not oversubscribe the machine.

torch's own default can exceed the cores a process may use (a container sees the host's CPUs),
and a decode step of a small model then spends its time waiting on threads. The runtime
commands (`run`, `generate`, `bench`, `eval`) call `apply_threads` before any work and say
what they used.
"""

from __future__ import annotations

import os
from pathlib import Path

from peakc.errors import PeakcError


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity), or all of them where that is unknown."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int]) -> int:
    """Distinct physical cores among `cpus` (hyper-threads of one core count once), read from
    Linux's CPU topology; the CPU count where the topology is not readable."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


def default_threads() -> int:
    """One thread per physical core this process may use."""
    return max(1, physical_cores(usable_cpus()))


def apply_threads(requested: int | None) -> int:
    """torch.set_num_threads(`requested`, or the default); returns the count in use."""
    import torch

    if requested is not None and requested < 1:
        raise PeakcError(f"--threads must be at least 1, got {requested}")
    threads = requested or default_threads()
    torch.set_num_threads(threads)
    return threads


def cpu_threads(count: int) -> str:
    """`1 CPU thread`, `2 CPU threads`: what the commands print."""
    return f"{count} CPU thread{'' if count == 1 else 's'}"
