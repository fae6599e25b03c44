"""The triton program format: a declarative list of steps over numbered values, run in order.

A program file (`<name>.triton.json`) holds:
    weights  value ids of the weights, in the manifest's weight order (the leading arguments),
             and weight_names, their names in weights.safetensors
    inputs   value ids of the inputs
    steps    {"kind": "aten" | "gemm" | "reference" | "kernel" | "group", "op", "args",
             "kwargs", "out", "kernel", "nodes" (the graph nodes it runs, for reports)}: an
             ATen op by name (dense GEMMs on cuBLAS through ATen), a peakc op's reference, a
             peakc op's Triton launcher, a generated group
    outputs  the returned values
    kernels  per kernel a declarative description (a template: the op and its lowering's label;
             a group: codegen's description), the shapes, dtypes and config it was built for,
             and its source text, for reading only
    tuning   the configs measured per kernel and shape, and the device key they hold for
Loading regenerates every kernel from its description with the installed peakc (templates from
the lowering registry, groups through codegen); a regenerated source that differs from the
stored text is reported in the load report, and the stored text is never executed. Args are
JSON: numbers, strings, lists, and tagged objects for values, dtypes, devices and layouts.
"""

from __future__ import annotations

import inspect
import json
import operator
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peakc.backends.triton.codegen import GroupKernel
from peakc.backends.triton.device import check_kernels, interpreting, resolve_device
from peakc.errors import PeakcError
from peakc.ir.ops import find_op, lowering_for
from peakc.runtime.artifact import register_program_format

# 2: linear_wq's int16 slot layout and linear_compressed's sliced-ELL blocks as stored weights
PROGRAM_VERSION = 2
BACKEND = "triton"
OPERATORS = {"getitem": operator.getitem, "add": operator.add, "sub": operator.sub,
             "mul": operator.mul, "floordiv": operator.floordiv, "neg": operator.neg}  # fmt: skip
GEMMS = {
    "aten.linear.default": torch.nn.functional.linear,
    "aten.mm.default": torch.mm,
    "aten.addmm.default": torch.addmm,
}
NAMESPACES = ("aten", "peakc")


# --- args as JSON ---------------------------------------------------------------------------


def encode_arg(arg: Any, value_id: Callable[[Any], int]) -> Any:
    """An FX argument as JSON: nodes become {"value": id}; a device becomes the program's."""
    if hasattr(arg, "op") and hasattr(arg, "meta"):
        return {"value": value_id(arg)}
    if isinstance(arg, (list, tuple)):
        items = [encode_arg(a, value_id) for a in arg]
        return items if isinstance(arg, list) else {"tuple": items}
    if isinstance(arg, torch.dtype):
        return {"dtype": str(arg).removeprefix("torch.")}
    if isinstance(arg, torch.device):
        return {"device": "program"}
    if isinstance(arg, torch.memory_format):
        return {"memory_format": str(arg).removeprefix("torch.")}
    if isinstance(arg, torch.layout):
        return {"layout": str(arg).removeprefix("torch.")}
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    raise PeakcError(f"backend triton: cannot store argument {arg!r} ({type(arg).__name__})")


class Ref:
    """A value of the program's environment, by id (a decoded {"value": id})."""

    __slots__ = ("id",)

    def __init__(self, value_id: int) -> None:
        self.id = value_id


def decode_arg(arg: Any, device: torch.device) -> Any:
    """The inverse of encode_arg, with values as Ref; an unknown tag is a PeakcError."""
    if isinstance(arg, list):
        return [decode_arg(a, device) for a in arg]
    if not isinstance(arg, dict):
        return arg
    (tag, content), *rest = arg.items() if arg else ((None, None),)
    if rest or tag is None:
        raise PeakcError(f"triton program: malformed argument {arg!r}")
    if tag == "value":
        return Ref(int(content))
    if tag == "tuple":
        return tuple(decode_arg(a, device) for a in content)
    if tag == "device":
        return device
    if tag in ("dtype", "memory_format", "layout"):
        found = getattr(torch, str(content), None)
        if isinstance(found, (torch.dtype, torch.memory_format, torch.layout)):
            return found
    raise PeakcError(f"triton program: unknown argument {arg!r}")


def resolve(arg: Any, env: list) -> Any:
    if isinstance(arg, Ref):
        return env[arg.id]
    if isinstance(arg, list):
        return [resolve(a, env) for a in arg]
    if isinstance(arg, tuple):
        return tuple(resolve(a, env) for a in arg)
    return arg


def aten_op(name: str) -> Callable:
    """`aten.view.default` -> torch.ops.aten.view.default; only the aten and peakc namespaces
    (a stored program names ops, it never carries code)."""
    if name.startswith("operator."):
        fn = OPERATORS.get(name.removeprefix("operator."))
        if fn is None:
            raise PeakcError(f"triton program: operator '{name}' is not allowed")
        return fn
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in NAMESPACES:
        raise PeakcError(f"triton program: op '{name}' is not an aten or peakc op")
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except AttributeError:
        raise PeakcError(f"triton program: op '{name}' does not exist in this torch") from None


# --- kernels --------------------------------------------------------------------------------


def template_source(launcher: Callable) -> str:
    """The source text of the @triton.jit functions a template launcher runs."""
    texts = []
    for kernel in getattr(launcher, "kernels", ()):
        fn = getattr(kernel, "fn", kernel)
        try:
            texts.append(inspect.getsource(fn))
        except (OSError, TypeError):
            texts.append(f"# source of {getattr(fn, '__name__', kernel)} unavailable\n")
    return "\n".join(texts)


def build_kernel(entry: dict[str, Any]) -> tuple[Callable | None, str, str | None]:
    """(launcher or None for the reference, regenerated source, note for the load report)."""
    if entry["kind"] == "group":
        kernel = GroupKernel(entry["description"])
        return kernel, kernel.source, None
    if entry["kind"] != "template":
        raise PeakcError(f"triton program: unknown kernel kind '{entry['kind']}'")
    lowering = lowering_for(entry["op"], BACKEND)
    if lowering is None:
        note = f"{entry['op']}: its kernel ({entry['label']}) is not in this peakc; reference"
        return None, "", note
    return lowering.fn, template_source(lowering.fn), None


def device_key() -> dict[str, str]:
    """What tuned configs hold for: the GPU, its driver, torch's and triton's versions."""
    import triton

    key = {"torch": torch.__version__, "triton": triton.__version__, "device": "cpu"}
    if torch.cuda.is_available() and not interpreting():
        key["device"] = torch.cuda.get_device_name()
        key["driver"] = _driver_version()
    return key


def _driver_version() -> str:
    """The NVIDIA kernel driver's version line (Linux), else the CUDA runtime's version."""
    path = Path("/proc/driver/nvidia/version")
    if path.is_file():
        return path.read_text().splitlines()[0].strip()
    return f"cuda {torch.version.cuda}"


def shape_key(args: tuple) -> str:
    """The tensor shapes and dtypes of a call: the key tuned configs are stored under."""
    parts = [
        f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}"
        for a in args
        if isinstance(a, torch.Tensor)
    ]
    return ";".join(parts)


# --- the program ----------------------------------------------------------------------------


class Step:
    """One prepared step: its function, decoded args and where its result goes."""

    __slots__ = ("fn", "args", "kwargs", "out", "entry", "kernel", "tuned")

    def __init__(self, fn, args, kwargs, out, entry, kernel=None, tuned=None) -> None:
        self.fn, self.args, self.kwargs, self.out = fn, args, kwargs, out
        self.entry, self.kernel, self.tuned = entry, kernel, tuned or {}


class TritonProgram:
    """A loaded triton program, called like an eager artifact's program: (*weights, *inputs)
    -> tuple of outputs. It runs on its device (inputs elsewhere are moved there) and returns
    the outputs on the device of the first input."""

    def __init__(
        self, spec: dict[str, Any], device: str, runtime: dict[str, Any] | None = None
    ) -> None:
        import peakc.backends.triton.kernels  # noqa: F401  (the backend's own ops and kernels)

        started = time.perf_counter()
        if spec.get("version") != PROGRAM_VERSION:
            raise PeakcError(
                f"triton program: version {spec.get('version')} is not the version this peakc "
                f"runs ({PROGRAM_VERSION}; the kernels' stored weight layouts changed): recompile"
            )
        self.spec = spec
        self.device = torch.device(device)
        self.runtime = runtime or {}
        self.notes: list[str] = []
        self.launchers: list[Callable | None] = []
        sources: dict[str, bool] = {}  # generated source -> found in the on-disk cache
        built: list[tuple[str, dict[str, Any], str]] = []  # each kernel that runs
        for i, entry in enumerate(spec["kernels"]):
            launcher, source, note = build_kernel(entry)
            if hasattr(launcher, "cache_hit"):
                sources.setdefault(source, launcher.cache_hit)
            if launcher is not None:
                built.append((f"{i} ({entry.get('label') or entry['kind']})", entry, source))
            if note:
                self.notes.append(note)
            elif source != entry.get("source", ""):
                self.notes.append(
                    f"kernel {i} ({entry.get('label') or entry['kind']}): the installed peakc "
                    "generates a different source than the artifact stores; running peakc's"
                )
            self.launchers.append(launcher)
        check_kernels(built, self.device.type)  # an old GPU or triton: one line, before any runs
        self.configs = self._tuned_configs(spec.get("tuning") or {})
        self.steps = [self._prepare(entry) for entry in spec["steps"]]
        self.outputs = decode_arg(spec["outputs"], self.device)
        self.frees = _last_uses(spec)
        self._device_weights: list[tuple[torch.Tensor, torch.Tensor]] = []
        for note in self.notes:
            warnings.warn(f"triton program: {note}", stacklevel=2)
        self.load_report = {
            "seconds": round(time.perf_counter() - started, 4),
            "kernels": len(spec["kernels"]),
            "generated_sources": len(sources),
            "source_cache_hits": sum(sources.values()),
            "notes": self.notes,
        }

    def _tuned_configs(self, tuning: dict[str, Any]) -> dict[int, dict[str, dict]]:
        """Configs measured at compile time, when this device has the same key; otherwise
        the kernels' defaults, and the load report says so."""
        stored = tuning.get("configs") or {}
        if not stored:
            return {}
        if tuning.get("key") != device_key():
            self.notes.append(
                f"tuned on {tuning.get('key')}, loaded on {device_key()}: default configs"
            )
            return {}
        return {int(k): v for k, v in stored.items()}

    def _prepare(self, entry: dict[str, Any]) -> Step:
        kind = entry["kind"]
        args = decode_arg(entry.get("args", []), self.device)
        kwargs = {k: decode_arg(v, self.device) for k, v in entry.get("kwargs", {}).items()}
        out = entry["out"]
        if kind in ("kernel", "group"):
            index = entry["kernel"]
            launcher = self.launchers[index]
            if launcher is None:
                return Step(find_op(entry["op"], BACKEND).reference, args, kwargs, out, entry)
            return Step(launcher, args, kwargs, out, entry, index, self.configs.get(index))
        if kind == "reference":
            return Step(find_op(entry["op"], BACKEND).reference, args, kwargs, out, entry)
        if kind == "gemm":
            return Step(GEMMS[entry["op"]], args, kwargs, out, entry)
        if kind == "aten":
            return Step(aten_op(entry["op"]), args, kwargs, out, entry)
        raise PeakcError(f"triton program: unknown step kind '{kind}'")

    def __call__(self, *values: torch.Tensor) -> tuple:
        spec = self.spec
        count = len(spec["weights"])
        env: list[Any] = [None] * spec["values"]
        weights = self._weights_on_device(values[:count])
        for value_id, tensor in zip(spec["weights"], weights):
            env[value_id] = tensor
        inputs = values[count:]
        for value_id, tensor in zip(spec["inputs"], inputs):
            env[value_id] = tensor.to(self.device) if isinstance(tensor, torch.Tensor) else tensor
        for index, step in enumerate(self.steps):
            self.run_step(step, env)
            for dead in self.frees.get(index, ()):
                env[dead] = None
        outputs = tuple(resolve(self.outputs, env))
        home = inputs[0].device if inputs and isinstance(inputs[0], torch.Tensor) else self.device
        if home != self.device:  # the caller's tensors live elsewhere: results go back there
            outputs = tuple(o.to(home) if isinstance(o, torch.Tensor) else o for o in outputs)
        return outputs

    def run_step(self, step: Step, env: list) -> None:
        args = resolve(step.args, env)
        kwargs = {k: resolve(v, env) for k, v in step.kwargs.items()}
        if step.kernel is not None:
            config = step.tuned.get(shape_key(args)) if step.tuned else None
            result = step.fn(*args, config=config, **kwargs)
        else:
            result = step.fn(*args, **kwargs)
        if isinstance(step.out, list):
            for value_id, value in zip(step.out, result):
                env[value_id] = value
        else:
            env[step.out] = result

    def _weights_on_device(self, weights: tuple) -> list[torch.Tensor]:
        """The weights on the program's device; copies made for one call's tensors are kept
        for the next call with the same tensors (an artifact passes the same ones each time)."""
        cached = self._device_weights
        if len(cached) == len(weights) and all(c[0] is w for c, w in zip(cached, weights)):
            return [c[1] for c in cached]
        moved = [w.to(self.device) for w in weights]
        self._device_weights = list(zip(weights, moved))
        return moved

    def cache_owning_step(self, layout: dict[str, Any]) -> Any:
        """With cuda_graph on a CUDA device: the Generator's decode step replaying a CUDA graph
        per decode batch (cuda_graphs.py); otherwise None (the Generator drives this program)."""
        if not self.runtime.get("cuda_graph") or self.device.type != "cuda":
            return None
        from peakc.backends.triton.cuda_graphs import GraphedDecoder

        return GraphedDecoder(self, layout)


def _last_uses(spec: dict[str, Any]) -> dict[int, list[int]]:
    """Per step index, the values no later step (nor the outputs) reads: freed after it."""
    last: dict[int, int] = {}

    def visit(arg: Any, index: int) -> None:
        if isinstance(arg, dict) and "value" in arg and len(arg) == 1:
            last[int(arg["value"])] = index
        elif isinstance(arg, dict):
            for a in arg.values():
                visit(a, index)
        elif isinstance(arg, list):
            for a in arg:
                visit(a, index)

    for index, step in enumerate(spec["steps"]):
        visit(step.get("args", []), index)
        visit(step.get("kwargs", {}), index)
    visit(spec["outputs"], len(spec["steps"]))
    frees: dict[int, list[int]] = {}
    for value_id, index in last.items():
        if index < len(spec["steps"]):
            frees.setdefault(index, []).append(value_id)
    return frees


def load_triton_program(path: Path, runtime: dict[str, Any]) -> TritonProgram:
    """The program format's loader (register_program_format): parse, regenerate, prepare."""
    device = resolve_device()
    try:
        spec = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise PeakcError(f"{Path(path).name}: not a triton program ({exc})") from None
    program = TritonProgram(spec, device, runtime)
    program.path = Path(path)
    return program


register_program_format("triton", load_triton_program)
