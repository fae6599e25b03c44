"""Progress of long work (calibrating blocks, exporting programs): silent unless listened to.

Work asks its context for a task (`ctx.progress("prune: blocks", total)`) and advances it;
listeners (the pipeline's instruments, such as the CLI's progress bars) are told each step.
The library itself prints nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol


class ProgressListener(Protocol):
    def on_progress(self, task: str, done: int, total: int) -> None: ...


class ProgressTask:
    """A named amount of work; each `advance` tells every listener how far it has come."""

    def __init__(self, name: str, total: int, listeners: Sequence[ProgressListener] = ()) -> None:
        self.name = name
        self.total = total
        self.done = 0
        self.listeners = list(listeners)
        self._tell()

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        self._tell()

    def close(self) -> None:
        if self.done < self.total:
            self.done = self.total
            self._tell()

    def __enter__(self) -> ProgressTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tell(self) -> None:
        for listener in self.listeners:
            listener.on_progress(self.name, self.done, self.total)


ProgressFn = Callable[[str, int], ProgressTask]


def silent(name: str, total: int) -> ProgressTask:
    """A task nobody listens to: the default of library calls."""
    return ProgressTask(name, total)
