"""Pipeline: a textual spec of passes that round-trips, and the loop that runs them.

Grammar:  spec := item ("," item)* ;  item := NAME ["{" KEY "=" VALUE ("," KEY "=" VALUE)* "}"]
VALUE is bare (no `,{}="` or spaces) or a double-quoted string with backslash escapes.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.passes.base import Pass, PassContext, PassResult, get_pass, option_type

NAMED_PIPELINES = {
    "default": "cleanup,fuse",
    "none": "",
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_BARE = re.compile(r"[^,{}=\"\s]+")


class SpecError(PeakcError):
    pass


@dataclass
class Pipeline:
    passes: list[Pass]

    @classmethod
    def parse(cls, spec: str) -> Pipeline:
        """Parse a spec (or a named pipeline); raise SpecError that says where it is wrong."""
        text = NAMED_PIPELINES.get(spec.strip(), spec)
        return cls([_instantiate(name, opts) for name, opts in _parse_items(text)])

    def __str__(self) -> str:
        return ",".join(format_pass(p) for p in self.passes)

    def check(self, ctx: PassContext) -> None:
        """Before any work: every pass's requirements are met by the context."""
        have = ctx.provides()
        for i, p in enumerate(self.passes):
            missing = [r for r in p.requires if r not in have]
            if missing:
                raise PeakcError(
                    f"pass '{p.name}' (#{i + 1}) needs {', '.join(missing)}, which was not given"
                    + (" (use --calib-data PATH)" if "calibration_data" in missing else "")
                )

    def run(self, graph: Graph, ctx: PassContext) -> tuple[Graph, list[dict[str, Any]]]:
        """Run every pass in order with the context's instruments; returns graph and records."""
        self.check(ctx)
        for inst in ctx.instruments:
            inst.before_pipeline(graph, ctx)
        records = []
        for index, p in enumerate(self.passes):
            before = graph
            record: dict[str, Any] = {"pass": str(p), "name": p.name}
            for inst in ctx.instruments:
                inst.before_pass(p, graph, index)
            try:
                result = p.run(graph.copy(), ctx)
                if not isinstance(result, PassResult):
                    raise PeakcError(f"returned {type(result).__name__}, not PassResult")
                result.graph.recompile()
                for inst in ctx.instruments:
                    inst.after_pass(p, result, index, record)
            except Exception as exc:
                done = [str(q) for q in self.passes[:index]]
                remaining = Pipeline(self.passes[index:])
                for inst in ctx.instruments:
                    inst.on_failure(p, before, index, remaining, exc)
                detail = (
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                )
                raise PeakcError(
                    f"pass '{p.name}' (#{index + 1}) failed after [{', '.join(done)}]: {detail}"
                ) from exc
            record.update(modified=result.modified, stats=result.stats)
            records.append(record)
            graph = result.graph
        return graph, records


def format_pass(p: Pass) -> str:
    """`name{k=v,...}` listing options that differ from their defaults."""
    defaults = type(p)().options if dataclasses.fields(p.options) else None
    parts = []
    for f in dataclasses.fields(p.options):
        value = getattr(p.options, f.name)
        if defaults is not None and value == getattr(defaults, f.name):
            continue
        parts.append(f"{f.name}={format_value(value)}")
    return f"{p.name}{{{','.join(parts)}}}" if parts else p.name


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if isinstance(value, str) and not _BARE.fullmatch(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def parse_value(pass_name: str, option: str, tp: Any, raw: str) -> Any:
    """Convert the spec text of an option to its declared type, or raise naming both."""

    def fail(expected: str) -> SpecError:
        return SpecError(f"pass '{pass_name}': option '{option}' expects {expected}, got '{raw}'")

    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise fail("true or false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise fail("an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise fail("a number") from None
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise fail("one of " + "|".join(str(c) for c in choices))
    return raw


def _instantiate(name: str, raw_options: dict[str, str]) -> Pass:
    cls = get_pass(name)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    values = {}
    for key, raw in raw_options.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise SpecError(f"pass '{name}' has no option '{key}' (options: {known})")
        values[key] = parse_value(name, key, option_type(cls, key), raw)
    try:
        options = cls.Options(**values)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"pass '{name}': {exc}") from exc
    return cls(options)


def _parse_items(text: str) -> list[tuple[str, dict[str, str]]]:
    return _SpecReader(text).items()


class _SpecReader:
    """A small recursive-descent reader for the spec grammar in the module docstring."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> SpecError:
        return SpecError(
            f"malformed pipeline spec at column {self.pos + 1}: {message} in '{self.text}'"
        )

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def name(self, what: str) -> str:
        self.peek()
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def value(self, key: str) -> str:
        if self.peek() == '"':
            out = []
            self.pos += 1
            while self.pos < len(self.text):
                ch = self.text[self.pos]
                if ch == "\\" and self.pos + 1 < len(self.text):
                    out.append(self.text[self.pos + 1])
                    self.pos += 2
                elif ch == '"':
                    self.pos += 1
                    return "".join(out)
                else:
                    out.append(ch)
                    self.pos += 1
            raise self.error(f"unterminated quoted value for option '{key}'")
        m = _BARE.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected a value for option '{key}'")
        self.pos = m.end()
        return m.group(0)

    def options(self, pass_name: str) -> dict[str, str]:
        options: dict[str, str] = {}
        self.pos += 1  # the "{"
        if self.peek() == "}":
            self.pos += 1
            return options
        while True:
            key = self.name(f"an option name for pass '{pass_name}'")
            if self.peek() != "=":
                raise self.error(f"expected '=' after option '{key}'")
            self.pos += 1
            if key in options:
                raise self.error(f"option '{key}' given twice")
            options[key] = self.value(key)
            ch = self.peek()
            self.pos += 1
            if ch == "}":
                return options
            if ch != ",":
                self.pos -= 1
                raise self.error(f"expected ',' or '}}' after option '{key}'")

    def items(self) -> list[tuple[str, dict[str, str]]]:
        result: list[tuple[str, dict[str, str]]] = []
        if not self.peek():
            return result
        while True:
            name = self.name("a pass name")
            options = self.options(name) if self.peek() == "{" else {}
            result.append((name, options))
            ch = self.peek()
            if not ch:
                return result
            if ch != ",":
                raise self.error("expected ',' between passes")
            self.pos += 1
