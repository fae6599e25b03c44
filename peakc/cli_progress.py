"""The CLI's progress display: an instrument that shows every compile phase, every pass and
the passes' long-running work (calibrated blocks, probes) as rich progress lines, each with
its elapsed time. The library itself stays silent; only the CLI adds this instrument."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.text import Text

from peakc.passes.instruments import Instrument


class ProgressBars(Instrument):
    """One progress line per phase, pass and task, kept on screen when done (with its time).

    Phases reach it as one-step progress tasks (`peakc.compile` reports capture, lower and
    save that way); the CLI reports its own (load) with `phase`.
    """

    def __init__(self, console: Console) -> None:
        self.display = Progress(
            SpinnerColumn(finished_text="[green]✓[/green]"),
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            ElapsedColumn(),
            console=console,
            disable=not console.is_terminal,  # a log or a pipe gets the lines once, at the end
        )
        self.open: dict[str, TaskID] = {}  # unfinished lines by task name
        self.seconds: dict[str, float] = {}  # finished phases the CLI timed itself

    def __enter__(self) -> ProgressBars:
        self.display.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        for task_id in self.open.values():  # interrupted or failed: the line stops, undone
            self.display.stop_task(task_id)
        if exc_type is not None:  # the error's one line stands alone: the lines go away
            self.display.live.transient = True
        self.display.stop()
        if self.display.disable and exc_type is None and self.display.tasks:
            self.display.console.print(self.display.make_tasks_table(self.display.tasks))

    @contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        """A step the CLI does itself (loading the model): shown and timed into `seconds`."""
        started = time.perf_counter()
        line = f"{name} {detail}".strip()
        self.on_progress(line, 0, 1)
        yield
        self.on_progress(line, 1, 1)
        self.seconds[name] = time.perf_counter() - started

    def on_progress(self, task: str, done: int, total: int) -> None:
        task_id = self.open.get(task)
        if task_id is None:  # a new task, or one that finished before and starts again
            task_id = self.display.add_task(task, total=max(total, 1))
            self.open[task] = task_id
        self.display.update(task_id, completed=done, total=max(total, 1))
        if done >= total:
            del self.open[task]

    def before_pass(self, p, graph, index):
        self.on_progress(_pass_line(p, index), 0, 1)

    def after_pass(self, p, result, index, record):
        self.on_progress(_pass_line(p, index), 1, 1)

    def on_failure(self, p, graph, index, remaining, exc):
        task_id = self.open.pop(_pass_line(p, index), None)
        if task_id is not None:
            self.display.update(task_id, description=f"[red]{_pass_line(p, index)} failed[/red]")
            self.display.stop_task(task_id)


class ElapsedColumn(ProgressColumn):
    """Elapsed time to a tenth of a second (rich's own column shows whole seconds, and most
    passes take less than one)."""

    def render(self, task: Task) -> Text:
        seconds = task.finished_time if task.finished else task.elapsed
        if seconds is None:
            return Text("-", style="progress.elapsed")
        minutes, rest = divmod(seconds, 60)
        text = f"{int(minutes)}:{rest:04.1f}" if minutes else f"{rest:.1f} s"
        return Text(text, style="progress.elapsed")


def _pass_line(p, index: int) -> str:
    return f"pass {index + 1}: {p}"


def print_compile_summary(console: Console, report: dict) -> None:
    """After a compile: each pass's time and stats, the predicted cost before and after the
    passes that recorded one, and the compile's total time."""
    from rich.table import Table

    from peakc.api import cost_rows

    for rec in report.get("passes", []):
        stats = ", ".join(f"{k}={v}" for k, v in rec["stats"].items())
        console.print(f"  {rec['pass']:<40} {rec.get('seconds', 0):>8.3f} s  {stats}", markup=False)
    rows = cost_rows(report.get("passes", []))
    if rows:
        table = Table(title=f"predicted on {rows[0]['target']}", title_justify="left")
        for column in ("pass", "phase", "batch x tokens (ctx)", "time", "device memory"):
            table.add_column(column, justify="left" if column in ("pass", "phase") else "right")
        for row in rows:
            before, after = row["before"], row["after"]
            table.add_row(
                row["pass"].split("{")[0],
                row["phase"],
                f"{after['batch']} x {after['tokens']} ({after['context']})",
                f"{before['ms']:.3f} → {after['ms']:.3f} ms",
                f"{before['device_mb']:.1f} → {after['device_mb']:.1f} MB",
            )
        console.print(table)
    if report.get("total_seconds") is not None:
        console.print(f"compiled in {report['total_seconds']:.2f} s (report.md: time per phase)")
