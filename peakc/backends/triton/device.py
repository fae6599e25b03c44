"""Where Triton kernels run: a CUDA GPU, or the CPU under TRITON_INTERPRET=1 (tests)."""

from __future__ import annotations

import os

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
