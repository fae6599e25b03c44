"""Triton kernels, one file per peakc op; importing this package registers each as the op's
triton lowering (peakc/ir/ops.py's registry)."""

from peakc.backends.triton.kernels import (  # noqa: F401  (importing registers the lowerings)
    attention,
    compressed_linear,
    gemv,
    glu,
    grouped_mm,
    grouped_mm_compressed,
    linear_act,
    linear_compressed,
    norms,
    rotary,
)
