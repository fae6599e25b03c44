import dataclasses
import textwrap
import types
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peakc
from peakc.errors import PeakcError
from peakc.passes.base import REGISTRY, PassContext, load_builtin_passes, load_plugin
from peakc.passes.pipeline import Pipeline


@dataclasses.dataclass
class _ToyOptions:
    ratio: float = 0.5
    steps: int = 3
    enabled: bool = True
    label: str = "x"
    mode: Literal["a", "b-c", "2:4"] = "a"


@peakc.register_pass
class Toy(peakc.Pass):
    """A pass with every option type, for spec tests."""

    name = "toy"
    Options = _ToyOptions

    def run(self, graph, ctx):
        return peakc.PassResult(graph, modified=False)


@peakc.register_pass
class NeedsData(peakc.Pass):
    """Needs calibration data."""

    name = "needs_data"
    requires = ("calibration_data",)

    def run(self, graph, ctx):
        return peakc.PassResult(graph, modified=False)


def test_parse_and_print_round_trip():
    spec = 'cleanup,toy{ratio=0.25,steps=7,enabled=false,label="a b,c",mode=2:4},fuse'
    pipe = Pipeline.parse(spec)
    assert [p.name for p in pipe.passes] == ["cleanup", "toy", "fuse"]
    toy = pipe.passes[1].options
    assert (toy.ratio, toy.steps, toy.enabled, toy.label, toy.mode) == (
        0.25,
        7,
        False,
        "a b,c",
        "2:4",
    )
    assert Pipeline.parse(str(pipe)) == pipe
    assert str(Pipeline.parse("toy{ratio=0.5}")) == "toy"  # defaults are not printed


def test_named_pipelines():
    assert str(Pipeline.parse("default")) == "cleanup,fuse"
    assert Pipeline.parse("none").passes == []
    assert Pipeline.parse("").passes == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "unknown pass 'nosuch'"),
        ("toy{nosuch=1}", "pass 'toy' has no option 'nosuch'"),
        ("toy{steps=1.5}", "option 'steps' expects an integer, got '1.5'"),
        ("toy{ratio=abc}", "option 'ratio' expects a number, got 'abc'"),
        ("toy{enabled=maybe}", "option 'enabled' expects true or false"),
        ("toy{mode=z}", "option 'mode' expects one of a|b-c|2:4"),
        ("toy{steps 3}", "column 11: expected '=' after option 'steps'"),
        ("toy{steps=3", "column 12: expected ',' or '}' after option 'steps'"),
        ("cleanup,,fuse", "column 9: expected a pass name"),
        ("cleanup fuse", "column 9: expected ',' between passes"),
        ('toy{label="abc}', "unterminated quoted value"),
        ("toy{steps=1,steps=2}", "option 'steps' given twice"),
    ],
)
def test_bad_specs_say_what_and_where(spec, message):
    with pytest.raises(PeakcError) as info:
        Pipeline.parse(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_requirements_checked_before_work(graph):
    pipe = Pipeline.parse("cleanup,needs_data")
    with pytest.raises(PeakcError, match="pass 'needs_data' \\(#2\\) needs calibration_data"):
        pipe.run(graph, PassContext())


def _value_strategy(tp):
    import typing

    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(10**6), 10**6)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False, width=64)
    if typing.get_origin(tp) is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Literal["auto"] | int
        return st.one_of([_value_strategy(arg) for arg in typing.get_args(tp)])
    if typing.get_origin(tp) is list:
        return st.lists(_value_strategy(typing.get_args(tp)[0]), max_size=3)
    return st.text(min_size=0, max_size=12)


@st.composite
def pipelines(draw):
    load_builtin_passes()
    import typing

    names = sorted(REGISTRY)
    passes = []
    for name in draw(st.lists(st.sampled_from(names), max_size=5)):
        cls = REGISTRY[name]
        hints = typing.get_type_hints(cls.Options)
        values = {}
        for f in dataclasses.fields(cls.Options):
            if name == "fuse":
                continue  # its option is validated against the rule table
            if draw(st.booleans()):
                values[f.name] = draw(_value_strategy(hints[f.name]))
        try:
            passes.append(cls(cls.Options(**values)))
        except PeakcError:  # out of the pass's range (prune, quantize validate): defaults
            passes.append(cls())
    return Pipeline(passes)


@settings(max_examples=150, deadline=None)
@given(pipelines())
def test_any_valid_spec_round_trips(pipe):
    text = str(pipe)
    assert Pipeline.parse(text) == pipe
    assert str(Pipeline.parse(text)) == text


def test_plugin_file_registers_pass(tmp_path):
    plugin = tmp_path / "myplug.py"
    plugin.write_text(
        textwrap.dedent('''
        import peakc

        @peakc.register_pass
        class Noop(peakc.Pass):
            """Does nothing."""
            name = "plugin_noop"

            def run(self, graph, ctx):
                return peakc.PassResult(graph, modified=False)
    ''')
    )
    assert load_plugin(plugin) == ["plugin_noop"]
    assert str(Pipeline.parse("plugin_noop")) == "plugin_noop"


def test_plugin_errors_are_one_line(tmp_path):
    with pytest.raises(PeakcError, match="plug-in file not found"):
        load_plugin(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PeakcError, match="bad.py failed to load: RuntimeError: boom"):
        load_plugin(bad)


def test_register_rejects_options_without_defaults():
    @dataclasses.dataclass
    class Opts:
        level: int

    class Broken(peakc.Pass):
        name = "broken_pass"
        Options = Opts

    with pytest.raises(PeakcError, match="option 'level' needs a default"):
        peakc.register_pass(Broken)


def test_entry_point_group_is_loaded(monkeypatch):
    import importlib.metadata

    import peakc.passes.base as base

    class FakeEntryPoint:
        name, value = "ep_pass", "somewhere:EpPass"

        def load(self):
            class EpPass(peakc.Pass):
                """From an entry point."""

                name = "ep_pass"

                def run(self, graph, ctx):
                    return peakc.PassResult(graph, modified=False)

            return EpPass

    monkeypatch.setattr(base, "_entry_points_loaded", False)
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group=None: [FakeEntryPoint()] if group == "peakc.passes" else [],
    )
    assert base.get_pass("ep_pass").name == "ep_pass"
