"""`peakc passes` and `peakc backends`: every pass or backend with its typed options, in one
format (`name: type = default`, a Literal's type written as its choices `a|b`), wrapped to the
terminal's width; given a name, one of them in full."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Any

from peakc.errors import PeakcError


def add_options_commands(sub: argparse._SubParsersAction) -> None:
    """Register `passes` and `backends` on the main parser."""
    p = sub.add_parser("passes", help="list registered passes and their options")
    p.add_argument("name", nargs="?", help="show this pass in full")
    p.add_argument("--plugin", action="append", default=[], help="Python file registering passes")

    p = sub.add_parser("backends", help="list backends and their options")
    p.add_argument("name", nargs="?", help="show this backend in full")


def cmd_passes(args: argparse.Namespace) -> int:
    from peakc.passes.base import REGISTRY, load_builtin_passes

    load_builtin_passes()
    print_owners("pass", dict(sorted(REGISTRY.items())), args.name)
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    from peakc.backends.base import load_builtin_backends

    print_owners("backend", load_builtin_backends(), args.name)
    return 0


@dataclasses.dataclass
class OptionRow:
    """One option of a pass or backend, as the listings write it."""

    name: str
    type: str  # `int`, `magnitude|sparsegpt`, `list[int]`
    default: str  # in the spec grammar: `true`, `0.5`, `[1,8]`, `""`
    help: str  # the field's metadata["help"], when it has one

    def __str__(self) -> str:
        return f"{self.name}: {self.type} = {self.default}"


def option_rows(cls: type) -> list[OptionRow]:
    """The options of a pass or backend class, in declaration order."""
    from peakc.passes.spec import describe_type, format_value, option_type

    comments = _field_comments(cls.Options)
    rows = []
    for f in dataclasses.fields(cls.Options):
        has_default = f.default is not dataclasses.MISSING
        default = f.default if has_default else f.default_factory()
        tp = option_type(cls, f.name)
        meaning = str(f.metadata.get("help", "")) or comments.get(f.name, "")
        rows.append(OptionRow(f.name, describe_type(tp), format_value(default), meaning))
    return rows


def summary(cls: type) -> str:
    """The docstring's first paragraph on one line (a sentence may span source lines)."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def print_owners(kind: str, owners: dict[str, type], name: str | None) -> None:
    """A table of every pass (or backend) with its options, or one of them in full."""
    from rich.console import Console

    console = Console()  # wraps to the terminal's width (80 columns when not a terminal)
    if name is not None:
        if name not in owners:
            raise PeakcError(f"unknown {kind} '{name}' (known: {', '.join(owners)})")
        _print_one(console, kind, name, owners[name])
        return
    from rich.table import Table

    title = "peakc passes" if kind == "pass" else "peakc backends"
    options = {owner: [str(row) for row in option_rows(cls)] for owner, cls in owners.items()}
    # column widths that add up to the terminal's (4 rules and 1 space each side of a cell):
    # an option per line where the width allows, the description wraps in what is left
    # (a long plug-in name folds rather than squeezing the description below a word's width)
    name_width = min(max(len(kind), *(len(owner) for owner in owners)), 14)
    text_width = max(console.width - name_width - 10, 40)
    longest = max((len(line) for lines in options.values() for line in lines), default=1)
    description_width = max(text_width - longest, text_width * 2 // 5, 20)
    options_width = text_width - description_width
    table = Table(title=title, show_lines=True)
    table.add_column(kind, overflow="fold", width=name_width)
    table.add_column("options: type = default", width=options_width)
    table.add_column("description", width=description_width)
    for owner, cls in owners.items():
        table.add_row(owner, "\n".join(options[owner]) or "-", summary(cls))
    console.print(table, markup=False, highlight=False)
    console.print(f"peakc {'passes' if kind == 'pass' else 'backends'} NAME: one {kind} in full")


def _print_one(console: Any, kind: str, name: str, cls: type) -> None:
    from rich.table import Table

    console.print(f"{kind} {name}", style="bold", markup=False, highlight=False)
    console.print(inspect.getdoc(cls) or "(no description)", markup=False, highlight=False)
    rows = option_rows(cls)
    if not rows:
        console.print("options: none", highlight=False)
        return
    columns = ["option", "type", "default"] + (["meaning"] if any(r.help for r in rows) else [])
    table = Table(show_header=True, box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, ratio=1 if column == "meaning" else None)
    for row in rows:
        table.add_row(*[row.name, row.type, row.default, row.help][: len(columns)])
    console.print()
    console.print(table, markup=False, highlight=False)
    example = ",".join(f"{row.name}={row.default}" for row in rows[:2])
    console.print(f"\nspec: {name}{{{example}}}", markup=False, highlight=False)


def _field_comments(options: type) -> dict[str, str]:
    """The comment after each field in the Options class's source (`seq_len: int = 0  # 0:
    the captured length`): what an option means, where the field gives no metadata["help"]."""
    try:
        lines = inspect.getsource(options).splitlines()
    except (OSError, TypeError):  # defined in a REPL or generated: no source to read
        return {}
    comments = {}
    for line in lines:
        match = _FIELD_COMMENT.match(line)
        if match:
            comments[match["name"]] = match["comment"].strip()
    return comments


_FIELD_COMMENT = re.compile(r"^\s+(?P<name>\w+)\s*:[^#]*#(?P<comment>.*)$")
