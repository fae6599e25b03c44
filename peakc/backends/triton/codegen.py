"""Generated Triton kernels for fusion groups: description in, Triton source out.

A fusion group (planned by `fusion.py`) is described as plain data, so an artifact can store it
and a later peakc can generate its kernel again:

    {"rank": 3,                      # rank of the iteration space (the group's widest value)
     "row_size": 64 | None,          # static last-dim size when the group reduces over it
     "inputs": [{"dtype": "float16", "row": false}, ...],   # row: [..., 1] in a row kernel
     "ops": [{"op": "mul", "args": [{"in": 0}, {"op": 0}, 2.0], "dtype": "float16"}, ...],
     "outputs": [{"op": 3, "order": [0, 2, 1]}, ...]}   # order: its dims, outermost first

Without `row_size` the kernel is pointwise: one lane per element of the iteration space,
inputs read through their (broadcast) strides, outputs written in the memory order ATen
gives them (a permuted input's elementwise result keeps its strides; views rely on it). With
it, one program per row holds the whole last dimension, so reductions over it (sum, mean,
amax, amin) feed the ops after them without leaving registers. Arithmetic is in float32;
each output is rounded once, to its op's dtype. Sources are written to an on-disk cache keyed
by their hash and imported from there (Triton's JIT reads the source file of each kernel).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_ENV = "PEAKC_TRITON_CACHE"
MAX_ROW_SIZE = 16384  # a row kernel keeps its whole row in registers
POINTWISE_BLOCK = 1024

TL_DTYPES = {"float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}

# op name -> source of its float32 result from its argument expressions
_UNARY: dict[str, Callable[[str], str]] = {
    "neg": lambda a: f"-{a}",
    "exp": lambda a: f"tl.exp({a})",
    "log": lambda a: f"tl.log({a})",
    "sqrt": lambda a: f"tl.sqrt({a})",
    "rsqrt": lambda a: f"tl.rsqrt({a})",
    "abs": lambda a: f"tl.abs({a})",
    "sin": lambda a: f"tl.sin({a})",
    "cos": lambda a: f"tl.cos({a})",
    "erf": lambda a: f"tl.erf({a})",
    "sigmoid": lambda a: f"tl.sigmoid({a})",
    "silu": lambda a: f"{a} * tl.sigmoid({a})",
    "relu": lambda a: f"tl.maximum({a}, 0.0)",
    "tanh": lambda a: f"2.0 * tl.sigmoid(2.0 * {a}) - 1.0",
    "reciprocal": lambda a: f"1.0 / {a}",
    "square": lambda a: f"{a} * {a}",
    "cube": lambda a: f"{a} * {a} * {a}",
    "gelu": lambda a: f"0.5 * {a} * (1.0 + tl.erf({a} * 0.7071067811865476))",
    "gelu_tanh": lambda a: (
        f"0.5 * {a} * (2.0 * tl.sigmoid(1.5957691216057308 * ({a} + 0.044715 * {a} * {a} * {a})))"
    ),
    "identity": lambda a: a,
    "cast_float16": lambda a: f"{a}.to(tl.float16).to(tl.float32)",
    "cast_bfloat16": lambda a: f"{a}.to(tl.bfloat16).to(tl.float32)",
}
_BINARY: dict[str, Callable[[str, str], str]] = {
    "add": lambda a, b: f"{a} + {b}",
    "sub": lambda a, b: f"{a} - {b}",
    "mul": lambda a, b: f"{a} * {b}",
    "div": lambda a, b: f"{a} / {b}",
    "maximum": lambda a, b: f"tl.maximum({a}, {b})",
    "minimum": lambda a, b: f"tl.minimum({a}, {b})",
}
# reductions over the last dim of a row kernel: (masked fill, reduce call, finish)
_REDUCTIONS: dict[str, tuple[str, str]] = {
    "sum": ("0.0", "tl.sum"),
    "mean": ("0.0", "tl.sum"),
    "amax": ('float("-inf")', "tl.max"),
    "amin": ('float("inf")', "tl.min"),
}
OPS = (*_UNARY, *_BINARY, *_REDUCTIONS)


def kernel_name(description: dict[str, Any]) -> str:
    """A name that identifies the group's kernel: the hash of its canonical description."""
    text = json.dumps(description, sort_keys=True)
    return "peakc_group_" + hashlib.sha256(text.encode()).hexdigest()[:16]


def group_source(description: dict[str, Any]) -> str:
    """The Triton source of the group's kernel (a module holding one @triton.jit function)."""
    name = kernel_name(description)
    if description.get("row_size"):
        body = _row_kernel(description, name)
    else:
        body = _pointwise_kernel(description, name)
    header = [
        f'"""peakc fusion group {name}, generated from its description (do not edit)."""',
        "",
        "import triton",
        "import triton.language as tl",
        "",
        "",
    ]
    return "\n".join(header + body) + "\n"


def _signature(description: dict[str, Any], name: str, count: str) -> list[str]:
    rank = description["rank"]
    inputs = [f"in{i}" for i in range(len(description["inputs"]))]
    outputs = [f"out{i}" for i in range(len(description["outputs"]))]
    sizes = [f"size{d}" for d in range(rank)]
    strides = [f"st{i}_{d}" for i in range(len(inputs)) for d in range(rank)]
    strides += [f"ost{i}_{d}" for i in range(len(outputs)) for d in range(rank)]
    params = ", ".join([*inputs, *outputs, count, *sizes, *strides, "BLOCK: tl.constexpr"])
    return ["@triton.jit", f"def {name}({params}):"]


def _unravel(index: str, dims: range) -> list[str]:
    """Lines splitting a flat index into one index per dim of `dims` (row-major)."""
    lines = [f"    rem = {index}"]
    for d in reversed(dims):
        if d == dims[0]:
            lines.append(f"    i{d} = rem")
        else:
            lines.append(f"    i{d} = rem % size{d}")
            lines.append(f"    rem = rem // size{d}")
    return lines


def _pointwise_kernel(description: dict[str, Any], name: str) -> list[str]:
    rank = description["rank"]
    lines = _signature(description, name, "numel")
    lines.append("    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)")
    lines.append("    mask = offs < numel")
    lines += _unravel("offs", range(rank))
    for i in range(len(description["inputs"])):
        address = " + ".join(f"i{d} * st{i}_{d}" for d in range(rank))
        lines.append(f"    a{i} = tl.load(in{i} + {address}, mask=mask, other=0.0).to(tl.float32)")
    lines += _op_lines(description)
    for i, out in enumerate(description["outputs"]):
        dtype = TL_DTYPES[description["ops"][out["op"]]["dtype"]]
        address = " + ".join(f"i{d} * ost{i}_{d}" for d in range(rank))
        lines.append(f"    tl.store(out{i} + {address}, v{out['op']}.to({dtype}), mask=mask)")
    return lines


def _row_kernel(description: dict[str, Any], name: str) -> list[str]:
    rank = description["rank"]
    size = int(description["row_size"])
    last = rank - 1
    lines = _signature(description, name, "rows")
    lines.append("    row = tl.program_id(0).to(tl.int64)")
    lines.append("    cols = tl.arange(0, BLOCK)")
    lines.append(f"    mask = cols < {size}")
    lines += _unravel("row", range(last))
    for i, spec in enumerate(description["inputs"]):
        base = " + ".join(f"i{d} * st{i}_{d}" for d in range(last)) or "0"
        if spec.get("row"):
            lines.append(f"    a{i} = tl.load(in{i} + {base}).to(tl.float32)")
        else:
            lines.append(
                f"    a{i} = tl.load(in{i} + {base} + cols * st{i}_{last}, mask=mask, "
                "other=0.0).to(tl.float32)"
            )
    lines += _op_lines(description)
    rows = row_values(description)
    for i, out in enumerate(description["outputs"]):
        index = out["op"]
        dtype = TL_DTYPES[description["ops"][index]["dtype"]]
        base = " + ".join(f"i{d} * ost{i}_{d}" for d in range(last)) or "0"
        if rows[("op", index)]:
            lines.append(f"    tl.store(out{i} + {base}, v{index}.to({dtype}))")
        else:
            lines.append(
                f"    tl.store(out{i} + {base} + cols * ost{i}_{last}, v{index}.to({dtype}), "
                "mask=mask)"
            )
    return lines


def row_values(description: dict[str, Any]) -> dict[tuple[str, int], bool]:
    """Which inputs and ops hold one value per row (after a reduction, or a [..., 1] input)
    rather than one per element; pointwise groups have none."""
    rows: dict[tuple[str, int], bool] = {}
    for i, spec in enumerate(description["inputs"]):
        rows[("in", i)] = bool(spec.get("row"))
    for j, op in enumerate(description["ops"]):
        refs = [_ref(a) for a in op["args"] if isinstance(a, dict)]
        rows[("op", j)] = op["op"] in _REDUCTIONS or all(rows[r] for r in refs)
    return rows


def _ref(arg: dict[str, int]) -> tuple[str, int]:
    return ("in", arg["in"]) if "in" in arg else ("op", arg["op"])


def _expr(arg: Any) -> str:
    if isinstance(arg, dict):
        return f"a{arg['in']}" if "in" in arg else f"v{arg['op']}"
    value = float(arg)
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(value)


def _op_lines(description: dict[str, Any]) -> list[str]:
    size = description.get("row_size")
    lines = []
    for j, op in enumerate(description["ops"]):
        name = op["op"]
        args = [_expr(a) for a in op["args"]]
        if name in _UNARY:
            expr = _UNARY[name](*args)
        elif name in _BINARY:
            expr = _BINARY[name](*args)
        else:
            fill, reduce = _REDUCTIONS[name]
            expr = f"{reduce}(tl.where(mask, {args[0]}, {fill}), axis=0)"
            if name == "mean":
                expr += f" / {float(size)!r}"
        lines.append(f"    v{j} = {expr}")
    return lines


# --- the on-disk source cache ---------------------------------------------------------------


def cache_dir() -> Path:
    """Where generated sources live: $PEAKC_TRITON_CACHE, else ~/.cache/peakc/triton."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peakc" / "triton")


_LOADED: dict[str, Any] = {}  # source hash -> imported module (this process)


def load_source(source: str) -> tuple[Any, bool]:
    """The module of a generated source, imported from the cache file named by its hash, and
    whether the file was already there with this text (a warm load). A cached file whose text
    differs is rewritten first: only the source peakc just generated is imported."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    if digest in _LOADED:
        return _LOADED[digest], True
    folder = cache_dir()
    path = folder / f"{digest}.py"
    hit = path.is_file() and path.read_text() == source
    if not hit:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            out.write(source)
        os.replace(temp, path)
    spec = importlib.util.spec_from_file_location(f"peakc_triton_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _LOADED[digest] = module
    return module, hit


class GroupKernel:
    """A fusion group's launcher: `(*inputs, config=None) -> tuple of outputs`, called like the
    ATen subgraph it replaces (inputs broadcast to the iteration space)."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.description = description
        self.source = group_source(description)
        module, self.cache_hit = load_source(self.source)
        self.kernel = getattr(module, kernel_name(description))
        self.kernels = (self.kernel,)
        size = description.get("row_size")
        block = _next_power_of_2(int(size)) if size else POINTWISE_BLOCK
        self.configs = [{"BLOCK": block, "num_warps": 4 if block <= 2048 else 8}]
        if not size:
            self.configs += [{"BLOCK": 512, "num_warps": 4}, {"BLOCK": 2048, "num_warps": 8}]
        self.rows = row_values(description)

    def __call__(self, *inputs: Any, config: dict[str, Any] | None = None) -> tuple:
        import torch

        config = config or self.configs[0]
        description = self.description
        space = list(torch.broadcast_shapes(*(t.shape for t in inputs)))
        size = description.get("row_size")
        if size and space[-1] != size:
            raise ValueError(f"{kernel_name(description)}: last dim {space[-1]}, built for {size}")
        expanded = [self._expand(t, space, i) for i, t in enumerate(inputs)]
        device = inputs[0].device
        outputs = []
        for out in description["outputs"]:
            shape = space[:-1] + [1] if self.rows[("op", out["op"])] else space
            dtype = getattr(torch, description["ops"][out["op"]]["dtype"])
            order = out.get("order") or list(range(len(shape)))  # dims, outermost first
            empty = torch.empty([shape[d] for d in order], dtype=dtype, device=device)
            outputs.append(empty.permute([order.index(d) for d in range(len(shape))]))
        numel = math.prod(space)
        if numel:
            count = numel // space[-1] if size else numel
            grid = (count,) if size else (-(-numel // config["BLOCK"]),)
            strides = [s for t in [*expanded, *outputs] for s in t.stride()]
            self.kernel[grid](
                *expanded,
                *outputs,
                count,
                *space,
                *strides,
                BLOCK=config["BLOCK"],
                num_warps=config["num_warps"],
            )
        return tuple(outputs)

    def _expand(self, t: Any, space: list[int], index: int) -> Any:
        """The input viewed over the iteration space (stride 0 where it broadcasts); a row
        input keeps its last dim of 1."""
        if self.rows[("in", index)]:
            return t.expand(space[:-1] + [1])
        return t.expand(space)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
