"""Pass, PassResult, PassContext and the pass registry."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from peakc.cost_model.hardware import HardwareProfile, resolve_profile
from peakc.errors import PeakcError
from peakc.passes.spec import check_options_class, format_options, option_type
from peakc.progress import ProgressTask

__all__ = ["NoOptions", "Pass", "PassContext", "PassResult", "option_type", "register_pass"]

# Declaring and listing passes imports no torch (`peakc passes` starts in well under a
# second): what needs torch, the cost model or the IR is imported where it is used.
if TYPE_CHECKING:
    import torch

    from peakc.cost_model.predict import CostModel
    from peakc.ir.graph import Graph
    from peakc.passes.instruments import Instrument


@dataclass
class PassResult:
    """What a pass returns: the graph, whether it changed, measured counts, and report entries.

    `stats` are flat counts for the report's table; `report` holds structured entries the
    pass wants in report.json under its record (near-misses, predicted costs, placements).
    """

    graph: Graph
    modified: bool
    stats: dict[str, float | int | str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """Everything a pass may read besides the graph: the target and its cost model, data,
    the compute device, and the instruments (the only hook point: timing, dumps, progress)."""

    target: HardwareProfile = field(default_factory=lambda: resolve_profile("cpu"))
    calibration_data: torch.Tensor | None = None  # token windows for passes that calibrate
    device: str = "cpu"
    instruments: list[Instrument] = field(default_factory=list)

    @property
    def cost(self) -> CostModel:
        """The cost model on the target: `ctx.cost.phases(graph)`, `ctx.cost.estimate(graph)`."""
        if getattr(self, "_cost", None) is None or self._cost.profile is not self.target:
            from peakc.cost_model.predict import CostModel

            self._cost = CostModel(self.target)
        return self._cost

    def progress(self, task: str, total: int) -> ProgressTask:
        """A progress task the instruments hear about (silent when none listens)."""
        return ProgressTask(task, total, [i for i in self.instruments if hasattr(i, "on_progress")])

    def provides(self) -> set[str]:
        have = {"target"}
        if self.calibration_data is not None:
            have.add("calibration_data")
        return have


@dataclass
class NoOptions:
    """A pass without options."""


class Pass:
    """A named graph transformation with typed options.

    Subclasses set `name`, optionally `Options` (a dataclass of typed fields with defaults),
    `requires` (context entries it needs, e.g. "calibration_data"), and `parity_tol`: the
    relative output error the pass may introduce, or None when it changes numerics by design
    (pruning, quantization), in which case the parity check rebases on its output.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()
    parity_tol: ClassVar[float | None] = 1e-5

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.validate()

    def validate(self) -> None:
        """Raise PeakcError naming the option when option values are out of range."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options

    def __repr__(self) -> str:
        return f"<pass {self}>"

    def __str__(self) -> str:
        defaults = type(self)().options if dataclasses.fields(self.options) else None
        return format_options(self.name, self.options, defaults)


REGISTRY: dict[str, type[Pass]] = {}
_entry_points_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass available to pipeline specs under `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PeakcError(f"register_pass: {cls!r} is not a subclass of peakc.Pass")
    if not cls.name or not cls.name.replace("_", "a").replace("-", "a").isalnum():
        raise PeakcError(f"register_pass: {cls.__name__} needs a name of letters, digits, _ or -")
    check_options_class(cls)
    existing = REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise PeakcError(f"pass '{cls.name}' is already registered by {existing.__module__}")
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    load_builtin_passes()
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise PeakcError(f"unknown pass '{name}' (known: {known})") from None


def load_builtin_passes() -> None:
    """Import the built-in passes and the `peakc.passes` entry-point group once."""
    global _entry_points_loaded
    import peakc.passes.cleanup  # noqa: F401
    import peakc.passes.compress_moe  # noqa: F401
    import peakc.passes.fuse  # noqa: F401
    import peakc.passes.offload  # noqa: F401
    import peakc.passes.partition  # noqa: F401
    import peakc.passes.prune  # noqa: F401
    import peakc.passes.prune.sparse24  # noqa: F401
    import peakc.passes.quantize  # noqa: F401

    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group="peakc.passes"):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PeakcError(f"plug-in entry point '{ep.name}' ({ep.value}) failed: {exc}") from exc
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in REGISTRY:
            register_pass(obj)


def load_plugin(path: str | Path) -> list[str]:
    """Execute a plug-in file (which calls register_pass); returns the pass names it added."""
    path = Path(path)
    if not path.is_file():
        raise PeakcError(f"plug-in file not found: {path}")
    load_builtin_passes()
    before = set(REGISTRY)
    module_name = f"peakc_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except PeakcError:
        raise
    except Exception as exc:
        raise PeakcError(f"plug-in {path} failed to load: {type(exc).__name__}: {exc}") from exc
    return sorted(set(REGISTRY) - before)
