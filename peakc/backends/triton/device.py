"""Where Triton kernels run (a CUDA GPU, or the CPU under TRITON_INTERPRET=1 for tests) and
what each kernel needs there: `FEATURES` (bf16 from compute capability 8.0, triton APIs), checked
for every kernel of a program before it runs (`check_kernels`), so an old GPU or triton is a
one-line error naming the kernel and the feature instead of a compiler failure mid-run."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peakc.errors import PeakcError


def interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (set before any kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_device() -> str:
    """'cuda', or 'cpu' under TRITON_INTERPRET=1; without either, a one-line error."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise PeakcError(
            "backend triton needs the triton package (pip install triton); use --backend eager "
            "or ort instead"
        ) from None
    import torch

    if interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    raise PeakcError(
        "backend triton needs a CUDA GPU and none is available: use --backend eager or ort "
        "(or set TRITON_INTERPRET=1 to run its kernels slowly on the CPU)"
    )


# --- what kernels need from the GPU and from triton -----------------------------------------


@dataclass(frozen=True)
class Feature:
    """Something a kernel may need that an older GPU or triton lacks: a minimum CUDA compute
    capability, or a check of the installed triton."""

    description: str
    min_capability: tuple[int, int] | None = None
    available: Callable[[], bool] | None = None


def _dot_takes_input_precision() -> bool:
    import triton.language as tl

    return "input_precision" in inspect.signature(tl.dot).parameters


FEATURES = {
    "bf16": Feature("bfloat16 loads, stores and conversions", min_capability=(8, 0)),
    "tl.dot(input_precision=)": Feature(
        "tl.dot's input_precision argument (triton 3.0)", available=_dot_takes_input_precision
    ),
}
TL_NAME = re.compile(r"\btl((?:\.[A-Za-z_]\w*)+)")


def gpu_capability(device: str) -> tuple[str, tuple[int, int]] | None:
    """(GPU name, compute capability) of a CUDA device; None for the CPU interpreter."""
    if device == "cpu" or interpreting():
        return None
    import torch

    return torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)


def kernel_features(entry: dict[str, Any], source: str) -> list[str]:
    """What one kernel of a program needs: bf16 when its description has bfloat16 values (a
    template's source serves every dtype, so the description decides), each `tl.NAME` its
    source uses, and the FEATURES its source's calls need."""
    dtypes = json.dumps([entry.get("dtypes"), entry.get("description")])
    bf16 = ["bf16"] if "bfloat16" in dtypes else []
    return bf16 + list(_source_features(source))


@functools.cache
def _source_features(source: str) -> tuple[str, ...]:
    """The features a kernel's source text names (one scan per distinct source)."""
    needs = ["tl.dot(input_precision=)"] if re.search(r"\binput_precision\s*=", source) else []
    return (*needs, *sorted({"tl" + match for match in TL_NAME.findall(source)}))


def require(kernel: str, feature: str, gpu: tuple[str, tuple[int, int]] | None) -> None:
    """A one-line PeakcError naming the kernel and the feature when this GPU (None: the CPU
    interpreter, which has every capability) or the installed triton lacks it."""
    import triton

    if feature.startswith("tl.") and feature not in FEATURES:
        if _triton_has(feature):
            return
        raise PeakcError(
            f"kernel {kernel} needs {feature}, which triton {triton.__version__} lacks: install a "
            "newer triton, or use --backend eager or ort"
        )
    spec = FEATURES[feature]
    if spec.available is not None and not spec.available():
        raise PeakcError(
            f"kernel {kernel} needs {feature} ({spec.description}), which triton "
            f"{triton.__version__} lacks: install a newer triton, or use --backend eager or ort"
        )
    if spec.min_capability is not None and gpu is not None and gpu[1] < spec.min_capability:
        need = ".".join(map(str, spec.min_capability))
        name, have = gpu[0], ".".join(map(str, gpu[1]))
        raise PeakcError(
            f"kernel {kernel} needs {feature} ({spec.description}: compute capability {need}, "
            f"sm{need.replace('.', '')}); {name} has {have}: compile in float16 or float32, or "
            "use --backend eager or ort"
        )


def check_kernels(kernels: list[tuple[str, dict[str, Any], str]], device: str) -> None:
    """Every kernel of a program, as (name, description, source), against this device and
    triton (`require`) before any runs: at compile, on the device the lowerings chose them
    for, and at load."""
    gpu = gpu_capability(device)
    present: set[str] = set()  # features already found here (the answer is per feature)
    for name, entry, source in kernels:
        for feature in kernel_features(entry, source):
            if feature not in present:
                require(name, feature, gpu)
                present.add(feature)


def _triton_has(name: str) -> bool:
    """Whether `tl.a.b` resolves in the installed triton.language."""
    import triton.language as tl

    found: Any = tl
    for part in name.split(".")[1:]:
        found = getattr(found, part, None)
        if found is None:
            return False
    return True
