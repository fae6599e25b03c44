"""Triton backend: kernels that peakc's ops lower to on CUDA devices."""
