"""The spec grammar that pipelines and backends share: `name{key=value,...}` with typed options.

Grammar:  spec := item ("," item)* ;  item := NAME ["{" KEY "=" VALUE ("," KEY "=" VALUE)* "}"]
VALUE := BARE | QUOTED | "[" [VALUE ("," VALUE)*] "]"
BARE has no `,{}[]="` or spaces; QUOTED is a double-quoted string with backslash escapes.

An owner (a pass or a backend class) declares its options as a dataclass whose fields have
defaults and one of the types `OPTION_TYPES` describes: bool, int, float, str, a Literal of
choices, a list of int/float/str, or a union of those (`Literal["auto"] | float`). Values are
converted to the declared type here, so errors name the owner, the option and the column, and
`format_options` writes back what `build_options` reads.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from peakc.errors import PeakcError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_BARE = re.compile(r"[^,{}\[\]=\"\s]+")
SCALARS = (bool, int, float, str)


class SpecError(PeakcError):
    pass


@dataclass
class SpecItem:
    """One `name{key=value,...}` of a spec, with the column where each option starts."""

    name: str
    options: dict[str, str | list[str]]
    columns: dict[str, int]
    column: int


def owner_label(cls: type) -> str:
    """`pass 'prune'`, `backend 'ort'`: how errors name the owner of options."""
    return f"{getattr(cls, 'kind', 'pass')} '{cls.name}'"


# --- option types ---------------------------------------------------------------------------


def option_type(cls: type, option: str) -> Any:
    """The declared type of one of `cls.Options`' fields, checked against the grammar's types."""
    tp = typing.get_type_hints(cls.Options)[option]
    if not _supported(tp):
        raise PeakcError(
            f"{owner_label(cls)}: option '{option}' has type {tp}; use bool, int, float, str, "
            "Literal, list[int|float|str] or a union of them"
        )
    return tp


def _supported(tp: Any) -> bool:
    if tp in SCALARS or typing.get_origin(tp) is Literal:
        return True
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (None,)
        return item in (int, float, str)
    if _is_union(tp):
        return all(_supported(t) for t in typing.get_args(tp))
    return False


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe_type(tp: Any) -> str:
    """How `peakc passes` and errors write a type: `int`, `auto|cpu|cuda`, `list[int]`."""
    if typing.get_origin(tp) is Literal:
        return "|".join(str(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    if _is_union(tp):
        return " or ".join(describe_type(t) for t in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _expected(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(str(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        example = "a, b" if typing.get_args(tp)[0] is str else "1, 8"
        return f"a list like [{example}]"
    if _is_union(tp):
        return " or ".join(_expected(t) for t in typing.get_args(tp))
    return _EXPECTED.get(tp, str(tp))


class _Mismatch(Exception):
    """A raw value that does not convert to one type (the caller reports it)."""


def _convert(tp: Any, raw: str | list[str]) -> Any:
    if _is_union(tp):
        for member in typing.get_args(tp):
            try:
                return _convert(member, raw)
            except _Mismatch:
                continue
        raise _Mismatch
    if typing.get_origin(tp) is list:
        if not isinstance(raw, list):
            raise _Mismatch
        (item,) = typing.get_args(tp)
        return [_convert(item, r) for r in raw]
    if isinstance(raw, list):
        raise _Mismatch
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise _Mismatch
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise _Mismatch from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise _Mismatch from None
    if typing.get_origin(tp) is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == raw:
                return choice
        raise _Mismatch
    return raw


def parse_value(owner: str, option: str, tp: Any, raw: str | list[str]) -> Any:
    """Convert the spec text of an option to its declared type, or raise naming both."""
    try:
        return _convert(tp, raw)
    except _Mismatch:
        shown = "[" + ",".join(raw) + "]" if isinstance(raw, list) else raw
        raise SpecError(
            f"{owner}: option '{option}' expects {_expected(tp)}, got '{shown}'"
        ) from None


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if isinstance(value, str) and not _BARE.fullmatch(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


# --- owners' options --------------------------------------------------------------------------


def build_options(cls: type, item: SpecItem) -> Any:
    """`cls.Options` from a spec item; unknown options and wrong types name the column."""
    owner = owner_label(cls)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    values = {}
    for key, raw in item.options.items():
        where = f" (column {item.columns[key]})"
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise SpecError(f"{owner} has no option '{key}' (options: {known}){where}")
        try:
            values[key] = parse_value(owner, key, option_type(cls, key), raw)
        except SpecError as exc:
            raise SpecError(f"{exc}{where}") from None
    try:
        return cls.Options(**values)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{owner}: {exc}") from exc


def format_options(name: str, options: Any, defaults: Any) -> str:
    """`name{k=v,...}` listing the options that differ from their defaults."""
    parts = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if defaults is not None and value == getattr(defaults, f.name):
            continue
        parts.append(f"{f.name}={format_value(value)}")
    return f"{name}{{{','.join(parts)}}}" if parts else name


def check_options_class(cls: type) -> None:
    """At registration: Options is a dataclass whose fields have defaults and grammar types."""
    owner = owner_label(cls)
    if not dataclasses.is_dataclass(cls.Options):
        raise PeakcError(f"{owner}: Options must be a dataclass")
    for f in dataclasses.fields(cls.Options):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise PeakcError(f"{owner}: option '{f.name}' needs a default")
        option_type(cls, f.name)


# --- the reader -------------------------------------------------------------------------------


def parse_items(text: str, what: str = "pass") -> list[SpecItem]:
    """The items of a spec; a SpecError says at which column it is malformed."""
    return _SpecReader(text, what).items()


def parse_item(text: str, what: str) -> SpecItem:
    """Exactly one item (a backend spec such as `ort{device=cuda,decode_batches=[1,8]}`)."""
    items = parse_items(text, what)
    if len(items) != 1:
        raise SpecError(f"expected one {what} spec like name{{key=value}}, got '{text}'")
    return items[0]


class _SpecReader:
    """A small recursive-descent reader for the grammar in the module docstring."""

    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.what = what
        self.pos = 0

    def error(self, message: str) -> SpecError:
        kind = "pipeline" if self.what == "pass" else self.what
        return SpecError(
            f"malformed {kind} spec at column {self.pos + 1}: {message} in '{self.text}'"
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

    def scalar(self, key: str) -> str:
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

    def value(self, key: str) -> str | list[str]:
        if self.peek() != "[":
            return self.scalar(key)
        self.pos += 1
        values: list[str] = []
        if self.peek() == "]":
            self.pos += 1
            return values
        while True:
            values.append(self.scalar(key))
            ch = self.peek()
            if ch == "]":
                self.pos += 1
                return values
            if ch != ",":
                raise self.error(f"expected ',' or ']' in the list of option '{key}'")
            self.pos += 1

    def options(self, owner: str) -> tuple[dict[str, str | list[str]], dict[str, int]]:
        options: dict[str, str | list[str]] = {}
        columns: dict[str, int] = {}
        self.pos += 1  # the "{"
        if self.peek() == "}":
            self.pos += 1
            return options, columns
        while True:
            self.peek()
            column = self.pos + 1
            key = self.name(f"an option name for {self.what} '{owner}'")
            if self.peek() != "=":
                raise self.error(f"expected '=' after option '{key}'")
            self.pos += 1
            if key in options:
                raise self.error(f"option '{key}' given twice")
            options[key] = self.value(key)
            columns[key] = column
            ch = self.peek()
            self.pos += 1
            if ch == "}":
                return options, columns
            if ch != ",":
                self.pos -= 1
                raise self.error(f"expected ',' or '}}' after option '{key}'")

    def items(self) -> list[SpecItem]:
        result: list[SpecItem] = []
        if not self.peek():
            return result
        while True:
            self.peek()
            column = self.pos + 1
            name = self.name(f"a {self.what} name")
            options, columns = self.options(name) if self.peek() == "{" else ({}, {})
            result.append(SpecItem(name, options, columns, column))
            ch = self.peek()
            if not ch:
                return result
            if ch != ",":
                plural = "passes" if self.what == "pass" else f"{self.what}s"
                raise self.error(f"expected ',' between {plural}")
            self.pos += 1
