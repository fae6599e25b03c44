"""Instruments: the only hook points around passes (timing, IR dumps, parity, reproducer,
progress); verifying the graph is not an instrument: Pipeline.run always does it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from peakc.errors import PeakcError
from peakc.ir.graph import Graph


class Instrument:
    """Base class: override the hooks you need."""

    def before_pipeline(self, graph: Graph, ctx: Any) -> None: ...

    def before_pass(self, p: Any, graph: Graph, index: int) -> None: ...

    def after_pass(self, p: Any, result: Any, index: int, record: dict) -> None: ...

    def on_failure(
        self, p: Any, graph: Graph, index: int, remaining: Any, exc: Exception
    ) -> None: ...

    def on_progress(self, task: str, done: int, total: int) -> None:
        """A pass's long-running work advanced (calibrating blocks, probing layers)."""


class Timing(Instrument):
    """Wall time of each pass, in seconds, into the pass record."""

    def before_pass(self, p, graph, index):
        self._start = time.perf_counter()

    def after_pass(self, p, result, index, record):
        record["seconds"] = round(time.perf_counter() - self._start, 4)


class DumpIR(Instrument):
    """Numbered IR dumps: 000_captured.txt, then NNN_<pass>.txt after each pass."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def before_pipeline(self, graph, ctx):
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "000_captured.txt").write_text(graph.dump())

    def after_pass(self, p, result, index, record):
        (self.directory / f"{index + 1:03d}_{p.name}.txt").write_text(result.graph.dump())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if out64.shape != ref64.shape:
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


class Parity(Instrument):
    """Compare outputs on the example inputs against the captured graph's after each pass.

    Each pass declares its tolerance (`parity_tol`); a pass that changes numerics by design
    declares None and becomes the new reference for the passes after it.
    """

    def before_pipeline(self, graph, ctx):
        self.reference = graph.run()

    def after_pass(self, p, result, index, record):
        outputs = result.graph.run()
        if len(outputs) != len(self.reference):
            raise PeakcError(f"output count changed from {len(self.reference)} to {len(outputs)}")
        worst = max((relative_error(o, r) for o, r in zip(outputs, self.reference)), default=0.0)
        record["parity_rel_error"] = worst
        if p.parity_tol is None:
            self.reference = outputs
            return
        if not worst <= p.parity_tol:
            raise PeakcError(
                f"outputs moved by relative error {worst:.3g}, above the pass's tolerance "
                f"{p.parity_tol:g}"
            )


class Reproducer(Instrument):
    """On failure, save the IR before the failing pass and the rest of the spec."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.written: Path | None = None

    def on_failure(self, p, graph, index, remaining, exc):
        from peakc.runtime.artifact import save_graph_artifact

        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "before.txt").write_text(graph.dump())
        (self.directory / "pipeline.txt").write_text(str(remaining) + "\n")
        (self.directory / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        try:
            save_graph_artifact(graph, self.directory / "program", pipeline="none")
        except Exception as save_exc:  # the dump above is still useful without the program
            (self.directory / "error.txt").write_text(
                f"{type(exc).__name__}: {exc}\n(program not saved: {save_exc})\n"
            )
        (self.directory / "README.txt").write_text(
            "Reproduce with:\n"
            f"  peakc compile artifact:{self.directory / 'program'} -o repro "
            f"--pipeline '{remaining}' --debug\n"
        )
        self.written = self.directory
