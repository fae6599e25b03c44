"""Triton kernels, one file per peakc op (standalone: not yet registered as lowerings)."""
